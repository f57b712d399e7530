"""Passwords in Formfile texts: no USER password in clear in any op.

A record's Formfile (instance, agent and model `formfile`, `formfile_template`) is replicated to
every node and kept in every op log for good, so validity refuses one whose USER line gives a
`passwd` that is not a crypt hash. The check reads the text exactly as the Formfile parser does
(formation/pack/formfile.py imports its reading from here: one implementation): the same logical
lines (comments and blank lines dropped, trailing-backslash continuations joined), the same
instruction word (`USER`, upper case: `user` is an unknown instruction for the parser, so it
sets no password), the same split into words (POSIX shell quoting, as `shlex.split`, done here
by one regular expression: a 32 KiB text costs about a millisecond, not the tens shlex takes)
and the same `field:value` / `field=value` reading of each word. A USER line that cannot be
split into words counts as holding a clear password (the parser refuses it; the text would
still be in the op).

Pure and total over any text: no IO, no clock, no recursion.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# What a crypt(3) hash of each accepted scheme looks like, in full (a prefix alone, such as
# `$6$mypassword`, is not a hash). The alphabet is crypt's base64: . / 0-9 A-Z a-z.
_B64 = "[./0-9A-Za-z]"
CRYPT_HASH = re.compile(
    rf"\$y\${_B64}+\${_B64}{{0,86}}\${_B64}{{43}}"  # yescrypt (Debian 11+ default)
    rf"|\$gy\${_B64}+\${_B64}{{0,86}}\${_B64}{{43}}"  # gost-yescrypt
    rf"|\$7\${_B64}{{11,100}}\${_B64}{{43}}"  # scrypt
    rf"|\$2b\$[0-9]{{2}}\${_B64}{{53}}"  # bcrypt
    rf"|\$6\$(?:rounds=[0-9]{{1,9}}\$)?{_B64}{{0,16}}\${_B64}{{86}}"  # SHA-512 crypt
    rf"|\$5\$(?:rounds=[0-9]{{1,9}}\$)?{_B64}{{0,16}}\${_B64}{{43}}"  # SHA-256 crypt
)
SCHEMES = "$y$, $gy$, $7$, $2b$, $6$ or $5$"
HOW_TO_HASH = ("hash it first: `form pack build/ship` does it for you; or `openssl passwd -6` / "
               "`mkpasswd -m yescrypt`")


def is_crypt_hash(value: str) -> bool:
    return CRYPT_HASH.fullmatch(value) is not None


# ---- reading a Formfile (shared with formation/pack/formfile.py) -----------------------------

def logical_spans(text: str) -> Iterator[tuple[int, int, str]]:
    """(first line number, last line number, text) of each logical line: comments and blank
    lines dropped, a trailing backslash continues a line (a comment or blank line inside a
    continuation is part of it, or ends it, as it comes)."""
    buf: list[str] = []
    start = 0
    no = 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if not buf:
            start = no
        if line.endswith("\\"):
            buf.append(line[:-1].rstrip())
            continue
        buf.append(line)
        yield start, no, " ".join(p for p in buf if p)
        buf = []
    if buf:
        yield start, no, " ".join(p for p in buf if p)


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) with comments and blank lines dropped, continuations joined."""
    for start, _, line in logical_spans(text):
        yield start, line


def instruction(line: str) -> tuple[str, str]:
    """A logical line's instruction word and its argument (stripped), as the parser reads them."""
    word, _, arg = line.partition(" ")
    return word, arg.strip()


# One piece of a shell word, or a run of blanks between words: bare characters, a backslash
# escape, a single-quoted string, a double-quoted string (in which a backslash pairs with the
# character after it). shlex's POSIX mode with whitespace_split, as shlex.split runs it.
_PART = re.compile(r"""[^ \t\r\n'"\\]+|\\[\s\S]|'[^']*'|"(?:[^"\\]|\\[\s\S])*"|[ \t\r\n]+""")
_BLANK = frozenset(" \t\r\n")
_DQ_ESCAPE = re.compile(r"\\([\s\S])")
_DQ_OPEN_ESCAPE = re.compile(r'"(?:[^"\\]|\\[\s\S])*\\\Z')


def _dq(m: re.Match) -> str:
    c = m.group(1)
    return c if c in '"\\' else m.group(0)


_QUOTING = re.compile(r"""['"\\]""")
_BLANKS = re.compile(r"[ \t\r\n]+")


def split_words(arg: str) -> list[str]:
    """`shlex.split(arg)`, same words and same errors (ValueError "No closing quotation" or
    "No escaped character"), in linear time."""
    if _QUOTING.search(arg) is None:  # nothing quoted or escaped: words between blanks
        return [w for w in _BLANKS.split(arg) if w]
    words: list[str] = []
    cur: list[str] | None = None
    pos, end = 0, len(arg)
    while pos < end:
        m = _PART.match(arg, pos)
        if m is None:  # an opening quote that never closes, or a backslash at the very end
            c = arg[pos]
            if c == "\\" or (c == '"' and _DQ_OPEN_ESCAPE.match(arg, pos)):
                raise ValueError("No escaped character")
            raise ValueError("No closing quotation")
        part = m.group()
        pos = m.end()
        c = part[0]
        if c in _BLANK:
            if cur is not None:
                words.append("".join(cur))
                cur = None
            continue
        if cur is None:
            cur = []
        if c == "\\":
            cur.append(part[1])
        elif c == "'":
            cur.append(part[1:-1])
        elif c == '"':
            cur.append(_DQ_ESCAPE.sub(_dq, part[1:-1]))
        else:
            cur.append(part)
    if cur is not None:
        words.append("".join(cur))
    return words


def user_field(word: str) -> tuple[str, str, str]:
    """(field, separator, value) of a USER word: `field:value`, or `field=value` when the part
    before the first '=' has no ':'. No separator: ("word", "", "")."""
    return word.partition(":") if ":" in word.split("=")[0] else word.partition("=")


# ---- the rule --------------------------------------------------------------------------------

# A USER instruction starts a physical line (after blanks): if no line does, the text has none.
# The line breaks are those of str.splitlines, and \s is what str.strip removes.
_USER_AT_LINE_START = re.compile("(?:\\A|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029])\\s*USER")


def clear_passwords(text: str) -> list[tuple[int, str]]:
    """(line number, problem) for each USER line of a Formfile text that gives a password in
    clear: a `passwd` field whose value is not a crypt hash, or a USER line that cannot be
    split into words. Never says what the password is."""
    if _USER_AT_LINE_START.search(text) is None:  # no line starts with USER: nothing to read
        return []
    out: list[tuple[int, str]] = []
    for no, line in logical_lines(text):
        word, arg = instruction(line)
        if word != "USER" or not arg:
            continue
        try:
            words = split_words(arg)
        except ValueError as exc:
            out.append((no, f"a USER line that cannot be split into words ({exc}) is taken as holding a "
                            "password in clear; fix its quoting"))
            continue
        for w in words:
            key, sep, value = user_field(w)
            if key == "passwd" and sep and not is_crypt_hash(value):
                out.append((no, f"USER passwd is not a crypt hash ({SCHEMES}): a password in clear would "
                                "be replicated to every node"))
    return out


def refusal(problems: list[tuple[int, str]]) -> str:
    """The message for `clear_passwords`' problems: where, why, what to do."""
    lines = sorted({no for no, _ in problems})
    where = f"line {lines[0]}" if len(lines) == 1 else "lines " + ", ".join(map(str, lines[:8])) + (
        ", ..." if len(lines) > 8 else "")
    return f"{where}: {problems[0][1]}; {HOW_TO_HASH}"


def check_no_clear_password(text: str) -> str:
    """A field checker's second half: `text` unchanged, or ValueError saying where and what to do."""
    problems = clear_passwords(text)
    if problems:
        raise ValueError(refusal(problems))
    return text
