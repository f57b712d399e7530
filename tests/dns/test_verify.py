"""verify.py: vanity domains proven by a TXT record at _formation.<domain>, checked through the
upstream (a test authority on loopback), kept for the record's TTL and checked again."""

from __future__ import annotations

import dns.message
import dns.rrset
import trio

from formation.dns.forward import Forwarder, Upstream
from formation.dns.verify import Verifier, owners_in
from tests.dns.support import Authority

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20


def test_owners_in_txt_records():
    r = dns.message.make_response(dns.message.make_query("_formation.a.example", "TXT"))
    r.answer.append(dns.rrset.from_text_list("_formation.a.example.", 60, "IN", "TXT", [
        f'"{ALICE.upper().replace("0X", "0x")}"', f'"formation-owner={BOB}"', '"v=spf1 -all"',
        f'"0x{"a1" * 10}" "{"a1" * 10}"',  # one record in two strings, joined
        f'"{ALICE}x"', f'"prefix {BOB}"']))
    assert owners_in(r) == {ALICE, BOB}


async def verifier_with(nursery, authority: Authority, **kw) -> tuple[Verifier, list]:
    fw = Forwarder([Upstream(*authority.address)], timeout=0.3)
    changes = []
    v = Verifier(fw.resolve, **{"min_ttl": 1, "max_ttl": 3600, "retry": 0.2, "grace": 1.0, **kw})
    v.on_change = lambda: changes.append(dict(v.verified()))
    await nursery.start(v.run)
    return v, changes


async def wait_until(what, check, timeout=5.0):
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


async def test_a_domain_is_verified_while_its_txt_names_the_owner(nursery):
    auth = Authority(negative_ttl=1)
    await nursery.start(auth.serve)
    v, changes = await verifier_with(nursery, auth)
    v.want(["App.Example.com.", "other.example", "x.fog", "not a domain"])
    assert set(v.checks) == {"app.example.com", "other.example"}
    await wait_until("checked", lambda: v.checks["app.example.com"].checked is not None)
    assert v.verified() == {} and "no TXT record" in v.status("app.example.com")["error"]
    auth.set("_formation.app.example.com", "TXT", [f'"{ALICE}"'], ttl=1)
    await wait_until("verified", lambda: v.verified().get("app.example.com") == {ALICE})
    assert changes[-1] == {"app.example.com": frozenset({ALICE})}
    st = v.status("app.example.com")
    assert st["owners"] == [ALICE] and st["error"] is None and st["txt_name"] == "_formation.app.example.com"
    # the TXT changes hands: after its TTL the node sees it
    auth.set("_formation.app.example.com", "TXT", [f'"{BOB}"'], ttl=1)
    await wait_until("re-checked", lambda: v.verified().get("app.example.com") == {BOB})
    auth.set("_formation.app.example.com", "TXT", [])
    await wait_until("gone", lambda: "app.example.com" not in v.verified())
    v.want([])
    assert v.checks == {}


async def test_a_silent_upstream_keeps_the_last_answer_for_the_grace_period_only(nursery):
    auth = Authority()
    auth.set("_formation.a.example", "TXT", [f'"{ALICE}"'], ttl=1)
    await nursery.start(auth.serve)
    v, _ = await verifier_with(nursery, auth, grace=1.0)
    v.want(["a.example"])
    await wait_until("verified", lambda: "a.example" in v.verified())
    auth.silent = True
    t0 = trio.current_time()
    await trio.sleep(1.2)
    assert "a.example" in v.verified() or trio.current_time() - t0 > 1.9  # still served a while
    await wait_until("lapsed", lambda: "a.example" not in v.verified(), timeout=5)
    assert "no upstream answered" in v.status("a.example")["error"]


async def test_checks_are_bounded_in_number_and_concurrency(nursery):
    auth = Authority()
    auth.delay = 0.2
    await nursery.start(auth.serve)
    v, _ = await verifier_with(nursery, auth, concurrency=3, max_domains=10)
    v.want([f"d{i}.example" for i in range(100)])
    assert len(v.checks) == 10 and "d0.example" in v.checks
    running = []

    async def watch():
        while True:
            running.append(len(v._running))
            await trio.sleep(0.01)

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        await wait_until("all checked", lambda: all(c.checked is not None for c in v.checks.values()))
        n.cancel_scope.cancel()
    assert max(running) == 3
