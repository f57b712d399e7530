"""Op encoding and verification: every kind of bad input is refused with a clear reason."""

import msgpack
import pytest

from formation.crdt import codec
from formation.crdt.keys import PrivateKey, sha256
from formation.crdt.op import MAX_OP_BYTES, OpError, decode_op, make_op
from formation.crdt.store import Store

K = PrivateKey(b"\x01" * 32)
ADDR = "0x" + K.address.hex()


def node_op(**kw):
    args = dict(deps=[], hlc=5, value={"address": ADDR})
    args.update(kw)
    return make_op(K, "node", ADDR, **args)


def test_roundtrip_and_id():
    op = node_op()
    again = decode_op(op.wire)
    assert again == op
    assert op.id == sha256(op.wire)
    assert op.author == K.address


def _resign(body_fields):
    """Re-sign a hand-made body with K, to reach the checks behind the signature."""
    from formation.crdt.keys import eip191_hash

    body = msgpack.packb(body_fields, use_bin_type=True)
    sig = K.sign_digest(eip191_hash(sha256(body)))
    return msgpack.packb([body, sig], use_bin_type=True)


GOOD = [2, "node", ADDR, K.address, [], [], 5, [0, {"address": ADDR}]]


@pytest.mark.parametrize(
    "mutate, code, words",
    [
        (lambda w: w[: len(w) // 2], "malformed", "incomplete"),
        (lambda w: b"\xc1" + w, "malformed", "not valid msgpack"),
        (lambda w: b"", "malformed", "empty"),
        (lambda w: b"hello world", "malformed", ""),
        (lambda w: w + b"\x00", "malformed", "trailing"),
        (lambda w: msgpack.packb({"op": w}), "malformed", "envelope"),
        (lambda w: msgpack.packb([b"\x93", bytes(64) + b"\x00"]), "malformed", "op body"),
        (lambda w: b"\x00" * (MAX_OP_BYTES + 1), "too_large", "over the limit"),
    ],
)
def test_garbage_is_refused(mutate, code, words):
    with pytest.raises(OpError) as exc:
        decode_op(mutate(node_op().wire))
    assert exc.value.code == code
    assert words in str(exc.value)


@pytest.mark.parametrize(
    "index, value, words",
    [
        (0, 1, "unsupported op version"),
        (1, 7, "kind must be a string"),
        (2, "", "key must be a string"),
        (3, b"short", "author must be a 20-byte"),
        (4, [b"x"], "32-byte hashes"),
        (4, [b"\x02" * 32, b"\x01" * 32], "sorted"),
        (5, [b"\x01" * 32], "every prev must also be a dep"),
        (6, -1, "hlc must be an integer in 1"),
        (6, 0, "hlc must be an integer in 1"),
        (6, 2**62, "hlc must be an integer in 1"),
        (6, "5", "hlc must be an integer in 1"),
        (7, [9, 1], "payload must be"),
        (7, [1, "m", b"", b"short"], "65-byte signature"),
    ],
)
def test_wrongly_typed_fields_are_refused(index, value, words):
    fields = list(GOOD)
    fields[index] = value
    with pytest.raises(OpError, match=words):
        decode_op(_resign(fields))


def test_unsorted_map_is_not_canonical():
    fields = list(GOOD)
    body = msgpack.packb(fields[:7], use_bin_type=True)
    # hand-build a payload whose map keys are out of order
    bad = _resign(fields[:7] + [[0, {"z": 1, "a": 2}]])
    assert body  # sanity
    with pytest.raises(OpError, match="canonical"):
        decode_op(bad)


def test_bad_signature_and_wrong_author():
    op = node_op()
    body, sig = msgpack.unpackb(op.wire)
    flipped = msgpack.packb([body, sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]], use_bin_type=True)
    with pytest.raises(OpError) as exc:
        decode_op(flipped)
    assert exc.value.code in ("bad_signature", "malformed")
    other = PrivateKey()
    fields = list(GOOD)
    fields[3] = other.address  # claims another author, signed by K
    with pytest.raises(OpError, match="not made by its author"):
        decode_op(_resign(fields))


def test_high_s_signature_is_refused():
    op = node_op()
    body, sig = msgpack.unpackb(op.wire)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(sig[32:64], "big")
    malleated = sig[:32] + (n - s).to_bytes(32, "big") + bytes([sig[64] ^ 1])
    with pytest.raises(OpError, match="low s"):
        decode_op(msgpack.packb([body, malleated], use_bin_type=True))


def test_bad_input_stores_nothing():
    store = Store()
    good = node_op()
    bad = [good.wire[:-3], b"\x93\x01\x02", codec.pack_trusted([b"x", b"y"]), b"\xff" * 100]
    res = store.ingest(bad)
    assert len(res.rejected) == len(bad)
    assert all(r.code == "malformed" for r in res.rejected)
    assert len(store) == 0
    assert store.log.db.execute("SELECT count(*) FROM ops").fetchone()[0] == 0
    assert store.ingest([good.wire]).accepted == [good.id]


def test_canonical_rejects_what_it_cannot_encode():
    deep = [1]
    for _ in range(20):
        deep = [deep]
    for bad in (float("nan"), {1: 2}, object(), 2**64, deep):
        with pytest.raises(codec.CodecError):
            codec.pack(bad)
