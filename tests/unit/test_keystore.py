"""The keystore (the operator's key and the wallet): encryption round trip, failure messages,
file handling, passwords."""

import json
import os
import stat
import time
import unicodedata

import pytest

from formation import keystore
from formation.crdt.keys import PrivateKey, format_address
from formation.keystore import (
    KeystoreError,
    create_keystore,
    load_keystore,
    resolve_password,
)

SECRET = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")


@pytest.fixture(autouse=True)
def _no_password_env(monkeypatch):
    # The developer's shell may export it; every test states its own password source.
    monkeypatch.delenv("FORMATION_PASSWORD", raising=False)


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "operator.key"


def _edit(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _assert_clean(exc_info):
    # "never a traceback of cryptography internals": the chained context is suppressed
    assert exc_info.value.__cause__ is None
    assert exc_info.value.__suppress_context__ or exc_info.value.__context__ is None


# ---- round trip -------------------------------------------------------------------------------


def test_roundtrip_with_given_secret(store_path):
    key = create_keystore(store_path, "correct horse", SECRET)
    assert key.secret == SECRET
    loaded = load_keystore(store_path, "correct horse")
    assert loaded.secret == SECRET
    assert loaded.address == PrivateKey(SECRET).address


def test_roundtrip_with_new_random_key(tmp_path):
    a = create_keystore(tmp_path / "a.key", "pw")
    b = create_keystore(tmp_path / "b.key", "pw")
    assert a.address != b.address
    assert load_keystore(tmp_path / "a.key", "pw").secret == a.secret


def test_file_format(store_path):
    key = create_keystore(store_path, "pw", SECRET)
    doc = json.loads(store_path.read_text())
    assert doc["version"] == 1
    assert doc["address"] == format_address(key.address)
    assert doc["address"] == doc["address"].lower() and doc["address"].startswith("0x")
    assert doc["kdf"] == {"name": "scrypt", "n": 2**15, "r": 8, "p": 1, "salt": doc["kdf"]["salt"]}
    assert len(bytes.fromhex(doc["kdf"]["salt"])) == 16
    assert doc["cipher"]["name"] == "aes-256-gcm"
    assert len(bytes.fromhex(doc["cipher"]["nonce"])) == 12
    assert SECRET.hex() not in store_path.read_text()


def test_same_key_and_password_give_different_files(tmp_path):
    create_keystore(tmp_path / "a.key", "pw", SECRET)
    create_keystore(tmp_path / "b.key", "pw", SECRET)
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.key", "b.key"))
    assert a["kdf"]["salt"] != b["kdf"]["salt"]
    assert a["cipher"]["ciphertext"] != b["cipher"]["ciphertext"]


def test_unicode_forms_of_one_password_unlock_the_same_file(store_path):
    composed = unicodedata.normalize("NFC", "pässwörd")
    decomposed = unicodedata.normalize("NFD", "pässwörd")
    assert composed != decomposed
    create_keystore(store_path, decomposed, SECRET)
    assert load_keystore(store_path, composed).secret == SECRET


# ---- failures ---------------------------------------------------------------------------------


def test_wrong_password(store_path):
    create_keystore(store_path, "right", SECRET)
    with pytest.raises(KeystoreError) as exc_info:
        load_keystore(store_path, "wrong")
    assert str(exc_info.value) == f"wrong password for keystore {store_path}"
    _assert_clean(exc_info)


def test_missing_file(store_path):
    with pytest.raises(KeystoreError, match="does not exist") as exc_info:
        load_keystore(store_path, "pw")
    assert str(store_path) in str(exc_info.value)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not valid JSON"),
        (b"{\"version\": 1, \"addr", "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"[1, 2, 3]", "JSON object"),
    ],
)
def test_unreadable_content(store_path, content, reason):
    store_path.write_bytes(content)
    with pytest.raises(KeystoreError) as exc_info:
        load_keystore(store_path, "pw")
    message = str(exc_info.value)
    assert str(store_path) in message and "corrupt" in message and reason in message
    _assert_clean(exc_info)


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda d: d.pop("cipher"), "cipher"),
        (lambda d: d["cipher"].update(ciphertext="zz"), "cipher.ciphertext"),
        (lambda d: d["cipher"].update(ciphertext=d["cipher"]["ciphertext"][:-2]), "48 bytes"),
        (lambda d: d["cipher"].update(nonce="00"), "cipher.nonce"),
        (lambda d: d["kdf"].update(name="pbkdf2"), "scrypt"),
        (lambda d: d["kdf"].update(n=3), "scrypt parameters"),
        (lambda d: d["kdf"].update(r="8"), "kdf.r"),
        (lambda d: d.update(address="b61987fd549666579431db334492eb9cccf9dc6e"), "0x"),
        (lambda d: d.update(version="1"), "version"),
    ],
)
def test_damaged_fields_name_what_is_wrong(store_path, change, reason):
    create_keystore(store_path, "pw", SECRET)
    _edit(store_path, change)
    with pytest.raises(KeystoreError) as exc_info:
        load_keystore(store_path, "pw")
    message = str(exc_info.value)
    assert str(store_path) in message and reason in message


def test_future_version_is_named(store_path):
    create_keystore(store_path, "pw", SECRET)
    _edit(store_path, lambda d: d.update(version=2))
    with pytest.raises(KeystoreError, match="version 2"):
        load_keystore(store_path, "pw")


def test_hostile_kdf_cost_is_refused_without_running_it(store_path):
    create_keystore(store_path, "pw", SECRET)
    _edit(store_path, lambda d: d["kdf"].update(n=2**30))
    started = time.monotonic()
    with pytest.raises(KeystoreError, match="out of range"):
        load_keystore(store_path, "pw")
    assert time.monotonic() - started < 1


def test_edited_address_is_detected(store_path):
    create_keystore(store_path, "pw", SECRET)
    other = format_address(PrivateKey(b"\x22" * 32).address)
    _edit(store_path, lambda d: d.update(address=other))
    with pytest.raises(KeystoreError, match="address field") as exc_info:
        load_keystore(store_path, "pw")
    assert "corrupt" in str(exc_info.value)


def test_flipped_ciphertext_bit_fails_authentication(store_path):
    create_keystore(store_path, "pw", SECRET)

    def flip(d):
        ct = bytearray(bytes.fromhex(d["cipher"]["ciphertext"]))
        ct[0] ^= 1
        d["cipher"]["ciphertext"] = ct.hex()

    _edit(store_path, flip)
    with pytest.raises(KeystoreError, match="wrong password"):
        load_keystore(store_path, "pw")


# ---- writing the file -------------------------------------------------------------------------


def test_refuses_to_overwrite(store_path):
    create_keystore(store_path, "pw", SECRET)
    before = store_path.read_bytes()
    with pytest.raises(KeystoreError, match="already exists") as exc_info:
        create_keystore(store_path, "other", b"\x22" * 32)
    assert str(store_path) in str(exc_info.value)
    assert store_path.read_bytes() == before


def test_mode_is_0600_whatever_the_umask(store_path):
    old = os.umask(0)
    try:
        create_keystore(store_path, "pw", SECRET)
    finally:
        os.umask(old)
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600


def test_no_temporary_files_left(store_path):
    create_keystore(store_path, "pw", SECRET)
    assert sorted(p.name for p in store_path.parent.iterdir()) == ["operator.key"]


def test_missing_directory_is_a_keystore_error(tmp_path):
    path = tmp_path / "nope" / "operator.key"
    with pytest.raises(KeystoreError, match="cannot write keystore") as exc_info:
        create_keystore(path, "pw", SECRET)
    assert str(path) in str(exc_info.value)


def test_invalid_secret_and_empty_password_are_refused(store_path):
    with pytest.raises(KeystoreError, match="not a valid secp256k1"):
        create_keystore(store_path, "pw", b"\x00" * 32)
    with pytest.raises(KeystoreError, match="32 bytes"):
        create_keystore(store_path, "pw", b"\x01" * 31)
    with pytest.raises(KeystoreError, match="empty password"):
        create_keystore(store_path, "", SECRET)
    assert not store_path.exists()


# ---- where the password comes from ------------------------------------------------------------


def test_env_var_wins_over_password_file(monkeypatch, tmp_path):
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    monkeypatch.setenv("FORMATION_PASSWORD", "from-env")
    assert resolve_password(str(pw_file), prompt=False, confirm=False) == "from-env"


def test_password_file_when_no_env(tmp_path):
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    assert resolve_password(str(pw_file), prompt=False, confirm=False) == "from-file"
    pw_file.write_text("  spaced  \r\n")  # only the line ending is dropped
    assert resolve_password(str(pw_file), prompt=False, confirm=False) == "  spaced  "


def test_password_file_wins_over_prompt(monkeypatch, tmp_path):
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file")
    monkeypatch.setattr(keystore, "stdin_is_tty", lambda: True)
    monkeypatch.setattr(keystore.getpass, "getpass", lambda prompt="": pytest.fail("prompted"))
    assert resolve_password(str(pw_file), prompt=True, confirm=True) == "from-file"


def test_missing_or_empty_password_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(KeystoreError, match="does not exist") as exc_info:
        resolve_password(str(missing), prompt=False, confirm=False)
    assert str(missing) in str(exc_info.value)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(KeystoreError, match="is empty") as exc_info:
        resolve_password(str(empty), prompt=False, confirm=False)
    assert str(empty) in str(exc_info.value)


def test_empty_env_var_is_an_error(monkeypatch):
    monkeypatch.setenv("FORMATION_PASSWORD", "")
    with pytest.raises(KeystoreError, match="FORMATION_PASSWORD is set but empty"):
        resolve_password(None, prompt=False, confirm=False)


def test_no_source_explains_the_three_ways(monkeypatch):
    monkeypatch.setattr(keystore, "stdin_is_tty", lambda: False)
    for prompt in (False, True):  # prompt allowed but no terminal: same answer
        with pytest.raises(KeystoreError) as exc_info:
            resolve_password(None, prompt=prompt, confirm=False)
        message = str(exc_info.value)
        assert "FORMATION_PASSWORD" in message
        assert "password_file" in message
        assert "terminal" in message


def test_a_wallet_has_no_password_file_to_suggest(monkeypatch):
    monkeypatch.setattr(keystore, "stdin_is_tty", lambda: False)
    with pytest.raises(KeystoreError) as exc_info:
        resolve_password(None, prompt=True, confirm=False, what="the wallet /w.json")
    assert str(exc_info.value) == (
        "no password for the wallet /w.json; provide one in one of two ways: set the "
        "FORMATION_PASSWORD environment variable, or run form in a terminal to be prompted")
    assert not keystore.password_available()
    monkeypatch.setenv("FORMATION_PASSWORD", "pw")
    assert keystore.password_available()


def test_the_prompt_names_the_keystore(monkeypatch):
    prompts = []
    monkeypatch.setattr(keystore, "stdin_is_tty", lambda: True)
    monkeypatch.setattr(keystore.getpass, "getpass", lambda prompt="": prompts.append(prompt) or "pw")
    assert resolve_password(None, prompt=True, confirm=False, what="the wallet /w.json") == "pw"
    assert resolve_password(None, prompt=True, confirm=False) == "pw"
    assert prompts == ["Password for the wallet /w.json: ", "Password for the operator keystore: "]


def _answers(monkeypatch, *answers):
    replies = iter(answers)
    monkeypatch.setattr(keystore, "stdin_is_tty", lambda: True)
    monkeypatch.setattr(keystore.getpass, "getpass", lambda prompt="": next(replies))


def test_prompt(monkeypatch):
    _answers(monkeypatch, "typed")
    assert resolve_password(None, prompt=True, confirm=False) == "typed"


def test_prompt_with_confirmation(monkeypatch):
    _answers(monkeypatch, "typed", "typed")
    assert resolve_password(None, prompt=True, confirm=True) == "typed"
    _answers(monkeypatch, "typed", "tpyed")
    with pytest.raises(KeystoreError, match="do not match"):
        resolve_password(None, prompt=True, confirm=True)
    _answers(monkeypatch, "")
    with pytest.raises(KeystoreError, match="empty password"):
        resolve_password(None, prompt=True, confirm=False)
