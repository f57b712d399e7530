"""Attacks on the replicated state over real in-process libp2p: an attacker that is a fog member
of its own (P2PService, Store, key; tests/p2p/attacker.py) signs whatever it likes and pushes it
by gossip and by sync. Each scenario checks that the attack changes nothing honest, and that
the honest nodes keep converging without striking or banning one another. The strict xfail
tests are attacks that succeed today (bugs found by this file); they fail loudly once fixed.
"""

from __future__ import annotations

import pytest
import trio

from formation.crdt.hlc import MAX_HLC, from_ms
from formation.crdt.intents import canonical_message
from formation.crdt.keys import parse_signature, sha256
from formation.crdt.op import MAX_MESSAGE_LEN, OpError, make_op
from formation.crdt.store import Limits, Store, wall_ms
from formation.p2p.gossip import TOPIC, encode_batch
from tests.p2p.attacker import (
    assert_no_honest_strikes,
    forge_wire,
    open_attacker,
    open_member,
    rss_mib,
)
from tests.p2p.conftest import converged, open_fog
from tests.support import TS, Node, User

# ---- helpers ----------------------------------------------------------------------------------


def signed(user: User, method: str, path_query: str, body: bytes, ts: int = TS) -> tuple[str, bytes, bytes]:
    """A user's signed request over exact body bytes (User.request only takes dicts)."""
    message = canonical_message(method, path_query, ts, body)
    return message, body, user.key.personal_sign(message.encode())


def derived_id(request: tuple[str, bytes, bytes]) -> str:
    """The record id a create gets: the first 32 hex digits of SHA-256 of its signature."""
    return sha256(parse_signature(request[2])).hex()[:32]


def carriers(store: Store, kind: str, key: str, version: str) -> list[bytes]:
    """The ops that carry the writes of `version`: the prev of a write made on it."""
    reg = store.registers[(kind, key)]
    return sorted(reg.writes[w].carrier for w in reg.versions[version])


def nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


async def until(pred, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def read(member, fn, *args):
    """Read a member's store under its lock (a batch may be committing in a worker thread)."""
    return await member.svc.astore.run(fn, member.store, *args)


async def rejection_codes(members, ids: list[bytes], timeout: float = 15.0) -> list[dict[bytes, str]]:
    """Per member, the code each op was rejected with (waits until every member rejected all)."""
    def codes(s):
        return {i: s.replica.rejected[i].code for i in ids if i in s.replica.rejected}

    out = []
    with trio.fail_after(timeout):
        for m in members:
            while len(got := await read(m, codes)) < len(ids):
                await trio.sleep(0.05)
            out.append(got)
    return out


async def refused_everywhere(evil, members, forged: dict[bytes, str], *, by_gossip: int) -> None:
    """The attacker sends each forged wire (the first `by_gossip` by gossip, the rest in a sync
    session with every member); every member refuses each with the expected code."""
    wires = list(forged)
    await evil.gossip(wires[:by_gossip])
    for m in members:
        await evil.push_sync(m.svc.peer_id, wires[by_gossip:])
    codes = await rejection_codes(members, [sha256(w) for w in wires])
    wrong = [(i, code, got.get(sha256(w))) for got in codes for i, (w, code) in enumerate(forged.items())
             if got.get(sha256(w)) != code]
    assert not wrong, f"(forged #, expected, got): {wrong}"


async def caught_up(evil, member) -> list[bytes]:
    """Until the attacker's replica has the member's heads (it learns the state like any peer)."""
    with trio.fail_after(15):
        while True:
            heads = await read(member, lambda s: s.heads())
            if await evil.view(lambda s: s.heads()) == heads:
                return heads
            await trio.sleep(0.05)


async def top_hlc(evil) -> int:
    return await evil.view(lambda s: max((m.hlc for m in s.ops.values()), default=0))


async def keep_working(members, user: User, tag: str) -> None:
    """Honest nodes write (a user's create, heartbeats) and converge."""
    await members[-1].relay(user, "POST", "/v1/models", {"name": f"after {tag}"}, ts=TS + 90)
    for k, m in enumerate(members):
        await m.heartbeat(1000 + k)
    await converged(members)
    assert_no_honest_strikes(members)


def sync_results(members, peer: str) -> list:
    """Collects the SyncResults of sessions with `peer` on every member (the victims' verdicts)."""
    got: list = []
    for m in members:
        m.svc.on_sync.append(lambda r, i=m.i: got.append((i, r)) if r.peer == peer else None)
    return got


# ---- 1. takeover ------------------------------------------------------------------------------


async def test_takeover_a_create_naming_someone_elses_record_is_refused():
    victim, thief = User(b"\x31" * 32), User(b"\x32" * 32)
    async with open_fog(2) as fog, open_attacker(fog) as evil:
        create = await fog[0].relay(victim, "POST", "/v1/models", {"name": "precious", "description": "hers"})
        mid = create.key
        await converged(fog)
        hashes = [await m.svc.astore.state_hash() for m in fog]
        before = await fog[0].svc.astore.get("model", mid)

        # no deps, hlc=1: "created before anything else"; a create naming the victim's id...
        named = make_op(evil.key, "model", mid, deps=[], hlc=1,
                        request=thief.request("POST", "/v1/models", {"model_id": mid, "name": "stolen"}))
        # ...a create without an id, relayed under the victim's id...
        moved = make_op(evil.key, "model", mid, deps=[], hlc=1,
                        request=thief.request("POST", "/v1/models", {"name": "stolen too"}, ts=TS + 1))
        # ...and the victim's own create replayed in a new op (one request is one write)
        req = create.request
        replay = make_op(evil.key, "model", mid, deps=[], hlc=1, request=(req.message, req.body, req.signature))
        await evil.gossip([named.wire, replay.wire])
        for m in fog:
            await evil.push_sync(m.svc.peer_id, [moved.wire])

        codes = await rejection_codes(fog, [named.id, moved.id])
        assert codes == [{named.id: "bad_field", moved.id: "bad_key"}] * len(fog)
        await until(lambda: all(m.store.has(replay.id) for m in fog))
        for m, h in zip(fog, hashes, strict=True):
            assert await m.svc.astore.get("model", mid) == before
            assert before["owner"] == victim.address
            assert await m.svc.astore.state_hash() == h  # the replay is the same write
        await keep_working(fog, thief, "takeover")
        assert [(await m.svc.astore.get("model", mid))["owner"] for m in fog] == [victim.address] * 2


# ---- 2. clock poisoning -----------------------------------------------------------------------


async def test_clock_poisoning_ops_at_the_clock_bound_are_not_delivered_and_past_it_are_malformed(tmp_path):
    path = str(tmp_path / "member.db")
    async with open_fog(2) as fog:
        async with open_member(fog, Store(path), secret=b"\x03" * 32, i=2) as c, \
                open_attacker([*fog, c]) as evil:
            honest = [*fog, c]
            for k, m in enumerate(honest):
                await m.heartbeat(k)
            await converged(honest)
            heads = await caught_up(evil, c)
            beat = {"address": evil.address}
            at_bound = make_op(evil.key, "node", evil.address, deps=heads, hlc=MAX_HLC, value={**beat, "heartbeat": 1})
            soon = make_op(evil.key, "node", evil.address, deps=heads, hlc=from_ms(wall_ms() + 20 * 60_000),
                           value={**beat, "heartbeat": 2})  # inside the hold horizon: held
            with pytest.raises(OpError, match="hlc"):
                make_op(evil.key, "node", evil.address, deps=heads, hlc=2**63 - 1, value={**beat, "heartbeat": 3})
            past = forge_wire(evil.key, "node", evil.address, deps=heads, hlc=2**63 - 1, value={**beat, "heartbeat": 3})

            results = sync_results(honest, evil.peer_id)
            said = await evil.push_sync(c.svc.peer_id, [at_bound.wire, soon.wire, past])
            await until(lambda: any(r.rejected for _, r in results))
            assert [(i, r.rejected) for i, r in results if r.rejected] == [(c.i, 1)]  # `past`: malformed
            assert said["done"] is not None  # the session ran to its end
            await evil.gossip([at_bound.wire, soon.wire])
            await until(lambda: all(soon.id in m.store.replica.pending for m in honest))
            await evil.gossip_raw(encode_batch([past]))  # fails every honest validator: a ban at once
            await until(lambda: all(evil.peer_id in m.svc.banned for m in honest))

            ceiling = from_ms(wall_ms() + Limits().max_future_ms)
            for m in honest:
                assert not m.store.has(at_bound.id) and at_bound.id not in m.store.replica.pending  # dropped
                assert not m.store.has(soon.id)  # held, not delivered...
                assert (await m.svc.astore.tick()).accepted == []  # ...and not released now
                assert m.store.replica.hlc.last < ceiling  # no clock was dragged forward
                assert m.svc.validator.rejected >= 1
            # the honest clocks go on
            for k, m in enumerate(honest):
                await m.heartbeat(100 + k)
            await keep_working(honest, User(b"\x33" * 32), "clock poisoning")
            final = (await c.svc.astore.state_hash(), len(c.store), c.store.heads())
    # the member's op log opens again and goes on writing
    c.store.close()
    again = Store(path)
    try:
        assert (again.state_hash(), len(again), again.heads()) == final
        assert again.pending_count == 0 and again.replica.hlc.last < from_ms(wall_ms() + Limits().max_future_ms)
        op = Node(again, secret=b"\x03" * 32).heartbeat(999)
        assert again.has(op.id) and op.hlc < MAX_HLC
    finally:
        again.close()


# ---- 3. half-delivered ops --------------------------------------------------------------------


async def test_a_lone_surrogate_in_a_request_body_is_refused_alike_everywhere_and_nothing_sticks():
    owner, stranger = User(b"\x41" * 32), User(b"\x42" * 32)
    async with open_fog(2) as fog, open_attacker(fog) as evil:
        a, b = fog
        mid = (await a.relay(owner, "POST", "/v1/models", {"name": "kept"})).key
        await converged(fog)
        version = a.store.record_version("model", mid)
        at = f"/v1/models/{mid}?base={version}"
        requests = [
            # a JSON escape of a lone surrogate (json.dumps writes it so)
            stranger.request("POST", "/v1/models", {"name": "bad \ud800 name"}),
            signed(owner, "PUT", at, b'{"description": "\\udfff"}'),
            # the surrogate's UTF-8-like bytes, unescaped: not UTF-8 at all
            signed(owner, "PUT", at, b'{"description": "\xed\xa0\x80"}'),
            # and, while at it, a key given twice (json.loads would keep the last)
            signed(owner, "PUT", at, b'{"description": "a", "description": "b"}'),
        ]
        # the API's path: the node refuses to relay it
        local = []
        for k, (m, body, s) in enumerate(requests):
            with pytest.raises(OpError) as err:
                await a.svc.astore.run(a.store.write_request, a.node.key, m, body, s, now_ms=a.node.now + 10 + k)
            local.append(err.value.code)
        assert local == ["bad_request"] * len(requests)

        # the attacker relays them anyway: by gossip and by sync
        heads = await caught_up(evil, a)
        top = await top_hlc(evil)
        prev = await evil.view(carriers, "model", mid, version)
        ops = [make_op(evil.key, "model", derived_id(requests[0]), deps=heads, hlc=top + 1, request=requests[0])]
        ops += [make_op(evil.key, "model", mid, deps=[*heads, *prev], prev=prev, hlc=top + 2 + k, request=r)
                for k, r in enumerate(requests[1:])]
        await evil.gossip([ops[0].wire])
        for m in fog:
            await evil.push_sync(m.svc.peer_id, [op.wire for op in ops[1:]])
        codes = await rejection_codes(fog, [op.id for op in ops])
        assert codes == [{op.id: code for op, code in zip(ops, local, strict=True)}] * 2
        # sent again: refused again (remembered), the same way; the third strike bans the sender
        await evil.gossip([op.wire for op in ops])
        await until(lambda: all(evil.peer_id in m.svc.banned for m in fog))

        for m in fog:
            log_rows = await read(m, lambda s: s.log.db.execute("SELECT count(*) FROM ops").fetchone()[0])
            assert log_rows == len(m.store)  # nothing half-written
            assert not any(m.store.has(op.id) for op in ops) and m.store.pending_count == 0
            assert not m.store.log.db.in_transaction
            assert m.store.record_version("model", mid) == version
        # no stuck state: the same record, on the very version the bad requests named, takes a write
        await a.relay(owner, "PUT", f"/v1/models/{mid}", {"description": "fine \u00e9"}, ts=TS + 20)
        await b.relay(stranger, "POST", "/v1/models", {"name": "good name"}, ts=TS + 21)
        await keep_working(fog, owner, "surrogates")
        assert [(await m.svc.astore.get("model", mid))["description"] for m in fog] == ["fine \u00e9"] * 2


# ---- 4. verdicts agree ------------------------------------------------------------------------


async def test_verdicts_agree_oversized_messages_and_deep_values_are_refused_locally_and_by_every_peer():
    u = User(b"\x51" * 32)
    async with open_fog(3) as fog, open_attacker(fog) as evil:
        a = fog[0]
        for k, m in enumerate(fog):
            await m.heartbeat(k)
        await converged(fog)
        heads = await caught_up(evil, a)
        top = await top_hlc(evil)
        hashes = [await m.svc.astore.state_hash() for m in fog]

        # a signed message over MAX_MESSAGE_LEN that still parses (a URL fragment is not the path)
        long = signed(u, "POST", "/v1/models#" + "x" * MAX_MESSAGE_LEN, b'{"name": "long"}')
        with pytest.raises(OpError) as err:
            await a.svc.astore.run(a.store.write_request, a.node.key, *long, now_ms=a.node.now + 1)
        assert err.value.code == "malformed"
        with pytest.raises(OpError, match="at most"):
            make_op(evil.key, "model", derived_id(long), deps=heads, hlc=top + 1, request=long)
        long_wire = forge_wire(evil.key, "model", derived_id(long), deps=heads, hlc=top + 1, request=long)

        # a node value nested deeper than the codec allows
        deep_value = {"address": a.node.address, "tags": nested(20)}
        with pytest.raises(OpError, match="nested deeper") as err:
            make_op(a.node.key, "node", a.node.address, deps=heads, hlc=top + 1, value=deep_value)
        assert err.value.code == "malformed"
        with pytest.raises(OpError, match="nested deeper") as err:
            await a.svc.astore.run(a.store.write, a.node.key, "node", a.node.address, deep_value)
        assert err.value.code == "malformed"
        deep_wire = forge_wire(evil.key, "node", evil.address, deps=heads, hlc=top + 2,
                               value={"address": evil.address, "tags": nested(20)})

        # a request body nested deeper than a body may be: well-formed op, refused by the rule
        deep_body = signed(u, "POST", "/v1/models", b'{"name": "d", "metadata": ' + b"[" * 20 + b"]" * 20 + b"}")
        with pytest.raises(OpError) as err:
            await a.svc.astore.run(a.store.write_request, a.node.key, *deep_body, now_ms=a.node.now + 2)
        body_code = err.value.code
        deep_op = make_op(evil.key, "model", derived_id(deep_body), deps=heads, hlc=top + 3, request=deep_body)

        results = sync_results(fog, evil.peer_id)
        for m in fog:  # every peer gets the malformed ops by sync: refused (a strike each)
            await evil.push_sync(m.svc.peer_id, [long_wire, deep_wire])
        await until(lambda: len([r for _, r in results if r.rejected]) == len(fog))
        assert sorted((i, r.rejected, r.ops_accepted) for i, r in results if r.rejected) == [(m.i, 2, 0) for m in fog]
        await evil.gossip([deep_op.wire])
        assert await rejection_codes(fog, [deep_op.id]) == [{deep_op.id: body_code}] * len(fog)
        assert body_code == "bad_request"
        for payload in (long_wire, deep_wire):  # and by gossip: no honest validator lets it through
            await evil.gossip_raw(encode_batch([payload]))
        await until(lambda: all(evil.peer_id in m.svc.banned for m in fog))
        for m, h in zip(fog, hashes, strict=True):
            assert await m.svc.astore.state_hash() == h
            assert m.store.pending_count == 0
        await keep_working(fog, u, "verdicts")


def test_make_op_refuses_an_unencodable_node_value_with_an_op_error():
    """Local and remote verdicts carry the same code (a peer says OpError "malformed")."""
    node = Node(Store(), secret=b"\x52" * 32)
    deep = {"address": node.address, "tags": nested(20)}
    assert [r.code for r in Store().ingest([forge_wire(node.key, "node", node.address, hlc=5, value=deep)]).rejected] \
        == ["malformed"]
    try:
        node.put("node", node.address, deep)
    except OpError as exc:
        assert exc.code == "malformed"
    except ValueError as exc:
        raise AssertionError(f"refused with {type(exc).__name__}, not OpError: {exc}") from None
    else:
        raise AssertionError("stored a value its peers refuse")


# ---- 5. stale bases ---------------------------------------------------------------------------


async def test_stale_bases_rewrapped_requests_are_refused_and_old_branch_writes_are_void():
    owner, manager, buyer, friend = (User(bytes([0x60 + i]) * 32) for i in range(4))
    async with open_fog(2) as fog, open_attacker(fog) as evil:
        a, b = fog
        # x: a manager is granted (v1), then revoked (v2)
        x = (await a.relay(owner, "POST", "/v1/models", {"name": "x", "description": "x"})).key
        await a.relay(owner, "POST", f"/v1/models/{x}/authorize", {"address": manager.address, "level": "manager"},
                      ts=TS + 1)
        await converged(fog)
        v1 = a.store.record_version("model", x)
        await b.relay(owner, "POST", f"/v1/models/{x}/authorize", {"address": manager.address, "level": None},
                      ts=TS + 2)
        # y: sold to the buyer, who writes on it; z: sold to the buyer, who deletes it
        y = (await a.relay(owner, "POST", "/v1/models", {"name": "y"}, ts=TS + 3)).key
        z = (await a.relay(owner, "POST", "/v1/models", {"name": "z"}, ts=TS + 4)).key
        await converged(fog)
        y0, z0 = a.store.record_version("model", y), a.store.record_version("model", z)
        for rec, ts in ((y, TS + 5), (z, TS + 6)):
            await a.relay(owner, "POST", f"/v1/models/{rec}/transfer", {"to": buyer.address}, ts=ts)
        await converged(fog)
        await b.relay(buyer, "PUT", f"/v1/models/{y}", {"description": "the buyer's"}, ts=TS + 7)
        await b.relay(buyer, "DELETE", f"/v1/models/{z}", None, ts=TS + 8)
        await converged(fog)
        heads = await caught_up(evil, a)
        v2 = a.store.record_version("model", x)
        before = {k: await a.svc.astore.get("model", k) for k in (x, y, z)}
        assert before[x]["authorized"] == {} and before[y]["owner"] == buyer.address and before[z] is None

        # Writes signed on the old branches, relayed as they were signed (the former owner's and
        # the revoked manager's node is the attacker's): valid ops, and void.
        old = [(manager, "PUT", f"/v1/models/{x}", {"description": "the manager's"}, v1),
               (manager, "POST", f"/v1/models/{x}/authorize", {"address": friend.address, "level": "operator"}, v1),
               (owner, "PUT", f"/v1/models/{y}", {"description": "the owner's again"}, y0),
               (owner, "PUT", f"/v1/models/{z}", {"name": "back"}, z0)]
        for k, (user, method, path, body, base) in enumerate(old):
            op = await evil.svc.astore.run(evil.node.relay, user, method, path, body, ts=TS + 20 + k, base=base)
            if user is manager:
                evil.svc.publish(op.wire)  # the manager's by gossip...
            else:
                for m in fog:  # ...the former owner's by sync
                    await evil.push_sync(m.svc.peer_id, [op.wire])
        written = await evil.view(lambda s: s.heads())
        await until(lambda: all(all(m.store.has(h) for h in written) for m in fog))

        # A relay with no rights re-wraps requests onto versions they were not signed on.
        top = await top_hlc(evil)
        now = manager.request("PUT", f"/v1/models/{x}", {"description": "mine again"}, ts=TS + 30, base=v2)
        then = manager.request("PUT", f"/v1/models/{x}", {"description": "mine again!"}, ts=TS + 31, base=v1)
        at_v1 = await evil.view(carriers, "model", x, v1)
        at_v2 = await evil.view(carriers, "model", x, v2)
        rewrapped = [
            # signed on v2, where it is refused, carried onto v1 where the manager still had rights
            make_op(evil.key, "model", x, deps=[*heads, *at_v1], prev=at_v1, hlc=top + 1, request=now),
            # signed on v1 (void there), carried forward onto v2
            make_op(evil.key, "model", x, deps=[*heads, *at_v2], prev=at_v2, hlc=top + 2, request=then),
            # signed on v2 and relayed on v2: the rule refuses it
            make_op(evil.key, "model", x, deps=[*heads, *at_v2], prev=at_v2, hlc=top + 3, request=now),
        ]
        await evil.gossip([op.wire for op in rewrapped])
        codes = await rejection_codes(fog, [op.id for op in rewrapped])
        assert codes == [dict(zip([op.id for op in rewrapped], ["bad_prev", "bad_prev", "unauthorized"],
                                  strict=True))] * 2

        await converged(fog)
        for m in fog:
            after = {k: await m.svc.astore.get("model", k) for k in (x, y, z)}
            assert after == before  # the transfer and the delete won; the manager is not back
            assert manager.address not in after[x]["authorized"] and friend.address not in after[x]["authorized"]
        await keep_working(fog, buyer, "stale bases")


async def test_a_former_owner_cannot_undo_a_transfer_or_a_delete_from_an_old_branch():
    owner, buyer, friend = User(b"\x71" * 32), User(b"\x72" * 32), User(b"\x73" * 32)
    async with open_fog(2) as fog, open_attacker(fog) as evil:
        a, b = fog
        y = (await a.relay(owner, "POST", "/v1/models", {"name": "sold"})).key
        z = (await a.relay(owner, "POST", "/v1/models", {"name": "deleted"}, ts=TS + 1)).key
        await converged(fog)
        y0, z0 = a.store.record_version("model", y), a.store.record_version("model", z)
        await a.relay(owner, "POST", f"/v1/models/{y}/transfer", {"to": buyer.address}, ts=TS + 2)
        await a.relay(owner, "DELETE", f"/v1/models/{z}", None, ts=TS + 3)
        await converged(fog)
        await b.relay(buyer, "PUT", f"/v1/models/{y}", {"description": "the buyer's"}, ts=TS + 4)
        await converged(fog)
        await caught_up(evil, a)
        # later, the former owner's node relays access changes the owner signs on the old versions
        for k, (path, base) in enumerate(((f"/v1/models/{y}/transfer", y0), (f"/v1/models/{z}/transfer", z0))):
            op = await evil.svc.astore.run(evil.node.relay, owner, "POST", path, {"to": friend.address},
                                           ts=TS + 10 + k, base=base)
            evil.svc.publish(op.wire)
        written = await evil.view(lambda s: s.heads())
        await until(lambda: all(all(m.store.has(h) for h in written) for m in fog))
        await converged(fog)
        assert_no_honest_strikes(fog)
        views = [(await m.svc.astore.get("model", y), await m.svc.astore.get("model", z))
                 for m in fog]
    for sold, deleted in views:
        # A second transfer of the sold record on its old version is a double spend: no causal
        # rule can say which came first, so neither wins and the record is burned (deleted
        # everywhere). What the former owner can never do is take it back or hand it on.
        assert sold is None
        assert deleted is None  # stays deleted


# ---- 6. unbounded holding ---------------------------------------------------------------------


@pytest.mark.slow
async def test_a_pending_flood_from_fresh_peer_ids_stays_within_the_limits_and_expires():
    total, per_source, deps = 1000, 100, 64
    flood_sources, flood_each = 15, 120
    future_sources, future_each = 2, 150
    # the honest nodes sync only when told to, so the measurements below are of one session each
    async with open_fog(2, sync_interval=600, gap_grace=600) as fog, \
            open_attacker(fog, limits=Limits(pending_ops=1, pending_ops_per_source=1)) as evil:
        a, b = fog
        for m in fog:  # the Limits object the replica and its pending buffer share
            m.store.limits.pending_ops = total
            m.store.limits.pending_ops_per_source = per_source
        for k, m in enumerate(fog):
            await m.heartbeat(k)
        await converged(fog)
        heads = await caught_up(evil, a)
        top = await top_hlc(evil)
        beat = {"address": evil.address}

        def forge_flood():
            import os

            future = from_ms(wall_ms() + 50 * 60_000)  # past max_future_ms, inside hold_horizon_ms
            held = [[make_op(evil.key, "node", evil.address, deps=heads, hlc=future + s * 1000 + i,
                             value={**beat, "heartbeat": i}).wire for i in range(future_each)]
                    for s in range(future_sources)]
            bogus = [[make_op(evil.key, "node", evil.address, deps=[os.urandom(32) for _ in range(deps)],
                              hlc=top + 1 + s * 1000 + i, value={**beat, "heartbeat": i}).wire
                      for i in range(flood_each)] for s in range(flood_sources + 1)]
            return held, bogus

        held, bogus = await trio.to_thread.run_sync(forge_flood)
        rss0 = rss_mib()
        t0 = trio.current_time()
        for batch in held:
            await evil.gossip_as_fresh_peer(batch)
        await evil.push_sync(a.svc.peer_id, bogus[0])  # a source of its own: the attacker's peer id
        await evil.push_sync(b.svc.peer_id, bogus[0])
        for batch in bogus[1:]:
            await evil.gossip_as_fresh_peer(batch)

        def settled(s):
            p = s.replica.pending
            return len(p), p.total_bytes, dict(p.count), dict(p.bytes), len(s.replica.missing())

        want = min(total, future_sources * per_source + per_source + flood_sources * per_source)
        with trio.fail_after(30):
            for m in fog:
                # until the buffer is full, or the flood has landed and stopped growing: some of
                # the fresh-origin messages are sometimes never delivered by py-libp2p (seen on
                # 2 cores: 9 of 17; not understood, see the session-6 note); the bounds below
                # are what this test is about
                last, since = -1, trio.current_time()
                while (n := (await read(m, settled))[0]) < want:
                    if n != last:
                        last, since = n, trio.current_time()
                    elif n >= 3 * per_source and trio.current_time() - since > 3:
                        break
                    await trio.sleep(0.1)
        flood_s = trio.current_time() - t0
        rss1 = rss_mib()
        lim = a.store.limits
        for m in fog:
            n, nbytes, count, by_source, missing = await read(m, settled)
            print(f"node {m.i}: {n} ops pending ({nbytes / 2**20:.1f} MiB accounted) from {len(count)} sources, "
                  f"{missing} missing deps")
            assert n <= lim.pending_ops and nbytes <= lim.pending_bytes
            assert max(count.values()) <= lim.pending_ops_per_source
            assert max(by_source.values()) <= lim.pending_bytes_per_source
            assert set(count) <= {evil.peer_id, *evil.fresh_ids}
        print(f"flood of {sum(map(len, held + bogus))} ops took {flood_s:.1f} s; process RSS {rss0:.0f} MiB before, "
              f"{rss1:.0f} MiB after ({rss1 - rss0:+.0f} MiB for {2 * want} pending ops on 2 nodes)")

        # an honest session during the flood: it asks for the missing deps (nobody has them)
        t1 = trio.current_time()
        during = await a.svc.sync_with(b.svc.peer_id)
        print(f"honest sync during the flood: ok={during.ok} round trips={during.round_trips} "
              f"{trio.current_time() - t1:.2f} s")
        assert during.ok and during.rejected == 0

        # the ops whose deps never came expire; held ones wait for their time (bounded by the horizon)
        later = wall_ms() + lim.pending_ttl_ms + 1000
        for m in fog:
            await m.svc.astore.tick(later)
            entries = await read(m, lambda s: list(s.replica.pending.entries.values()))
            assert all(e.need == 0 for e in entries)  # only the held ones are left
            assert len(entries) <= future_sources * per_source
            assert await m.svc.astore.missing() == set()
        rss2 = rss_mib()
        print(f"after expiry: RSS {rss2:.0f} MiB")

        await keep_working(fog, User(b"\x81" * 32), "flood")
        # flood batches may still arrive after the expiry above (gossip's lazy push brings what a
        # node missed a few heartbeats later): they wait and expire like the rest
        for m in fog:
            await m.svc.astore.tick(wall_ms() + lim.pending_ttl_ms + 1000)
            assert await m.svc.astore.missing() == set()
        t2 = trio.current_time()
        after = await a.svc.sync_with(b.svc.peer_id)
        print(f"honest sync after expiry: ok={after.ok} round trips={after.round_trips} "
              f"{trio.current_time() - t2:.2f} s")
        assert after.ok and after.round_trips == 1
        for m in fog:
            assert not any(m.store.has(sha256(w)) for w in bogus[0] + held[0])
        assert evil.peer_id not in a.svc.banned  # pending is not a crime


# ---- 7. equivocation: one message id, two payloads ------------------------------------------


@pytest.mark.slow
async def test_an_equivocating_publisher_cannot_make_honest_nodes_score_each_other_down():
    from libp2p.pubsub.pb import rpc_pb2

    async with open_fog(2, sync_interval=600) as fog, open_attacker(fog) as evil:
        a, b = fog
        await converged(fog)
        heads = await caught_up(evil, a)
        good = make_op(evil.key, "node", evil.address, deps=heads, hlc=await top_hlc(evil) + 1,
                       value={"address": evil.address, "heartbeat": 1})
        invalid, valid = evil.equivocate(b"\xc1 not msgpack", encode_batch([good.wire]))
        evil.svc.router.send_rpc(b.svc.host.get_id(), rpc_pb2.RPC(publish=[invalid]))  # to b only
        await until(lambda: b.svc.validator.rejected)
        evil.svc.router.send_rpc(a.svc.host.get_id(), rpc_pb2.RPC(publish=[valid]))  # to a only; a forwards it
        await until(lambda: a.store.has(good.id))
        await trio.sleep(0.5)
        assert_no_honest_strikes(fog)  # our own strike lists stay clean either way
        allowed = b.svc.router.scorer.allow_publish(a.svc.host.get_id(), [TOPIC])
        before = b.svc.stats.ops_from_gossip
        op = await a.heartbeat(7)
        with trio.move_on_after(3):
            while not b.store.has(op.id):
                await trio.sleep(0.05)
        by_gossip = b.svc.stats.ops_from_gossip - before
    assert allowed, "b scores honest a below its publish threshold"
    assert by_gossip == 1, "a's gossip no longer reaches b"


# ---- 7. a malformed pubsub frame --------------------------------------------------------------


async def test_a_pubsub_frame_that_does_not_parse_drops_the_stream_not_the_node():
    """py-libp2p let a protobuf DecodeError out of its pubsub stream handler, ending the whole
    host: one garbage frame stopped a node (seen under load in the 10-node test, as a truncated
    frame). Now the stream is reset, the peer dropped, and the node goes on."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
    from libp2p.utils.varint import encode_uvarint

    writer = User(b"\x33" * 32)
    async with open_fog(2) as fog, open_attacker(fog) as evil:
        for m in fog:
            stream = await evil.svc.host.new_stream(ID.from_base58(m.svc.peer_id), [PROTOCOL_ID_V11])
            garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, length past the end
            await stream.write(encode_uvarint(len(garbage)) + garbage)
        await trio.sleep(1.0)  # the frames are read (and, before the fix, the hosts ended)
        await keep_working(fog, writer, "garbage frame")
