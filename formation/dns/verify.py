"""Vanity domains proven by their own DNS: `app.example.com` is served for the owner whose
address a TXT record at `_formation.app.example.com` names.

Every serving node checks for itself, through its upstream resolvers: a result is kept for the
TXT record's TTL (clamped to [min_ttl, max_ttl]) and then checked again. An answer that says
"no" (NXDOMAIN, no TXT, other addresses) counts at once; an upstream that does not answer
leaves the last good result standing for `grace` seconds more, then the domain stops being
served. At most `concurrency` checks run at once, for at most `max_domains` domains.

TXT format: each TXT record (its strings joined) is one address, 0x and 40 hex digits, in any
case, optionally written `formation-owner=0x…`. Several records name several owners.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import trio

from .forward import Busy, UpstreamFailed
from .names import canonical_name, in_fog

log = logging.getLogger("formation.dns")

PREFIX = "_formation"
MAX_OWNERS = 16  # addresses taken from one domain's TXT records
_OWNER = re.compile(r"\s*(?:formation-owner=)?(0x[0-9a-fA-F]{40})\s*")

Resolve = Callable[..., Awaitable[tuple[dns.message.Message, float]]]


def owners_in(msg: dns.message.Message) -> frozenset[str]:
    """The addresses the TXT records of an answer name."""
    out: list[str] = []
    for rrset in msg.answer:
        if rrset.rdtype != dns.rdatatype.TXT:
            continue
        for rdata in rrset:
            text = b"".join(rdata.strings).decode("ascii", errors="replace")
            m = _OWNER.fullmatch(text)
            if m:
                out.append(m.group(1).lower())
    return frozenset(sorted(set(out))[:MAX_OWNERS])


def _txt_ttl(msg: dns.message.Message) -> int | None:
    ttls = [r.ttl for r in msg.answer if r.rdtype == dns.rdatatype.TXT]
    if ttls:
        return min(ttls)
    for rrset in msg.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, next(iter(rrset)).minimum)
    return None


@dataclass
class Check:
    domain: str
    owners: frozenset[str] = frozenset()  # what its TXT names, as far as this node knows
    due: float = 0.0  # when to check again
    checked: float | None = None  # when an upstream last answered
    valid_until: float = 0.0  # a good result lapses then if re-checks keep failing
    error: str | None = None  # what the last check found wrong

    def as_dict(self, now: float) -> dict:
        return {"domain": self.domain, "txt_name": f"{PREFIX}.{self.domain}",
                "owners": sorted(self.owners), "error": self.error,
                "checked_ago_s": None if self.checked is None else round(now - self.checked, 1),
                "next_check_in_s": round(max(0.0, self.due - now), 1)}


class Verifier:
    def __init__(self, resolve: Resolve, *, concurrency: int = 8, max_domains: int = 10_000,
                 min_ttl: int = 30, max_ttl: int = 3600, retry: float = 30.0, grace: float = 3600.0,
                 clock: Callable[[], float] = trio.current_time):
        self.resolve = resolve
        self.concurrency = concurrency
        self.max_domains = max_domains
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self.retry, self.grace = retry, grace
        self.clock = clock
        self.checks: dict[str, Check] = {}
        self._running: set[str] = set()
        self._wake = trio.Event()
        self.on_change: Callable[[], None] = lambda: None

    def want(self, domains: Iterable[str]) -> None:
        """The vanity domains the state holds now: new ones are checked soon, gone ones
        forgotten. At most max_domains (in name order, the same on every node)."""
        keep = sorted({d for d in (canonical_name(x) for x in domains) if d and not in_fog(d)})
        keep = keep[: self.max_domains]
        wanted = set(keep)
        for d in list(self.checks):
            if d not in wanted:
                del self.checks[d]
        added = False
        for d in keep:
            if d not in self.checks:
                self.checks[d] = Check(d)
                added = True
        if added:
            self._wake.set()

    def verified(self) -> dict[str, frozenset[str]]:
        now = self.clock()
        return {d: c.owners for d, c in self.checks.items() if c.owners and now < c.valid_until}

    def status(self, domain: str) -> dict | None:
        c = self.checks.get(domain)
        return None if c is None else c.as_dict(self.clock())

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(self.concurrency)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                now = self.clock()
                self._wake = trio.Event()
                next_due = now + 3600.0
                for d, c in list(self.checks.items()):
                    if d in self._running:
                        continue
                    if c.due <= now:
                        if limiter.available_tokens == 0:
                            next_due = now  # wake when a slot frees (a check sets _wake)
                            break
                        self._running.add(d)
                        await limiter.acquire_on_behalf_of(d)
                        nursery.start_soon(self._check, d, limiter)
                    else:
                        next_due = min(next_due, c.due)
                    if c.owners and c.valid_until <= now:
                        c.owners = frozenset()
                        self.on_change()
                with trio.move_on_at(max(next_due, now + 0.05)):
                    await self._wake.wait()

    async def _check(self, domain: str, limiter: trio.CapacityLimiter) -> None:
        try:
            await self._check_one(domain)
        except Exception:  # noqa: BLE001 - a bug costs this domain a check, not the node its DNS
            log.exception("dns: checking %s failed", domain)
            c = self.checks.get(domain)
            if c is not None:
                c.due = self.clock() + self.retry
        finally:
            self._running.discard(domain)
            limiter.release_on_behalf_of(domain)
            self._wake.set()

    async def _check_one(self, domain: str) -> None:
        name = dns.name.from_text(f"{PREFIX}.{domain}")
        failure = ""
        try:
            msg, age = await self.resolve(name, dns.rdatatype.TXT, source="verifier")
        except (Busy, UpstreamFailed) as exc:
            msg, age, failure = None, 0.0, str(exc)
        now = self.clock()
        c = self.checks.get(domain)
        if c is None:
            return  # no longer wanted
        before = c.owners
        if msg is None or msg.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            c.error = failure if msg is None else f"the upstream answered {dns.rcode.to_text(msg.rcode())}"
            c.due = now + self.retry
            if now >= c.valid_until:
                c.owners = frozenset()
        else:
            c.owners = owners_in(msg)
            c.checked = now
            ttl = _txt_ttl(msg)
            ttl = self.min_ttl if ttl is None else max(self.min_ttl, min(self.max_ttl, ttl - int(age)))
            c.due = now + ttl
            c.valid_until = c.due + self.grace
            c.error = None if c.owners else f"no TXT record at {name} names an address"
        if c.owners != before:
            log.info("dns: %s is now %s", domain,
                     f"verified for {', '.join(sorted(c.owners))}" if c.owners else "not verified")
            self.on_change()
