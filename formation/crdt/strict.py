"""Untrusted text and JSON, checked the same way on every node and every path.

A user's request body is JSON chosen by whoever signed it; every node parses it again when it
derives the write. So the parse must be total and deterministic: the same bytes give the same
verdict whatever thread, stack depth or Python build runs it. `json.loads` alone is none of
that: its recursion limit depends on the stack it runs on, it keeps the last of duplicate keys,
accepts lone surrogates ("\\ud800"), NaN and Infinity, and integers of any size. Here every one
of those is refused with a reason, before `json.loads` runs (the nesting is counted first).

Text policy (every string in a record): valid Unicode scalar values only (no lone surrogates),
no C0/C1 control characters except newline and tab, and no bidirectional formatting characters
(they make an id or a name read differently from what it is: "Trojan Source", CVE-2021-42574).
"""

from __future__ import annotations

import json
import math
import re

MAX_DEPTH = 16  # nesting of arrays and objects in a body (the codec's limit for values)
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)

# C0 controls but \t and \n, DEL and C1 controls, and every Bidi_Control character.
_BAD_CHAR = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class StrictError(ValueError):
    """Input refused; the message says what and where."""


def text_problem(s: str) -> str | None:
    """Why `s` is not acceptable text, or None if it is."""
    if _SURROGATE.search(s):
        return "must be valid Unicode (it holds a lone surrogate)"
    bad = _BAD_CHAR.search(s)
    if bad:
        return f"must not contain control or bidirectional formatting characters (U+{ord(bad.group()):04X})"
    return None


def nesting_depth(data: bytes) -> int:
    """Deepest nesting of [ and { in JSON bytes, ignoring brackets inside strings. No recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for b in data:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _unique_pairs(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise StrictError("a key appears twice in one object")
    return out


def _pairs(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise StrictError(f"key {k!r} appears twice in one object")
        problem = text_problem(k)
        if problem:
            raise StrictError(f"key {k!r}: {problem}")
        out[k] = v
    return out


def _no_constant(name: str):
    raise StrictError(f"{name} is not a JSON number")


def _int(text: str) -> int:
    if len(text) > 20:
        raise StrictError("an integer must fit in 64 bits")
    value = int(text)
    if not MIN_INT <= value <= MAX_INT:
        raise StrictError("an integer must fit in 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictError(f"number {text[:32]} is out of range")
    return value


def parse_json(data: bytes, *, max_depth: int = MAX_DEPTH, plain_text: bool = True):
    """Parse JSON bytes strictly (see the module doc); raises StrictError. `plain_text=False`
    skips the text policy (for payloads that are not records, e.g. a task for an agent)."""
    if nesting_depth(data) > max_depth:
        raise StrictError(f"JSON nested deeper than {max_depth} levels")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_pairs if plain_text else _unique_pairs,
                           parse_constant=_no_constant, parse_int=_int, parse_float=_float)
    except StrictError:
        raise
    except ValueError as exc:
        raise StrictError(f"not JSON ({exc})") from None
    if plain_text:
        _check_strings(value)
    return value


def _check_strings(value) -> None:
    """Every string value (keys were checked while parsing) is acceptable text. Iterative."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            problem = text_problem(v)
            if problem:
                raise StrictError(f"string {v[:40]!r}: {problem}")
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
