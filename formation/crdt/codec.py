"""Canonical msgpack: one value, one byte string.

Ops are hashed and signed, so every honest node must produce the same bytes for the same
value, and a decoder must refuse any other encoding of it (otherwise one op could travel
under several ids). We get both by packing maps with sorted keys and, on decode, re-packing
what we read and comparing it with the input.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from .strict import text_problem


class CodecError(ValueError):
    """Bytes that are not one canonical msgpack value of the allowed types."""


# Values that may appear in ops and records. Floats are allowed (ratings, prices) but must be
# finite: NaN != NaN would make equal states compare unequal.
_SCALARS = (type(None), bool, int, str, bytes)

MAX_DEPTH = 16
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)


def canonical(value: Any, *, _depth: int = 0) -> Any:
    """Return `value` with every map's keys sorted; raise CodecError on a type we do not allow."""
    if _depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None and "surrogate" in problem:  # unencodable; other text rules are the records'
            raise CodecError(f"string {value[:40]!r} {problem}")
        return value
    if isinstance(value, _SCALARS):
        if isinstance(value, int) and not isinstance(value, bool) and not MIN_INT <= value <= MAX_INT:
            raise CodecError(f"integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CodecError("floats must be finite (no NaN or infinity)")
        return value
    if isinstance(value, (list, tuple)):
        return [canonical(v, _depth=_depth + 1) for v in value]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise CodecError(f"map keys must be strings, got {type(k).__name__}")
        return {k: canonical(value[k], _depth=_depth + 1) for k in sorted(value)}
    raise CodecError(f"type {type(value).__name__} cannot be encoded")


def pack(value: Any) -> bytes:
    """Canonical encoding of `value` (checked and key-sorted)."""
    return msgpack.packb(canonical(value), use_bin_type=True)


def pack_trusted(value: Any) -> bytes:
    """Encoding of a value already in canonical shape (sorted maps, allowed types): no checks."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes, *, max_bytes: int) -> Any:
    """Decode exactly one canonical value from `data`, or raise CodecError saying why not."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError(f"{len(data)} bytes is over the limit of {max_bytes}")
    if not data:
        raise CodecError("empty input")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_sorted_map,
            ext_hook=_no_ext,
        )
    except msgpack.ExtraData as exc:
        raise CodecError("trailing bytes after the value") from exc
    except CodecError:
        raise
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        # msgpack raises ValueError subclasses for truncated data and bad utf-8 alike.
        why = str(exc) or "reserved or unexpected byte"
        raise CodecError(f"not valid msgpack ({exc.__class__.__name__}: {why})") from exc
    _check_depth(value)
    # Maps were checked while decoding; re-packing catches non-minimal ints, lengths, floats.
    if msgpack.packb(value, use_bin_type=True) != bytes(data):
        raise CodecError("not in canonical form (a non-minimal encoding)")
    return value


def _check_depth(value: Any) -> None:
    """Refuse values nested deeper than MAX_DEPTH, without recursion (so the verdict never
    depends on the stack a caller runs on)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CodecError(f"value nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, (list, dict)):
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))


def _sorted_map(pairs: list) -> dict:
    last = None
    for k, _ in pairs:
        if not isinstance(k, str):
            raise CodecError(f"map keys must be strings, got {type(k).__name__}")
        if last is not None and k <= last:
            raise CodecError("not in canonical form (map keys unsorted or repeated)")
        last = k
    return dict(pairs)


def _no_ext(code: int, data: bytes):
    raise CodecError(f"msgpack extension type {code} is not allowed")
