"""Endpoints of the shared state: health, accounts, instances, nodes, DNS, models and agents,
any record by kind and key, the event stream, and every signed write.

Every user write is the user's own signed request, handed to the node runtime unchanged; the
op that carries it is what the fog replicates. Reads show a record with its `record_version`
(what a write on it names as ?base=) to whoever may see it (views.py).
"""

from __future__ import annotations

import json
import re
import time
import weakref

import trio

from formation.crdt.intents import MAX_BODY, write_routes
from formation.crdt.kinds import get_kind, registry
from formation.crdt.kinds.user_kinds import formfile_model
from formation.crdt.op import OpError
from formation.crdt.strict import StrictError, parse_json

from .. import fogview
from ..placement import stale_after_ms
from . import views
from .credits import NODE_FIELDS, refuse_nonmember_nodes, shown_balance
from .http import PAGING, STATUS_OF_CODE, ApiError, Call, Endpoint, Handler, paged
from .schemas import (
    ADDRESS,
    BOOLEAN,
    COUNT,
    SEARCH_SCHEMA,
    SEED_INSTANCE_GET,
    STRING,
    VERSION,
    array,
    error_doc,
    nullable,
    obj,
    page_schema,
    ref,
    shown_schema,
    write_body_schema,
    write_result_schema,
)

ASYNC_ACTIONS = {("instance", "create"), ("instance", "start"), ("instance", "stop"),
                 ("instance", "restart"), ("instance", "delete"), ("instance", "pause"), ("instance", "resume")}


def write_status(kind: str, action: str) -> int:
    """202 when the scheduler does the work later, 201 for a create, 200 otherwise."""
    return 202 if (kind, action) in ASYNC_ACTIONS else 201 if action == "create" else 200


# ---- node -------------------------------------------------------------------------------------

VM_STATUS = obj({"enabled": BOOLEAN, "reason": STRING},
                {"starting": BOOLEAN, "accel": STRING, "machine": STRING, "bridge": STRING, "subnet": STRING,
                 "replicas": COUNT, "kernel": nullable(STRING), "nat": BOOLEAN})
HEALTH = obj({"status": {"type": "string", "enum": ["healthy", "degraded"]}, "problems": array(STRING),
              "version": STRING, "address": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
              "peer_id": STRING, "ops": COUNT, "peers": COUNT, "vms": VM_STATUS})


async def health(call: Call):
    st = await call.runtime.status(full=False)
    problems = call.runtime.health_problems(len(st["connected"]), st["pending"])
    return {"status": "degraded" if problems else "healthy", "problems": problems,
            "version": st["version"], "address": st["address"], "peer_id": st["peer_id"], "ops": st["ops"],
            "peers": len(st["connected"]), "vms": st["vms"]}, 200


async def node_list(call: Call):
    return paged("nodes", await views.visible_rows(call, "node"), call.query), 200


async def node_get(call: Call):
    return await views.visible_or_404(call, "node", call.params["id"].lower()), 200


# ---- writes -----------------------------------------------------------------------------------

def make_write(kind: str, action: str) -> Handler:
    async def handler(call: Call):
        if len(call.body) > MAX_BODY:
            raise ApiError(413, "too_large", f"body is {len(call.body)} bytes, the limit is {MAX_BODY}")
        if kind in MODEL_BOUND and action in ("create", "update"):
            await _refuse_missing_model(call, kind)
        if kind in NODE_FIELDS:
            await refuse_nonmember_nodes(call, kind)
        try:
            op = await call.runtime.submit_request(call.signed.message, call.body, call.signed.signature)
        except OpError as exc:
            raise ApiError(STATUS_OF_CODE.get(exc.code, 400), exc.code, exc.detail) from None
        answer = {"op_id": op.id.hex(), "kind": op.kind, "key": op.key, "id": op.key}
        if kind == "instance":
            answer.update(await _seed_answer(call, op.key, action))
        return answer, write_status(kind, action)

    return handler


# The original README's answer to an instance write (seeds: "Creating the Agent Instance"),
# given beside ours: its build id is the record's build_id, or (a create from a Formfile that
# names no build: the node builds it) the instance's name, which GET /instance/{build_id}/
# get_by_build_id finds too, as the README says.
SEED_VERBS = {"create": "creation", "update": "update", "delete": "deletion", "authorize": "authorization",
              "transfer": "transfer"}


def seed_ids(iid: str, value: dict | None) -> dict:
    """The README's names of an instance: `instanceId`, and `buildId` (its build_id, or its name
    when it names no build; null once deleted). One mapping, for the writes' answers and GET."""
    return {"instanceId": iid, "buildId": (value.get("build_id") or value.get("name")) if value else None}


async def _seed_answer(call: Call, iid: str, action: str) -> dict:
    value = await call.runtime.astore.get("instance", iid)
    verb = SEED_VERBS.get(action, action)
    later = " and is being processed" if ("instance", action) in ASYNC_ACTIONS else ""
    return {**seed_ids(iid, value), "status": "REQUEST_RECEIVED",
            "message": f"Instance {verb} request received{later}."}


def seed_status(inst: dict, statuses: list[dict]) -> str:
    """The README's `status` of an instance (RUNNING, PENDING_BUILD, BUILDING, STARTING, ...),
    from what the live nodes report of its replicas (a dead node's last word is left out) and
    what its owner asked for. Decision: PENDING_BUILD while no replica reports and the instance
    names no build (its nodes build its Formfile), PENDING when it names one."""
    states = {s["state"] for s in statuses if s.get("node_alive")}
    desired = inst.get("desired_state")
    if "running" in states:
        return "RUNNING"
    if desired == "stopped":
        return "STOPPED"
    for state, shown in (("paused", "PAUSED"), ("booting", "STARTING"), ("building", "BUILDING"),
                         ("failed", "FAILED"), ("stopped", "STOPPED")):
        if state in states:
            return shown
    return "PENDING" if inst.get("build_id") else "PENDING_BUILD"


def _iso(seconds) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if isinstance(seconds, int) else None


def seed_view(inst: dict, statuses: list[dict]) -> dict:
    """What the README's GET /instance/:instance_id/get answers (camelCase), from our record."""
    ips = [s["ip"] for s in statuses if s.get("node_alive") and s.get("state") == "running" and s.get("ip")]
    return {**seed_ids(inst["instance_id"], inst), "ownerAddress": inst["owner"],
            "status": seed_status(inst, statuses), "formnetIp": ips[0] if ips else None,
            "createdAt": _iso(inst.get("created_at")), "updatedAt": _iso(inst.get("updated_at"))}


# ---- a Formfile's required model ----------------------------------------------------------------

MODEL_BOUND = frozenset({"instance", "agent"})  # kinds whose record binds its Formfile's MODEL


async def _refuse_missing_model(call: Call, kind: str) -> None:
    """A create (or an update that changes it) whose Formfile says `MODEL required:<id>` naming
    no model this node knows, visible to the signer, is refused here (422 unknown_model). Not
    validity: a kind reads only the op and its own record, never another record, so the same
    write from a peer is accepted; this only keeps honest clients from binding what is not
    there at the time, on the node their request reaches."""
    try:
        body = parse_json(call.body) if call.body else {}
    except StrictError:
        return  # the kind refuses it, saying why
    formfile = body.get("formfile") if isinstance(body, dict) else None
    if not isinstance(formfile, str):
        return
    try:
        ref = formfile_model(formfile)
    except ValueError:
        return  # the kind refuses it, saying why
    if ref is None or not ref[2]:
        return
    line, model_id, _ = ref
    key = call.params.get("id") or body.get(f"{kind}_id")
    if isinstance(key, str) and key:
        current = await call.runtime.astore.get(kind, key)
        if current and current.get("model_id") == model_id and current.get("model_required"):
            return  # already bound to it: not a new binding
    model = await views.with_version(call, "model", model_id)
    if not views.visible("model", model, call.who):
        raise ApiError(422, "unknown_model", f"field 'formfile': line {line}: MODEL required:{model_id} names "
                       "no model on this node; publish it first (`form model register`, POST /models), pick "
                       f"one from `form model list` (GET /models), or make it `MODEL preferred:{model_id}`")


# ---- accounts and instances -------------------------------------------------------------------

async def account_get(call: Call):
    addr = call.params["address"].lower()
    if addr != call.who:
        raise ApiError(403, "forbidden", "an account is readable only by its own address")
    return await shown_balance(call, await views.visible_or_404(call, "account", addr)), 200


async def account_list(call: Call):
    value = await views.with_version(call, "account", call.who)
    if value:
        value = await shown_balance(call, value)
    return {"accounts": [value] if value else [], "count": 1 if value else 0}, 200


PLACEMENT = obj({"nodes": array(ADDRESS), "problem": nullable(STRING)})


def instance_detail_schema() -> dict:
    return shown_schema("instance", replicas_status=array(shown_schema("instance_status", node_alive=BOOLEAN)),
                        placement=PLACEMENT, **SEED_INSTANCE_GET)


async def instance_get(call: Call):
    """The instance, its replicas and placement; beside them the README's camelCase fields."""
    inst = await views.visible_or_404(call, "instance", call.params["id"])
    statuses = await views.replica_statuses(call, inst["instance_id"])
    return {**inst, "replicas_status": statuses, "placement": await _placement(call, inst),
            **seed_view(inst, statuses)}, 200


async def _placement(call: Call, inst: dict) -> dict:
    """Where the fog places the instance now, and why it cannot place all of it (e.g. no node
    has the GPUs it asks for) instead of leaving it pending in silence."""
    if inst.get("over_quota"):  # inert (crdt/quotas.py): no node places it
        return {"nodes": [], "problem": f"not placed: {inst['over_quota']}"}
    view = await fogview.read(call.runtime, now_ms=int(time.time() * 1000),
                              stale_ms=stale_after_ms(call.runtime.config.node.heartbeat_seconds))
    placed = view.placements().get(inst["instance_id"], [])
    return {"nodes": placed, "problem": view.shortfall(inst, placed)}


async def instance_by_build(call: Call):
    """The instances of a build the caller may see: those whose build_id is the one asked, and
    (the README's "build_id (the name you provided during creation)") those of that name."""
    wanted = call.params["build_id"]
    items = await views.visible_rows(call, "instance", type=wanted)
    seen = {i["instance_id"] for i in items}
    items += [i for i in await views.instances_named(call, wanted) if i["instance_id"] not in seen]
    return {"instances": items, "count": len(items)}, 200


async def instance_list(call: Call):
    return paged("instances", await views.visible_rows(call, "instance"), call.query), 200


# ---- dns and any record -----------------------------------------------------------------------

async def dns_list(call: Call):
    rows = await views.visible_rows(call, "dns", owner=call.query.get("owner"))
    rows.sort(key=lambda r: (r["domain"], r["owner"], r["record_id"]))
    return paged("records", rows, call.query), 200


async def dns_get(call: Call):
    return await views.visible_or_404(call, "dns", call.params["id"]), 200


def shown_kinds() -> list[str]:
    """The kinds GET /records/{kind}/{key} may show."""
    return sorted(set(registry()) - views.NEVER_SHOWN)


def record_answer_schema() -> dict:
    return obj({"kind": {"type": "string", "enum": shown_kinds()}, "key": STRING, "record_version": VERSION,
                "value": {"anyOf": [ref(k) for k in shown_kinds()]}})


async def record_get(call: Call):
    """Any record by kind and key, with its version: what a client signs its next write on."""
    kind, key = call.params["kind"], call.params["key"]
    if get_kind(kind) is None:
        raise ApiError(404, "not_found", f"no kind {kind!r}")
    value = await views.visible_or_404(call, kind, key)
    return {"kind": kind, "key": key, "record_version": value["record_version"], "value": value}, 200


# ---- models and agents ------------------------------------------------------------------------

CATALOG_QUERY = {name: {"type": "string"} for name in ("owner", "type", "tag", "q", "framework")}
MAX_SEARCH_WORDS = 32  # words of a text search (each is one condition of the query)
MAX_SEARCH_CHARS = 1024


def search_text(text: str | None, name: str) -> str | None:
    """A text search as given, or 400 when it is more than the node searches for."""
    if text is not None and (len(text) > MAX_SEARCH_CHARS or len(text.split()) > MAX_SEARCH_WORDS):
        raise ApiError(400, "bad_field", f"{name}: a text search is at most {MAX_SEARCH_WORDS} words and "
                                         f"{MAX_SEARCH_CHARS} characters")
    return text


def catalog_handlers(kind: str, plural: str):
    type_field = "model_type" if kind == "model" else "agent_type"

    async def listing(call: Call):
        q = call.query
        rows = await views.visible_rows(call, kind, owner=q.get("owner"), type=q.get("type"), tag=q.get("tag"),
                                        text=search_text(q.get("q"), "query parameter 'q'"))
        rows = [r for r in rows if views.matches(r, type_field=type_field, filters={"framework": q.get("framework")})]
        return paged(plural, rows, q), 200

    async def get_one(call: Call):
        return await views.visible_or_404(call, kind, call.params["id"]), 200

    async def search(call: Call):
        body = call.json()
        unknown = set(body) - set(SEARCH_SCHEMA["properties"])
        if unknown:
            raise ApiError(400, "bad_field", f"unknown search field {sorted(unknown)[0]!r}")
        tags = body.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ApiError(400, "bad_field", "field 'tags' must be a list of strings")
        for name in ("type", "framework", "owner", "text"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise ApiError(400, "bad_field", f"field {name!r} must be a string")
        rows = await views.visible_rows(call, kind, owner=body.get("owner"), type=body.get("type"),
                                        tag=tags[0] if tags else None,
                                        text=search_text(body.get("text"), "field 'text'"))
        rows = [r for r in rows if views.matches(r, type_field=type_field, filters=body)]
        return paged(plural, rows, {k: str(body[k]) for k in ("limit", "offset") if k in body}), 200

    return listing, get_one, search


# ---- events -----------------------------------------------------------------------------------

EVENTS_BATCH = 256  # ops read from the store per call (one store call per batch)
EVENTS_BATCH_BYTES = 1024 * 1024  # lines one batch holds, about (at least one op)
EVENTS_KEEPALIVE = 15.0  # seconds between keep-alive lines on a quiet stream


def event_lines(store, seq: int, who: str | None, *, limit: int, max_bytes: int) -> tuple[str, int]:
    """NDJSON lines for the ops after `seq` that `who` may see, and the seq they reach. Runs
    in the store's thread: one store call reads a whole batch (the ops and their values)."""
    out: list[str] = []
    size = 0
    for m in store.since(seq, limit):
        seq = m.seq
        if m.kind in views.NEVER_SHOWN:
            continue
        value = store.get(m.kind, m.key)
        # a deletion names a record whose value is gone: who could see it is unknown, so only
        # deletions of public kinds are streamed (others would leak private ids)
        if value is None:
            if m.kind not in views.PUBLIC:
                continue
        elif not views.visible(m.kind, value, who):
            continue
        line = json.dumps({"event": "op", "seq": m.seq, "op_id": m.id.hex(), "kind": m.kind, "key": m.key,
                           "value": value}) + "\n"
        out.append(line)
        size += len(line)
        if size >= max_bytes:
            break
    return "".join(out), seq


async def events(call: Call):
    """NDJSON: one line per committed op the caller may see; `since` = op id or sequence.

    Signed; each stream reads the log one batch at a time and sends it before reading the
    next (so a slow reader holds one batch, not the log), and a node serves a bounded number
    of streams per caller and in all (429 past them)."""
    seq = await _resolve_since(call, call.query.get("since", "0"))
    runtime = call.runtime
    slot = runtime.changes.streams.take(call.who)
    if isinstance(slot, str):
        raise ApiError(429, "too_many_streams", slot + "; close one (or wait for it to end) and ask again")

    async def lines():
        nonlocal seq
        try:
            yield json.dumps({"event": "hello", "seq": seq}) + "\n"
            while True:
                text, reached = await runtime.astore.run(event_lines, runtime.astore.store, seq, call.who,
                                                          limit=EVENTS_BATCH, max_bytes=EVENTS_BATCH_BYTES)
                if reached > seq:
                    seq = reached
                    if text:
                        yield text
                    continue
                with trio.move_on_after(EVENTS_KEEPALIVE) as quiet:  # read all: wait for a commit
                    await runtime.changes.wait_past(max(seq, runtime.changes.last_seq))
                if quiet.cancelled_caught:
                    yield json.dumps({"event": "keepalive", "seq": seq}) + "\n"
        finally:
            slot.release()

    stream = lines()
    weakref.finalize(stream, slot.release)  # a stream never started still gives its slot back
    return stream, 200


async def _resolve_since(call: Call, since: str) -> int:
    if re.fullmatch(r"[0-9]{1,12}", since):
        return int(since)
    try:
        op_id = bytes.fromhex(since)
    except ValueError:
        raise ApiError(400, "bad_field", "query parameter 'since' is a sequence number or an op id (hex)") from None
    meta = await call.runtime.astore.op_meta(op_id)
    if meta is None:
        raise ApiError(404, "not_found", f"no op {since}")
    return meta.seq


# ---- the table --------------------------------------------------------------------------------

TOO_EARLY = {425: error_doc("the request is dated too far ahead of the node's clock (too_early)")}


def endpoints() -> list[Endpoint]:
    eps = [
        Endpoint("GET", "/health", "Node health and identity", "none", health, tags=["node"], answer=HEALTH),
        Endpoint("GET", "/account/{address}/get", "Your account", "required", account_get, tags=["accounts"],
                 answer=ref("account")),
        Endpoint("GET", "/account/list", "Accounts you may see (your own)", "required", account_list,
                 tags=["accounts"], answer=obj({"accounts": array(ref("account")), "count": COUNT})),
        Endpoint("GET", "/instance/list", "Instances you own or are authorized on", "required", instance_list,
                 tags=["instances"], query=PAGING, answer=page_schema("instances", ref("instance"))),
        Endpoint("GET", "/instance/{id}/get", "One instance with its replicas' status", "required", instance_get,
                 tags=["instances"], answer=instance_detail_schema()),
        Endpoint("GET", "/instance/{build_id}/get_by_build_id", "Your instances of a build", "required",
                 instance_by_build, tags=["instances"],
                 answer=obj({"instances": array(ref("instance")), "count": COUNT})),
        Endpoint("GET", "/node/list", "Nodes of the fog", "none", node_list, tags=["node"], query=PAGING,
                 answer=page_schema("nodes", ref("node"))),
        Endpoint("GET", "/node/{id}/get", "One node", "none", node_get, tags=["node"], answer=ref("node")),
        Endpoint("GET", "/dns/list", "DNS records", "none", dns_list, tags=["dns"],
                 query={"owner": {"type": "string"}, **PAGING}, answer=page_schema("records", ref("dns"))),
        Endpoint("GET", "/dns/{id}/get", "One DNS record", "none", dns_get, tags=["dns"], answer=ref("dns")),
        Endpoint("GET", "/records/{kind}/{key}", "Any record with its record_version (the base of a write on it)",
                 "optional", record_get, tags=["records"], answer=record_answer_schema()),
        Endpoint("GET", "/events", "Live stream of state changes you may see (NDJSON, signed)", "required",
                 events, tags=["events"], stream=True, query={"since": {"type": "string"}},
                 responses={429: error_doc("too many event streams open: of this caller, or on this node "
                                           "(too_many_streams)")}),
    ]
    for kind, plural, base in (("model", "models", "/models"), ("agent", "agents", "/agents")):
        listing, get_one, search = catalog_handlers(kind, plural)
        eps += [
            Endpoint("GET", base, f"List {plural} you may see", "optional", listing, tags=[plural],
                     query={**PAGING, **CATALOG_QUERY}, answer=page_schema(plural, ref(kind))),
            Endpoint("GET", base + "/{id}", f"One {kind}", "optional", get_one, tags=[plural], answer=ref(kind)),
            Endpoint("POST", base + "/search", f"Search {plural}", "optional", search, body=SEARCH_SCHEMA,
                     tags=[plural], answer=page_schema(plural, ref(kind))),
        ]
    for method, pattern, kind, action in write_routes():
        eps.append(Endpoint(method, pattern, f"{action} {kind} (signed write)", "required",
                            make_write(kind, action), body=write_body_schema(get_kind(kind), action),
                            ok=write_status(kind, action), tags=[kind], write=True,
                            answer=write_result_schema(kind), responses=TOO_EARLY))
    return eps
