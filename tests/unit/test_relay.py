"""Relays without interfaces (formation/mesh/relay.py): when a direct tunnel counts as up or down,
what a node publishes, which relay both ends of a pair pick, and how the peers' allowed IPs move;
the choice between the kernel's WireGuard and wireguard-go (backend.py) with the kernel probe
faked, since no machine here has the module. Three real hosts relaying: tests/integration/test_relay.py."""

from __future__ import annotations

import base64
import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formation.crdt.kinds.node_kinds import Peer
from formation.crdt.schema import RecordError
from formation.mesh import backend, keys, relay
from formation.mesh.relay import (
    HANDSHAKE_STALE,
    HOLD,
    PROBE_IDLE,
    PROBE_TIMEOUT,
    RETRY_DIRECT,
    STABLE,
    Link,
    apply_plan,
    choose_relay,
    relay_plan,
    track,
)
from formation.mesh.uapi import PeerChange, PeerConfig, UapiError, parse_dump, wg_set_args
from formation.mesh.wggo import MeshError

WALL = 1_000_000


def member(i: int) -> str:
    return f"0x{i:040x}"


def pub(i: int) -> bytes:
    return keys.public_of(bytes([i]) * 32)


def step(link, *, t: float, hs: int = 0, rx: int = 0, direct: bool = True):
    return track(link, last_handshake=hs, rx_bytes=rx, now=t, wall=WALL + int(t), direct=direct)


# ---- one link ---------------------------------------------------------------------------------

def test_a_link_is_up_with_a_handshake_and_probed_when_silent():
    s = step(None, t=0)
    assert not s.link.live and not s.probe and not s.remake
    s = step(s.link, t=1, hs=WALL + 1, rx=148)
    assert s.link.live
    s = step(s.link, t=1 + PROBE_IDLE - 1, hs=WALL + 1, rx=148)
    assert s.link.live and not s.probe  # something came lately
    s = step(s.link, t=1 + PROBE_IDLE, hs=WALL + 1, rx=148)
    assert s.link.live and s.probe and s.link.probe_at == 1 + PROBE_IDLE
    s = step(s.link, t=1 + PROBE_IDLE + 5, hs=WALL + 1, rx=180)  # answered
    assert s.link.live and s.link.probe_at is None and not s.probe


def test_a_relayed_link_is_not_probed():
    """A probe goes to the peer's overlay address: through the relay, it would test the relay."""
    s = step(step(None, t=0).link, t=1, hs=WALL + 1, rx=1)
    s = step(s.link, t=100, hs=WALL + 99, rx=1, direct=False)
    assert s.link.live and not s.probe


def test_an_unanswered_probe_takes_the_link_down_and_it_is_held_down():
    s = step(step(None, t=0).link, t=1, hs=WALL + 1, rx=1)
    s = step(s.link, t=20, hs=WALL + 1, rx=1)
    assert s.probe
    s = step(s.link, t=20 + PROBE_TIMEOUT - 1, hs=WALL + 1, rx=1)
    assert s.link.live and s.probe  # probed again while not answered, first probe kept
    assert s.link.probe_at == 20
    s = step(s.link, t=20 + PROBE_TIMEOUT, hs=WALL + 1, rx=1)
    assert not s.link.live and s.link.falls == 1
    fell = 20 + PROBE_TIMEOUT
    # a handshake from before the fall does not bring it back; a newer one does, after the hold
    s = step(s.link, t=fell + HOLD + 1, hs=WALL + 1, rx=1)
    assert not s.link.live
    s = step(s.link, t=fell + 5, hs=WALL + int(fell) + 3, rx=9)
    assert not s.link.live  # held
    s = step(s.link, t=fell + HOLD, hs=WALL + int(fell) + 3, rx=9)
    assert s.link.live and s.link.falls == 1


def test_the_hold_doubles_with_each_fall_and_is_forgotten_once_stable():
    link = Link(since=0.0)
    for falls, hold in ((1, HOLD), (2, 2 * HOLD), (3, 4 * HOLD)):
        link = Link(since=0.0, live=True, up_at=1.0, rx_at=1.0, falls=falls - 1)
        s = track(link, last_handshake=0, rx_bytes=0, now=2.0, wall=WALL, direct=True)
        assert not s.link.live and s.link.falls == falls and s.link.hold() == hold
    assert Link(since=0.0, falls=50).hold() == relay.MAX_HOLD
    long_up = Link(since=0.0, live=True, up_at=1.0, rx_at=1.0, falls=4)
    s = track(long_up, last_handshake=0, rx_bytes=0, now=1 + STABLE, wall=WALL, direct=True)
    assert s.link.falls == 1


def test_a_stale_handshake_takes_a_link_down():
    s = step(step(None, t=0).link, t=1, hs=WALL + 1, rx=1)
    s = step(s.link, t=HANDSHAKE_STALE + 2, hs=WALL + 1, rx=50)  # rx moved, handshake stale
    assert not s.link.live


def test_a_link_down_is_made_anew_every_so_often_and_a_new_entry_counts_as_rx():
    s = step(None, t=0)
    assert not step(s.link, t=RETRY_DIRECT - 1).remake  # a new peer first gets its tries
    assert step(s.link, t=RETRY_DIRECT).remake
    link = Link(since=0.0, falls=1, fell_at=WALL, rx=500)
    s = track(link, last_handshake=WALL - 30, rx_bytes=500, now=HOLD - 1, wall=WALL + 19, direct=False)
    assert not s.remake  # held
    s = track(s.link, last_handshake=WALL - 30, rx_bytes=500, now=HOLD, wall=WALL + 20, direct=False)
    assert s.remake and s.link.remade_at == HOLD
    s = track(s.link, last_handshake=WALL - 30, rx_bytes=0, now=HOLD + 5, wall=WALL + 25, direct=False)
    assert not s.remake and s.link.rx == 0 and s.link.rx_at == HOLD + 5
    s = track(s.link, last_handshake=WALL - 30, rx_bytes=0, now=HOLD + RETRY_DIRECT, wall=WALL + 40, direct=False)
    assert s.remake
    # the new entry's handshake brings it back
    s = track(s.link, last_handshake=WALL + 41, rx_bytes=92, now=HOLD + RETRY_DIRECT + 1, wall=WALL + 41,
              direct=False)
    assert s.link.live and not s.remake


def test_a_new_link_is_trying_for_its_deadline_and_never_after_a_fall():
    link = step(None, t=10).link
    assert link.trying(29, 20) and not link.trying(30, 20)
    assert not Link(since=10.0, falls=1).trying(11, 20)
    live = step(link, t=11, hs=WALL + 11, rx=1).link
    assert live.trying(12, 20)  # up or not: the lists may not have caught up yet


# ---- what a node publishes --------------------------------------------------------------------

def test_reaches_lists_live_links_sorted_and_bounded_keeping_peers_still_tried():
    up = Link(since=0.0, live=True)
    down = Link(since=0.0)
    links = {member(3): up, member(1): up, member(2): down, member(4): down}
    assert relay.reaches(links, [member(2), member(4), member(9)], trying={member(2)}) == \
        [member(1), member(2), member(3)]
    many = {member(i): up for i in range(relay.MAX_REACHES + 10)}
    out = relay.reaches(many, [], ())
    assert len(out) == relay.MAX_REACHES and out == sorted(out)


def test_a_full_list_says_nothing_of_the_members_past_its_end():
    """In a fog larger than MAX_REACHES, a pair past the end of a full list is taken as direct
    (not relayed for want of a place in the list), and such silence never makes a relay."""
    big = [member(i) for i in range(1, relay.MAX_REACHES + 3)]
    a, far, r = big[0], big[-1], big[1]
    claims = {m: [o for o in big if o != m][:relay.MAX_REACHES] for m in big}
    assert far not in claims[a] and relay.direct(a, far, claims)
    assert relay_plan(a, big, claims) == {}
    claims[a] = [o for o in claims[a] if o != big[5]]  # no longer full: its silence counts
    assert not relay.direct(a, far, claims) and not relay.direct(a, big[5], claims)
    assert relay_plan(a, big, claims)[big[5]] not in (None, far)  # far lists nobody past it
    assert choose_relay(a, far, big, claims) is None  # far is listed by no full list
    assert r in claims[a]


def test_the_peer_record_takes_a_sorted_bounded_list_of_addresses():
    base = {"address": member(1), "public_key": keys.b64(pub(1)), "overlay_ip": "10.42.0.1"}
    assert Peer.normalize(base)["reaches"] == []
    assert Peer.normalize({**base, "reaches": [member(2), member(3)]})["reaches"] == [member(2), member(3)]
    for bad, what in (([member(3), member(2)], "sorted"), ([member(2), member(2)], "duplicates"),
                      (["10.42.0.2"], "item 0"), ("0x" + "1" * 40, "list"),
                      ([member(i) for i in range(relay.MAX_REACHES + 1)], "at most")):
        with pytest.raises(RecordError, match=what):
            Peer.normalize({**base, "reaches": bad})


# ---- which relay ------------------------------------------------------------------------------

A, X, R1, R2, M = (member(i) for i in (1, 2, 3, 4, 5))


def full(*ms: str) -> dict[str, list[str]]:
    return {m: [o for o in ms if o != m] for m in ms}


def test_both_ends_of_a_broken_pair_pick_the_same_relay_and_a_direct_pair_none():
    claims = full(A, X, R1, R2)
    claims[A].remove(X)  # A has lost X
    members = [A, X, R1, R2]
    assert relay_plan(A, members, claims) == {X: choose_relay(A, X, members, claims)}
    assert relay_plan(X, members, claims) == {A: choose_relay(A, X, members, claims)}
    assert choose_relay(A, X, members, claims) == choose_relay(X, A, list(reversed(members)), claims)
    assert relay_plan(R1, members, claims) == {}  # its pairs are direct
    expected = min((R1, R2), key=lambda r: hashlib.sha256(f"relay:{A}|{X}|{r}".encode()).digest())
    assert choose_relay(A, X, members, claims) == expected
    # a peer still in its first tries is not relayed yet
    assert relay_plan(A, members, claims, trying={X}) == {}


def test_a_relay_must_have_direct_pairs_with_both_ends_and_a_claim_alone_attracts_nothing():
    members = [A, X, R1, M]
    claims = full(A, X, R1)
    claims[A].remove(X)
    claims[X].remove(A)
    claims[R1].remove(X)  # R1 no longer reaches X
    claims[M] = [A, X, R1, member(77)]  # M claims everyone; nobody lists M
    assert choose_relay(A, X, members, claims) is None
    assert relay_plan(A, members, claims) == {}  # no relay: stays on the direct entry, still tried
    claims[X].append(M)  # X reaches M, A does not: still not M
    assert choose_relay(A, X, members, claims) is None
    claims[A].append(M)
    claims[A].sort()
    assert choose_relay(A, X, members, claims) == M
    assert choose_relay(A, X, [A, X, R1], claims) is None  # not a member: never a relay


def test_allowed_ips_move_to_the_relay_and_the_relayed_entry_stays_empty():
    peers = {pub(2): PeerConfig(pub(2), "192.0.2.2:1", ("10.42.0.2/32", "10.202.0.0/24")),
             pub(3): PeerConfig(pub(3), "192.0.2.3:1", ("10.42.0.3/32", "10.203.0.0/24")),
             pub(4): PeerConfig(pub(4), "192.0.2.4:1", ("10.42.0.4/32",))}
    owner = {pub(2): X, pub(3): R1, pub(4): R2}
    routed, applied = apply_plan(peers, owner, {X: R1})
    assert applied == {X: R1}
    assert routed[pub(2)] == PeerConfig(pub(2), "192.0.2.2:1", ())
    assert routed[pub(3)].allowed_ips == ("10.42.0.3/32", "10.203.0.0/24", "10.42.0.2/32", "10.202.0.0/24")
    assert routed[pub(4)] == peers[pub(4)]
    # a relay with no entry here, a member with no entry, a relayed relay: nothing moves for it
    assert apply_plan(peers, owner, {X: M}) == (peers, {})
    assert apply_plan(peers, owner, {M: R1}) == (peers, {})
    routed, applied = apply_plan(peers, owner, {X: R1, R1: R2})
    assert applied == {R1: R2} and routed[pub(2)] == peers[pub(2)]


@settings(max_examples=200, deadline=None)
@given(st.sets(st.tuples(st.integers(1, 6), st.integers(1, 6)).filter(lambda p: p[0] != p[1]), max_size=30))
def test_every_pair_agrees_on_its_relay_and_no_address_is_invented(links):
    """Whatever each member claims, a pair's two ends route it the same way, and the allowed IPs
    on an interface are always exactly the ones formnet derived (moved, never added)."""
    ms = [member(i) for i in range(1, 7)]
    claims = {m: sorted({member(b) for a, b in links if member(a) == m}) for m in ms}
    plans = {m: relay_plan(m, ms, claims) for m in ms}
    for a, b in itertools.permutations(ms, 2):
        assert plans[a].get(b) == plans[b].get(a)
        r = plans[a].get(b)
        if r is not None:
            assert r not in (a, b) and b not in plans[r] and a not in plans[r]  # the relay reaches both
    for me in ms:
        others = [m for m in ms if m != me]
        peers = {pub(i): PeerConfig(pub(i), None, (f"10.42.0.{i}/32",)) for i in range(1, 7) if member(i) != me}
        owner = {pub(i): member(i) for i in range(1, 7) if member(i) != me}
        routed, _ = apply_plan(peers, owner, plans[me])
        assert sorted(ip for p in routed.values() for ip in p.allowed_ips) == \
            sorted(ip for p in peers.values() for ip in p.allowed_ips)
        assert set(routed) == set(peers) and len(others) == len(routed)


# ---- kernel or wireguard-go ------------------------------------------------------------------

def test_the_kernel_module_is_used_where_it_works_and_wg_can_configure_it():
    pick = backend.pick
    assert pick(kernel_module=True, have_wg=True, have_wireguard_go=True) == backend.KERNEL
    assert pick(kernel_module=False, have_wg=True, have_wireguard_go=True) == backend.USERSPACE
    assert pick(kernel_module=True, have_wg=False, have_wireguard_go=True) == backend.USERSPACE
    with pytest.raises(MeshError, match="wireguard-tools"):
        pick(kernel_module=True, have_wg=False, have_wireguard_go=False)
    with pytest.raises(MeshError, match="no WireGuard module"):
        pick(kernel_module=False, have_wg=True, have_wireguard_go=False)


async def test_choose_probes_the_kernel_only_when_wg_is_there():
    probed = []

    async def probe(name: str) -> bool:
        probed.append(name)
        return True

    everything = {"wg": "/usr/bin/wg", "wireguard-go": "/usr/bin/wireguard-go"}
    got = await backend.choose("fmtest", probe=probe, which=everything.get)
    assert got.kind == "kernel" and got.name == "fmtest" and probed == ["fmtest"]

    async def no_module(name: str) -> bool:
        return False

    got = await backend.choose("fmtest", probe=no_module, which=everything.get)
    assert got.kind == "wireguard-go"
    probed.clear()
    got = await backend.choose("fmtest", probe=probe, which={"wireguard-go": "/x"}.get)
    assert got.kind == "wireguard-go" and probed == []


def test_wg_set_arguments_do_what_the_uapi_request_does():
    p = PeerConfig(pub(2), "192.0.2.2:51820", ("10.42.0.2/32", "10.202.0.0/24"))
    b64 = base64.b64encode
    args = wg_set_args("fm1", private_key_file="/dev/stdin", listen_port=51820,
                       changes=[PeerChange(p), PeerChange(PeerConfig(pub(3)), remove=True),
                                PeerChange(PeerConfig(pub(4), None, ()))])
    assert args == ["set", "fm1", "listen-port", "51820", "private-key", "/dev/stdin",
                    "peer", b64(pub(2)).decode(), "endpoint", "192.0.2.2:51820", "persistent-keepalive", "25",
                    "allowed-ips", "10.42.0.2/32,10.202.0.0/24",
                    "peer", b64(pub(3)).decode(), "remove",
                    "peer", b64(pub(4)).decode(), "persistent-keepalive", "25", "allowed-ips", ""]


def test_a_wg_dump_reads_as_a_uapi_answer():
    k2, k3 = (base64.b64encode(pub(i)).decode() for i in (2, 3))
    text = (f"cHJpdmF0ZQ==\t{k2}\t51820\toff\n"
            f"{k2}\t(none)\t192.0.2.2:51820\t10.42.0.2/32,10.202.0.0/24\t1700000000\t1234\t5678\t25\n"
            f"{k3}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n")
    dev = parse_dump(text)
    assert dev.listen_port == 51820
    assert dev.public_keys[pub(2)] == {"allowed_ips": ["10.42.0.2/32", "10.202.0.0/24"],
                                       "endpoint": "192.0.2.2:51820", "last_handshake_time_sec": "1700000000",
                                       "rx_bytes": "1234", "tx_bytes": "5678",
                                       "persistent_keepalive_interval": "25"}
    assert dev.public_keys[pub(3)]["allowed_ips"] == [] and "endpoint" not in dev.public_keys[pub(3)]
    with pytest.raises(UapiError):
        parse_dump("head\tx\t1\toff\nshort\tline\n")
