"""No USER password in clear in any op (crdt/passwords.py), the CLI's hashing of them
(formation/crypthash.py), and the Formfile's MODEL bound to the record (user_kinds.BindsModel).

The rule must read a hostile text exactly as the Formfile parser does: the parser and the rule
share one reading, and these tests compare them on hostile texts (quoting, `passwd=`,
continuations, lowercase `user`, unclosed quotes) and check that a 32 KiB text costs little.
"""

from __future__ import annotations

import shlex
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formation import crypthash
from formation.crdt.keys import PrivateKey
from formation.crdt.kinds import Invalid, get_kind
from formation.crdt.kinds.user_kinds import formfile_model
from formation.crdt.op import make_op
from formation.crdt.passwords import (
    clear_passwords,
    is_crypt_hash,
    logical_lines,
    split_words,
)
from formation.crdt.store import Store
from formation.pack.formfile import FormfileError, canonical, parse
from tests.pack.test_formfile import README_EXAMPLE
from tests.support import Node, User

# one real hash of each accepted scheme (libxcrypt's, of "secret"; the $6$ ones are the
# specification's vectors, of "Hello world!")
HASHES = {
    "yescrypt": "$y$j9T$k2XAnEHBqQ1Ct2aMXFKNa/$wlUhTDUqAryQnsZkFoU5UZ6UStBlZ4Z8j4gtdFPQVn4",
    "gost-yescrypt": "$gy$j9T$k2XAnEHBqQ1Ct2aMXFKNa/$1Ge.w/tr2e3TdN67lBUZ4pe4klR/hfBEbnc.jwyJpW/",
    "scrypt": "$7$CU..../....k2XAnEHBqQ1Ct2aMXFKNa/$A6IVixvhoQHDw1QkTPSWvnKLYCEH.Z8QGvH0DgLtQ1C",
    "bcrypt": "$2b$05$KBCwKxOzLha2MUDgW0PjXeGy8zDyKFegpVV4y0qPBUgij10WNyKY6",
    "sha512": "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    "sha512-rounds": "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    "sha256": "$5$k2XAnEHBqQ1Ct2aM$rnCuOqWo.paDhUxsmHP0RfEIDdETSMulnLCs8sxkDq/",
}
Y = HASHES["yescrypt"]


def _shlex(s: str):
    try:
        return shlex.split(s)
    except ValueError as exc:
        return ("error", str(exc))


def _mine(s: str):
    try:
        return split_words(s)
    except ValueError as exc:
        return ("error", str(exc))


# ---- one reading, the parser's --------------------------------------------------------------

SHELLY = st.text(alphabet=st.sampled_from(list("ab :=$'\"\\\t\r\n\x0bé#")), max_size=24)


@settings(max_examples=3000, deadline=None)
@given(SHELLY)
def test_split_words_is_shlex_split(s):
    assert _mine(s) == _shlex(s)


@pytest.mark.parametrize("s", ["", "  ", "a b", "a''", "''", "'a b'c", '"a\\"b"', '"a\\b"', '"\\\\"', "a\\ b",
                               "'unclosed", '"unclosed', "trailing\\", '"esc\\', "'esc\\", 'x"y z"w'])
def test_split_words_cases(s):
    assert _mine(s) == _shlex(s)


# ---- the rule -------------------------------------------------------------------------------

CLEAR = [
    "USER username:a passwd:clear",
    "USER username:a passwd=clear",  # the parser takes both separators
    "USER username:a 'passwd:clear pw'",
    'USER username:a "passwd=clear"',
    "USER username:a pa''sswd:clear",  # quotes inside a word join it
    "USER username:a pass\\wd:clear",  # an escaped character
    "USER username:a \\\n    passwd:clear",  # a continuation line
    "USER username:a \\\n# a comment inside a continuation is part of it \\\n passwd:clear",
    "  USER   username:a   passwd:clear  ",
    "USER passwd:clear",  # no username: the parser refuses the line, the text is still in the op
    "USER username:a passwd:$6$mypassword",  # a prefix is not a hash
    "USER username:a passwd:",  # not a hash either
    "USER username:a passwd:" + Y + "x",
    "USER username:a passwd:" + Y + " passwd:again",  # twice: each is read
    "USER username:a 'unclosed passwd:clear",  # cannot be split: counts as clear
    'USER username:a "passwd:x\\',  # an escape that escapes nothing
    "NAME x\u2028USER username:a passwd:clear",  # every line break str.splitlines knows
]
NOT_A_PASSWORD = [
    "user username:a passwd:clear",  # lowercase: an unknown instruction for the parser
    "# USER username:a passwd:clear",
    "RUN echo USER passwd:clear",
    "RUN echo \\\nUSER username:a passwd:clear",  # inside RUN's continuation: not an instruction
    "USERS passwd:clear",
    "USER username:a passwd",  # no separator: no password
    "USER username:a password:clear",  # an unknown field (the parser refuses it), not passwd
    "ENV passwd:clear",
    "NAME USER passwd:clear",
]


@pytest.mark.parametrize("text", CLEAR)
def test_clear_passwords_are_found(text):
    problems = clear_passwords("NAME x\n" + text + "\nRUN true\n")
    assert problems and problems[0][0] == 2 + text.count("\u2028")
    assert all("clear" not in why.replace("in clear", "") for _, why in problems)  # never echoed


@pytest.mark.parametrize("text", NOT_A_PASSWORD)
def test_what_the_parser_reads_as_no_password_is_accepted(text):
    assert clear_passwords("NAME x\n" + text + "\n") == []


@pytest.mark.parametrize("name", sorted(HASHES))
def test_crypt_hashes_are_accepted(name):
    h = HASHES[name]
    assert is_crypt_hash(h)
    for text in (f"USER username:a passwd:{h}", f"USER username:a 'passwd:{h}'", f"USER username:a passwd={h}"):
        assert clear_passwords(text) == []
        assert parse("NAME x\n" + text).users[0].passwd == h


def test_a_hash_survives_the_canonical_form():
    text = README_EXAMPLE.replace("passwd:somepassword", f"passwd:{Y}")
    ff = parse(text)
    again = canonical(ff)
    assert f"'passwd:{Y}'" in again and clear_passwords(again) == [] and parse(again) == ff


USER_WORDS = st.sampled_from(["username:a", "passwd:x", "passwd=x", "'passwd:x y'", "pa''sswd:x", f"passwd:{Y}",
                              f"'passwd={Y}'", "sudo:yes", "'", '"', "\\", "passwd", "groups:a,b", "x=y:z"])
FORMFILES = st.lists(st.one_of(
    st.lists(USER_WORDS, min_size=1, max_size=5).map(lambda ws: "USER " + " ".join(ws)),
    st.sampled_from(["RUN true", "user passwd:x", "USER username:a \\", "# c \\", "", "COPY a b"]),
), max_size=6).map(lambda lines: "NAME x\n" + "\n".join(lines) + "\n")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FORMFILES)
def test_the_rule_sees_what_the_parser_sees(text):
    """Where the parser takes the Formfile, the rule finds a clear password exactly when a USER
    it parsed has one; where it refuses a USER line, the rule says which line it found."""
    problems = clear_passwords(text)
    try:
        ff = parse(text)
    except FormfileError as exc:
        user_errors = {no for no, msg in exc.errors if msg.startswith("USER")}
        assert {no for no, _ in problems} <= {no for no, _ in logical_lines(text)}
        for no, why in problems:
            if "cannot be split" in why:
                assert no in user_errors
        return
    clear = [u for u in ff.users if u.passwd is not None and not is_crypt_hash(u.passwd)]
    assert bool(clear) == bool(problems)


def test_a_32_kib_text_of_user_lines_is_cheap():
    hashed = f"USER username:alice 'passwd:{Y}' groups:a,b sudo:yes\n"
    text = (hashed * (32 * 1024 // len(hashed)))[: 32 * 1024 - 40]
    hostile = [
        text,
        text + "USER username:z passwd:clear\n",
        "USER " + "'a b' " * 5400,
        "USER " + "\\a" * 16000,
        "USER passwd:" + "x \\\n" * 8000,
        'USER "' + "\\a" * 16000,
        "RUN x\n" * 5400 + "USER passwd:x",
    ]
    for t in hostile:
        t = t[: 32 * 1024]
        start = time.perf_counter()
        clear_passwords(t)
        assert time.perf_counter() - start < 0.25, t[:40]  # ~2-15 ms here; shlex alone took ~35
    assert clear_passwords(text) == []
    assert [no for no, _ in clear_passwords(text + "USER username:z passwd:clear\n")] == [text.count("\n") + 1]


# ---- validity, through the store ------------------------------------------------------------

@pytest.mark.parametrize("path, field", [("/instance/create", "formfile"), ("/agents", "formfile"),
                                         ("/agents", "formfile_template"), ("/models", "formfile"),
                                         ("/models", "formfile_template")])
def test_every_formfile_field_refuses_a_clear_password(path, field):
    node, u = Node(Store()), User()
    body = {"name": "web", field: "NAME web\nUSER username:a passwd=s3cret\n"}
    with pytest.raises(Invalid) as exc:
        node.relay(u, "POST", path, body)
    assert exc.value.code == "bad_field"
    detail = exc.value.detail
    assert f"field '{field}': line 2: USER passwd is not a crypt hash" in detail
    assert "`form pack build/ship` does it for you" in detail and "mkpasswd -m yescrypt" in detail
    assert "s3cret" not in detail
    ok = node.relay(u, "POST", path, {"name": "web", field: f"NAME web\nUSER username:a passwd={Y}\n"}, ts=2)
    assert node.store.get(ok.kind, ok.key)[field].endswith(Y + "\n")


def test_an_update_cannot_bring_one_in_either():
    node, u = Node(Store()), User()
    op = node.relay(u, "POST", "/instance/create", {"name": "web"})
    with pytest.raises(Invalid, match="line 1: a USER line that cannot be split"):
        node.relay(u, "POST", f"/instance/{op.key}/update", {"formfile": "USER 'passwd:x"}, ts=2)


def test_a_peers_op_carrying_one_is_rejected_by_validity():
    """Not only a check where the op is made: a Byzantine node wrapping the request is refused."""
    u, relay = User(), PrivateKey()
    m, b, s = u.request("POST", "/instance/create", {"name": "web", "formfile": "USER username:a passwd:x"})
    from formation.crdt.intents import parse_request
    from formation.crdt.keys import parse_signature
    from formation.crdt.op import user_request

    _, intent = parse_request(user_request(m, b, parse_signature(s)))
    op = make_op(relay, "instance", intent.derived_id(), deps=[], hlc=1, request=(m, b, s))
    res = Store().ingest([op.wire])
    assert [r.code for r in res.rejected] == ["bad_field"]


# ---- the CLI's hashing ----------------------------------------------------------------------

SECRET = b"\x07" * 32


def test_sha512_crypt_matches_the_specifications_vectors():
    assert crypthash.sha512_crypt("Hello world!", "saltstring") == HASHES["sha512"]
    assert crypthash.sha512_crypt("Hello world!", "saltstringsaltstring", 10000) == HASHES["sha512-rounds"]


def test_yescrypt_through_libcrypt_verifies_with_libcrypt():
    h = crypthash.yescrypt("secret", b"0123456789abcdef")
    if h is None:
        pytest.skip("no libcrypt with yescrypt here")
    assert h.startswith("$y$") and is_crypt_hash(h)
    assert crypthash.yescrypt("secret", b"0123456789abcdef") == h  # the same salt bytes, the same hash
    # crypt(3) with the hash as its setting gives the hash again: what `passwd` checks at login
    import ctypes

    _, crypt_rn = crypthash._libcrypt()
    data = ctypes.create_string_buffer(crypthash.CRYPT_DATA_SIZE)
    assert crypt_rn(b"secret", h.encode(), data, crypthash.CRYPT_DATA_SIZE).decode() == h
    data = ctypes.create_string_buffer(crypthash.CRYPT_DATA_SIZE)
    assert crypt_rn(b"wrong", h.encode(), data, crypthash.CRYPT_DATA_SIZE).decode() != h


def test_without_libcrypt_the_hash_is_sha512_crypt(monkeypatch):
    monkeypatch.setattr(crypthash, "_libcrypt", lambda: None)
    h = crypthash.crypt_hash("secret", b"\x01" * 16)
    assert h.startswith("$6$") and is_crypt_hash(h)
    salt = h.split("$")[2]
    assert crypthash.sha512_crypt("secret", salt) == h


def test_hash_passwords_rewrites_only_clear_ones_and_keeps_every_line_number():
    text = ("NAME web\nUSER username:alice passwd=s3cret \\\n   sudo:yes\n"
            f"USER username:bob passwd:{Y}\n# USER passwd:comment\nRUN echo hi\nUSER username:carol 'passwd:two words'\n")
    out = crypthash.hash_passwords(text, SECRET)
    assert clear_passwords(out) == [] and "s3cret" not in out and "two words" not in out
    assert out.count("\n") == text.count("\n")
    before, after = parse(text), parse(out)
    assert [s.line for s in after.steps] == [s.line for s in before.steps]
    assert [u.username for u in after.users] == ["alice", "bob", "carol"]
    assert after.users[0].sudo and after.users[1].passwd == Y  # other words and hashes kept
    assert all(is_crypt_hash(u.passwd) for u in after.users)
    assert "# USER passwd:comment\nRUN echo hi\n" in out  # other lines untouched
    # deterministic for one client, Formfile NAME, user and password; different otherwise
    assert crypthash.hash_passwords(text, SECRET) == out
    assert crypthash.hash_passwords(text, b"\x08" * 32) != out
    assert crypthash.hash_passwords(text.replace("NAME web", "NAME other"), SECRET).split("\n")[1] != out.split("\n")[1]
    alice, carol = after.users[0].passwd, after.users[2].passwd
    assert alice != carol
    # nothing to do: the very same text
    assert crypthash.hash_passwords(README_EXAMPLE.replace("passwd:somepassword", ""), SECRET) == \
        README_EXAMPLE.replace("passwd:somepassword", "")


def test_hash_passwords_refuses_what_it_cannot_hash():
    with pytest.raises(crypthash.PasswordError, match="line 2: a USER line that cannot be split"):
        crypthash.hash_passwords("NAME x\nUSER username:a 'passwd:x\n", SECRET)


def test_the_readme_formfile_hashed_builds_the_same_image_text():
    """The image id hashes the canonical Formfile: the same client's text is the same each time."""
    a = canonical(parse(crypthash.hash_passwords(README_EXAMPLE, SECRET)))
    b = canonical(parse(crypthash.hash_passwords(README_EXAMPLE, SECRET)))
    assert a == b and "somepassword" not in a


# ---- MODEL ----------------------------------------------------------------------------------

def test_formfile_model_reads_the_model_line_as_the_parser_does():
    assert formfile_model(None) is None and formfile_model("NAME x\n") is None
    assert formfile_model("NAME x\nMODEL required:m1\n") == (2, "m1", True)
    assert formfile_model("MODEL preferred:llama-3.1\n") == (1, "llama-3.1", False)
    assert formfile_model("# MODEL required:x\nmodel required:y\nMODEL\nMODEL preferred:z\nMODEL required:w") == \
        (4, "z", False)  # the parser's first MODEL with an argument
    for bad in ("MODEL llama", "MODEL needed:x", "MODEL required:", "MODEL required:a:b", "MODEL required:a b",
                "MODEL required:" + "x" * 65):
        with pytest.raises(ValueError, match="line 1: MODEL"):
            formfile_model(bad)
    assert parse("NAME x\nMODEL required:m1\n").model == ("required", "m1")


@pytest.mark.parametrize("path, kind", [("/instance/create", "instance"), ("/agents", "agent")])
def test_the_records_model_is_its_formfiles(path, kind):
    node, u = Node(Store()), User()
    op = node.relay(u, "POST", path, {"name": "web", "formfile": "NAME web\nMODEL required:m1\n"})
    rec = node.store.get(kind, op.key)
    assert (rec["model_id"], rec["model_required"]) == ("m1", True)
    update = f"/instance/{op.key}/update" if kind == "instance" else f"/agents/{op.key}"
    method = "POST" if kind == "instance" else "PUT"
    node.relay(u, method, update, {"formfile": "NAME web\nMODEL preferred:m2\n"}, ts=2)
    rec = node.store.get(kind, op.key)
    assert (rec["model_id"], rec["model_required"]) == ("m2", False)
    node.relay(u, method, update, {"description": "d"}, ts=3)  # other fields: the binding stays
    assert node.store.get(kind, op.key)["model_id"] == "m2"
    node.relay(u, method, update, {"formfile": "NAME web\n"}, ts=4)
    rec = node.store.get(kind, op.key)
    assert (rec["model_id"], rec["model_required"]) == (None, False)
    # derived, never set by a request
    with pytest.raises(Invalid, match="'model_id'"):
        node.relay(u, method, update, {"model_id": "m9"}, ts=5)
    with pytest.raises(Invalid, match="line 2: MODEL"):
        node.relay(u, method, update, {"formfile": "NAME web\nMODEL required:a b\n"}, ts=6)


def test_agent_model_fields_are_not_settable_but_are_shown():
    k = get_kind("agent")
    assert "model_id" not in k.settable and "model_required" not in k.settable
    assert "model_id" in k.record.__dataclass_fields__
