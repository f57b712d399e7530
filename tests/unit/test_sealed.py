"""Secrets sealed to a node's key (formation/sealed.py): only that key opens a box, only for the
secret and node it was made for, and only with the content the owner committed to."""

from __future__ import annotations

import base64

import pytest

from formation import sealed
from formation.crdt.keys import PrivateKey, format_address

IID = "a" * 32


def _node():
    key = PrivateKey()
    return key, key.public_key.format(compressed=True), format_address(key.address)


def test_a_box_opens_with_its_nodes_key_and_gives_the_committed_value():
    key, pub, addr = _node()
    plain = sealed.Plain.new(b"s3cr3t value")
    commit = sealed.commitment(IID, "API_KEY", plain)
    box = sealed.seal(plain, pub, instance_id=IID, name="API_KEY", target=addr)
    opened = sealed.unseal(key.secret, box, instance_id=IID, name="API_KEY", target=addr, commit=commit)
    assert opened == plain
    assert b"s3cr3t" not in base64.b64decode(box)
    # a second seal of the same value differs (fresh ephemeral key and nonce)
    assert sealed.seal(plain, pub, instance_id=IID, name="API_KEY", target=addr) != box


def test_another_key_another_secret_or_another_node_cannot_use_the_box():
    key, pub, addr = _node()
    other, _, other_addr = _node()
    plain = sealed.Plain.new(b"v")
    commit = sealed.commitment(IID, "A", plain)
    box = sealed.seal(plain, pub, instance_id=IID, name="A", target=addr)
    with pytest.raises(sealed.SealError, match="does not open"):
        sealed.unseal(other.secret, box, instance_id=IID, name="A", target=other_addr, commit=commit)
    for iid, name, target in (("b" * 32, "A", addr), (IID, "B", addr), (IID, "A", other_addr)):
        with pytest.raises(sealed.SealError):
            sealed.unseal(key.secret, box, instance_id=iid, name=name, target=target,
                          commit=sealed.commitment(iid, name, plain))


def test_a_box_whose_content_is_not_what_the_owner_committed_to_is_refused():
    """What a node that never held the value would make: a valid box of something else."""
    key, pub, addr = _node()
    committed = sealed.commitment(IID, "A", sealed.Plain.new(b"the owner's value"))
    forged = sealed.seal(sealed.Plain.new(b"the attacker's value"), pub, instance_id=IID, name="A", target=addr)
    with pytest.raises(sealed.SealError, match="commitment"):
        sealed.unseal(key.secret, forged, instance_id=IID, name="A", target=addr, commit=committed)


@pytest.mark.parametrize("box", ["", "not base64!", base64.b64encode(b"\x01short").decode(),
                                 base64.b64encode(b"\x02" + bytes(200)).decode(),
                                 base64.b64encode(b"\x01" + b"\x07" * 33 + bytes(100)).decode()])
def test_damaged_boxes_raise_seal_error_not_anything_else(box):
    key, _, addr = _node()
    with pytest.raises(sealed.SealError):
        sealed.unseal(key.secret, box, instance_id=IID, name="A", target=addr, commit="0" * 64)


def test_names_and_sizes_are_checked():
    assert sealed.check_name("DB_PASSWORD") == "DB_PASSWORD"
    for bad in ("", "1X", "A-B", "A B", "x" * 65, "É"):
        with pytest.raises(ValueError):
            sealed.check_name(bad)
    with pytest.raises(ValueError, match="at most"):
        sealed.Plain.new(b"x" * (sealed.MAX_VALUE + 1))
