"""Relays, sans-IO: which members this node reaches directly, and through whom it reaches the
others. No clock, socket or store here; formation/node/formnet.py feeds it and does what it says.

Each node watches its direct tunnel to every peer (`Link`, stepped by `track` once a pass):
  * a link is *live* once a WireGuard handshake has completed (it needs both directions);
  * a live link the node routes directly to is probed when nothing came from the peer for
    PROBE_IDLE seconds (a datagram to the peer's overlay address: WireGuard data, which the
    peer's WireGuard answers within 10 s, if only with a keepalive); no answer within
    PROBE_TIMEOUT, or no handshake for HANDSHAKE_STALE, and the link is *down*;
  * a down link comes back with a handshake newer than its fall, and not before a hold time that
    doubles with each fall in a row (HOLD, 2*HOLD, ... MAX_HOLD): a path that comes and goes
    does not flap the routes. While down, its peer entry is re-made every RETRY_DIRECT seconds
    (after the hold): a new entry handshakes at once, so a path that is back shows soon, also
    while a session from before the fall would keep WireGuard from handshaking for minutes.

Each node publishes the members its links are live to (`reaches` in its `peer` record). A pair
A, X is *direct* when each lists the other (a full list, MAX_REACHES long, says nothing of the
members sorting after its last entry). Otherwise, once the pair has had its first tries
(`Link.trying`), both route the pair through the same
relay, chosen from the state alone (`choose_relay`): a member R whose pairs with A and with X are
direct, the one with the lowest sha256("relay:" A | X | R) (A, X sorted). On A, X's allowed IPs
move to R's peer entry; on X, A's move to R's; R forwards between two of its own peers. X's own
entry stays (with no allowed IPs), so handshakes with X go on and the pair goes back to direct
when they come. A member's `reaches` is its own claim: a pair's lists decide only that pair,
and a relay is chosen only if both ends list it too, so a member claiming everyone attracts
nothing from nodes that do not reach it. Traffic only ever moves to another member's entry,
with the allowed IPs formnet derived for the members (never anything outside the fog's spaces).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from formation.crdt.kinds.node_kinds import MAX_REACHES  # the peer record's bound

from .uapi import PeerConfig

HANDSHAKE_STALE = 180  # seconds: WireGuard re-handshakes every 2 minutes on a live tunnel
PROBE_IDLE = 10.0  # seconds with nothing from a direct peer before it is probed
PROBE_TIMEOUT = 15.0  # seconds a probed peer has to answer (WireGuard answers data within 10 s)
RELAY_AFTER = 20.0  # seconds a new peer is tried directly (its endpoints in turn) before a relay
HOLD = 20.0  # seconds a link that went down stays down at least; doubled for each fall in a row
MAX_HOLD = 320.0
STABLE = 600.0  # seconds live after which a link's falls are forgotten
RETRY_DIRECT = 20.0  # seconds between two re-made entries of a peer whose tunnel is down


@dataclass(frozen=True)
class Link:
    """This node's direct tunnel to one peer, as far as it can tell."""

    since: float  # monotonic: when first tried, or when it last went down
    live: bool = False
    fell_at: int = 0  # wall seconds when it went down: a newer handshake brings it back
    falls: int = 0  # falls in a row (for the hold time)
    up_at: float = 0.0  # monotonic: when it last came up
    rx: int = 0  # bytes received from the peer, at the last pass
    rx_at: float = 0.0  # monotonic: when that count last moved
    probe_at: float | None = None  # monotonic: the first probe not answered yet
    remade_at: float = 0.0  # monotonic: when its entry was last re-made

    def hold(self) -> float:
        return 0.0 if self.falls == 0 else min(MAX_HOLD, HOLD * 2 ** (self.falls - 1))

    def trying(self, now: float, deadline: float) -> bool:
        """In its first tries: never down, and first tried less than `deadline` ago. A pair is not
        relayed then, whatever the lists say (they may not have caught up yet)."""
        return self.falls == 0 and now - self.since < deadline


@dataclass(frozen=True)
class Step:
    link: Link
    probe: bool = False  # send a datagram to the peer's overlay address now
    remake: bool = False  # remove and add the peer's entry now (it handshakes afresh)


def track(link: Link | None, *, last_handshake: int, rx_bytes: int, now: float, wall: int,
          direct: bool) -> Step:
    """One pass over one link. `last_handshake` (wall seconds, 0 for none) and `rx_bytes` are what
    the interface says of the peer; `direct`: its overlay address is routed to its own entry (a
    probe then tests this link, not a relay)."""
    if link is None:
        link = Link(since=now, rx=rx_bytes, rx_at=now, remade_at=now)
    if rx_bytes != link.rx:  # grew, or a re-made entry started from 0
        link = replace(link, rx=rx_bytes, rx_at=now, probe_at=None)
    fresh = bool(last_handshake) and wall - last_handshake < HANDSHAKE_STALE
    if link.live:
        unanswered = link.probe_at is not None and now - link.probe_at >= PROBE_TIMEOUT
        if not fresh or unanswered:
            falls = 1 if now - link.up_at >= STABLE else link.falls + 1
            return Step(replace(link, live=False, since=now, fell_at=wall, falls=falls, probe_at=None))
        if direct and now - link.rx_at >= PROBE_IDLE:
            return Step(replace(link, probe_at=link.probe_at if link.probe_at is not None else now), probe=True)
        return Step(link)
    held = now - link.since >= link.hold()
    if fresh and last_handshake > link.fell_at and held:
        return Step(replace(link, live=True, up_at=now, probe_at=None, rx_at=now))
    if held and now - link.remade_at >= RETRY_DIRECT:
        return Step(replace(link, remade_at=now), remake=True)
    return Step(link)


def reaches(links: Mapping[str, Link], previous: Iterable[str], trying: Iterable[str]) -> list[str]:
    """What this node publishes: the members its links are live to, sorted, at most MAX_REACHES.
    A peer still in its first tries (`trying`) keeps the place the previous list gave it: a
    restarted node does not drop everyone while its tunnels come up."""
    kept = set(previous) & set(trying)
    return sorted({m for m, link in links.items() if link.live or m in kept})[:MAX_REACHES]


class _Claims:
    """The members' `reaches` lists, as sets; a full list (MAX_REACHES members) says nothing of
    the members sorting after its last one."""

    def __init__(self, claims: Mapping[str, Iterable[str]]):
        self.sets: dict[str, frozenset[str]] = {}
        self.cut: dict[str, str] = {}  # member with a full list -> its last entry
        for m, listed in claims.items():
            ordered = sorted(listed)
            self.sets[m] = frozenset(ordered)
            if len(ordered) >= MAX_REACHES:
                self.cut[m] = ordered[-1]

    def lists(self, a: str, b: str) -> bool:
        return b in self.sets.get(a, ())

    def may_list(self, a: str, b: str) -> bool:
        return self.lists(a, b) or (a in self.cut and b > self.cut[a])


def direct(a: str, b: str, claims: Mapping[str, Iterable[str]]) -> bool:
    """Each of the pair lists the other (or, past the end of a full list, may)."""
    c = claims if isinstance(claims, _Claims) else _Claims(claims)
    return c.may_list(a, b) and c.may_list(b, a)


def choose_relay(a: str, b: str, members: Iterable[str], claims: Mapping[str, Iterable[str]]) -> str | None:
    """The member both a and b route their pair through: the same on both ends for the same
    state. None when no member has pairs with both that each end lists (a list's word, never
    its silence, makes a relay)."""
    c = claims if isinstance(claims, _Claims) else _Claims(claims)
    lo, hi = sorted((a, b))
    best: tuple[bytes, str] | None = None
    for r in members:
        if r in (a, b) or not all(c.lists(p, q) for p, q in ((a, r), (r, a), (b, r), (r, b))):
            continue
        rank = hashlib.sha256(f"relay:{lo}|{hi}|{r}".encode()).digest()
        if best is None or rank < best[0]:
            best = (rank, r)
    return best[1] if best else None


def relay_plan(me: str, members: Iterable[str], claims: Mapping[str, Iterable[str]],
               trying: Iterable[str] = ()) -> dict[str, str]:
    """{peer: relay} for each member this node reaches through another: every peer whose pair
    with this node is not direct and that is not in `trying` (first tries still going on), when
    some member can relay for the pair."""
    members = sorted(set(members))
    listed = _Claims(claims)
    skip = set(trying)
    plan = {}
    for x in members:
        if x == me or x in skip or direct(me, x, listed):
            continue
        r = choose_relay(me, x, members, listed)
        if r is not None:
            plan[x] = r
    return plan


def apply_plan(peers: Mapping[bytes, PeerConfig], owner: Mapping[bytes, str],
               plan: Mapping[str, str]) -> tuple[dict[bytes, PeerConfig], dict[str, str]]:
    """The peers with each relayed member's allowed IPs moved to its relay's entry (its own entry
    stays, with none, so that handshakes with it go on), and the part of the plan that applied:
    a plan naming a member with no entry here (no record, a shared key), or a relay that is
    itself relayed, changes nothing for that pair."""
    key_of = {m: k for k, m in owner.items()}
    out = dict(peers)
    moved: dict[bytes, list[str]] = {}
    applied = {}
    for x, r in sorted(plan.items()):
        kx, kr = key_of.get(x), key_of.get(r)
        if kx is None or kr is None or kx == kr or kx not in out or kr not in out or r in plan:
            continue
        moved.setdefault(kr, []).extend(out[kx].allowed_ips)
        out[kx] = replace(out[kx], allowed_ips=())
        applied[x] = r
    for kr, ips in moved.items():
        out[kr] = replace(out[kr], allowed_ips=(*out[kr].allowed_ips, *ips))
    return out, applied
