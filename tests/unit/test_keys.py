import hashlib

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from formation.crdt import keys
from formation.crdt.keys import PrivateKey, SignatureError

SECRET = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
SIG_SOME_DATA = (
    "0xb91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd6007e74cd8"
    "2e037b800186422fc2da167c747ef045e5d18a5f5d4300f8e1a0291c"
)


def test_keccak_is_not_nist_sha3():
    empty = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert keys.keccak256(b"").hex() == empty
    assert keys.keccak256_portable(b"").hex() == empty
    assert hashlib.sha3_256(b"").hexdigest() != empty
    for data in (b"a", b"x" * 200, bytes(range(256))):
        assert keys.keccak256(data) == keys.keccak256_portable(data)


def test_published_vector_address_and_signature():
    k = PrivateKey.from_hex(SECRET)
    assert keys.to_checksum(k.address) == ADDRESS
    assert "0x" + k.personal_sign(b"Some data").hex() == SIG_SOME_DATA
    assert keys.recover_personal(b"Some data", SIG_SOME_DATA) == k.address


def test_our_signatures_verify_in_eth_account_and_theirs_here():
    ours = PrivateKey()
    msg = b"POST /v1/models 1700000000 " + b"ab" * 32
    sig = ours.personal_sign(msg)
    assert Account.recover_message(encode_defunct(msg), signature=sig) == keys.to_checksum(ours.address)
    acct = Account.create()
    signed = Account.sign_message(encode_defunct(msg), private_key=acct.key)
    assert keys.to_checksum(keys.recover_personal(msg, signed.signature)) == acct.address
    # the same signature given as 64 bytes + a separate recovery id
    rs, v = bytes(signed.signature[:64]), signed.signature[64]
    assert keys.to_checksum(keys.recover_personal(msg, rs, v - 27)) == acct.address


def test_tampered_message_recovers_someone_else():
    k = PrivateKey.from_hex(SECRET)
    assert keys.recover_personal(b"Some datA", SIG_SOME_DATA) != k.address


@pytest.mark.parametrize(
    "sig, rid, why",
    [
        ("zz" * 65, None, "not hexadecimal"),
        ("00" * 10, None, "65 bytes"),
        ("00" * 64, None, "needs a recovery id"),
        (SIG_SOME_DATA[:-2] + "05", None, "must be 0, 1, 27 or 28"),
        (SIG_SOME_DATA, 0, "does not match"),
        ("00" * 65, None, "does not recover"),
    ],
)
def test_bad_signatures_say_why(sig, rid, why):
    with pytest.raises(SignatureError, match=why):
        keys.recover_personal(b"Some data", sig, rid)


def test_addresses_parse_and_format():
    raw = keys.parse_address(ADDRESS)
    assert keys.format_address(raw) == ADDRESS.lower()
    assert keys.parse_address(ADDRESS.lower()[2:]) == raw
    for bad in ("0x123", "0x" + "g" * 40, 42):
        with pytest.raises(ValueError):
            keys.parse_address(bad)


def test_private_key_repr_hides_secret():
    k = PrivateKey.from_hex(SECRET)
    assert SECRET[2:] not in repr(k)
    with pytest.raises(ValueError):
        PrivateKey(b"\x00" * 32)
