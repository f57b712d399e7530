"""Where an instance's replicas run, decided by every node alike from the shared state.

Rendezvous (highest-random-weight) hashing: each live node that can hold the instance gets the
score SHA-256(instance id || node address); the `replicas` highest scores win. Every node
computes the same answer from the same state, so no coordinator is needed; when a node dies or
joins, only the replicas whose ranking changes move.

"Live" reads the caller's clock (a node's heartbeat older than `stale_ms`), so two nodes whose
clocks disagree can briefly disagree about a node at the edge of the timeout; the reconcile loop
settles it on its next pass. Memory and GPUs are booked against each node's advertised capacity
in the instances' creation order (place_all), so a node is not overcommitted.

A node's own records are claims; placement moves on other members' evidence:
- liveness: another live member lists it among its connections (`seen`); a node that beats
  but is listed by nobody yet (`unvouched`: it just came back) does not retire its own replicas
  on that view (scheduler);
- doubts: a replica placed on a node that does not report it running within the placement
  deadline is noted by the members that watch it (`Doubts`, published in their node records as
  "<instance>@<node>"); once DOUBTERS_NEEDED other members (fewer if the fog has fewer) doubt
  it, that node is passed over for that instance, by every node alike, until the doubt lapses;
- capacity against reports: a node that reports running more memory than twice what it
  declares (a retiring replica may overlap its successor, never more) contradicts itself and
  is not placed on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_STALE_MS = 90_000  # three missed 30 s heartbeats
DOUBTERS_NEEDED = 2  # one member's word alone moves nothing (unless it is the only other one)
DOUBT_TTL = 3600.0  # seconds: a doubted node is tried again after this
MAX_DOUBTS = 256  # what a node record holds (node_kinds.Node.doubts)


def stale_after_ms(heartbeat_seconds: int) -> int:
    """When a node counts as dead: three missed heartbeats."""
    return 3 * heartbeat_seconds * 1000


def is_live(node: dict | None, now_ms: int, stale_ms: int) -> bool:
    """A recent heartbeat; one dated further ahead than `stale_ms` is a lie, not a fresh beat
    (it would keep the node "live" for as long as it names)."""
    return node is not None and abs(now_ms - node.get("heartbeat", 0)) <= stale_ms


def live_nodes(nodes: Iterable[dict], now_ms: int, stale_ms: int) -> list[dict]:
    """The nodes placement may use: a recent heartbeat, and — when there is anyone else to say
    so — another such node that lists it among the nodes it is connected to (`seen`). A node's
    own records are its claim; another member's connection is evidence, so a member that
    publishes fresh heartbeats but serves nobody is not placed on."""
    beating = [n for n in nodes if is_live(n, now_ms, stale_ms)]
    if len(beating) <= 1:
        return beating
    vouched = {a for n in beating for a in n.get("seen") or [] if a != n["address"]}
    return [n for n in beating if n["address"] in vouched]


def unvouched(nodes: Iterable[dict], address: str, now_ms: int, stale_ms: int) -> bool:
    """`address` has a recent heartbeat but is not live: no other live member lists it among its
    connections. What a node sees of itself for a heartbeat or so after it comes back from a
    partition that outlasted its connections: the others' newest records still say they lost
    it. Not evidence that it is gone (scheduler: a replica is not handed over on it)."""
    nodes = list(nodes)
    own = next((n for n in nodes if n["address"] == address), None)
    return is_live(own, now_ms, stale_ms) and all(n["address"] != address
                                                  for n in live_nodes(nodes, now_ms, stale_ms))


def overclaims(node: dict, running_mb: Mapping[str, int]) -> bool:
    """It reports running more memory than twice its declared capacity: its claims disagree."""
    declared = (node.get("capacity") or {}).get("memory_mb", 0)
    return running_mb.get(node["address"], 0) > 2 * declared


def running_memory(statuses: Iterable[dict], instances: Iterable[dict]) -> dict[str, int]:
    """Memory each node reports holding: its `running` and `paused` (a paused VM keeps its
    memory) instance_status reports, priced by the instances' resources (a report of an unknown
    instance costs nothing)."""
    memory = {i["instance_id"]: (i.get("resources") or {}).get("memory_mb", 0) for i in instances}
    out: dict[str, int] = {}
    for s in statuses:
        if s.get("state") in ("running", "paused"):
            out[s["node"]] = out.get(s["node"], 0) + memory.get(s["instance_id"], 0)
    return out


def doubters(live: Iterable[dict]) -> dict[str, set[str]]:
    """"<instance>@<node>" -> the live members that doubt that replica (not the node itself)."""
    out: dict[str, set[str]] = {}
    for n in live:
        for d in n.get("doubts") or []:
            if d.rpartition("@")[2] != n["address"]:
                out.setdefault(d, set()).add(n["address"])
    return out


def observers(live: Iterable[dict]) -> set[str]:
    """Who watches placements: the live members that run VMs (their schedulers do)."""
    return {n["address"] for n in live if (n.get("capacity") or {}).get("vms", True) is not False}


def passed_over(doubted: Mapping[str, set[str]], watching: set[str], instance_id: str, address: str) -> bool:
    who = doubted.get(f"{instance_id}@{address}")
    if not who:
        return False
    return len(who) >= min(DOUBTERS_NEEDED, len(watching - {address}))


def has_gpus(cap: dict, gpu: dict | None) -> bool:
    """Whether a node's capacity holds the GPUs an instance asks for: as many as it asks that a
    VM can be given, of the model it names (any model when it names none). GPUs are booked by
    count (BOOKED): on a node with GPUs of two models, a booked GPU is not told apart by model."""
    if not gpu:
        return True
    count, model = gpu.get("count", 0), gpu.get("model")
    if model:
        models = cap.get("gpu_models") or []
        return isinstance(models, list) and models.count(model) >= count
    return cap.get("gpus", 0) >= count


def gpu_wish(gpu: dict | None) -> str:
    if not gpu:
        return "0 GPUs"
    count, model = gpu.get("count", 0), gpu.get("model")
    return f"{count} {model + ' ' if model else ''}GPU{'s' * (count != 1)} a VM can be given (VFIO)"


def fits(node: dict, resources: dict) -> bool:
    cap = node.get("capacity") or {}
    return (cap.get("vms", True) is not False  # a node that runs no VMs says so
            and cap.get("vcpus", 0) >= resources.get("vcpus", 1)
            and cap.get("memory_mb", 0) >= resources.get("memory_mb", 0)
            and cap.get("disk_gb", 0) >= resources.get("disk_gb", 0)
            and has_gpus(cap, resources.get("gpu")))


# What placement books per node, in the instances' creation order: the node's advertised
# capacity, less what the instances placed on it before ask for. A VM's disk is capped at its
# DISK (the overlay's size), so booked disk is disk the node can give; a node advertises the
# disk its VMs may fill (capacity.py) and how many VM addresses its subnet holds (none said:
# not limited, as for a node of an older version).
BOOKED = ("memory_mb", "gpus", "disk_gb", "vm_addresses")
_WHAT = {"memory_mb": "memory", "gpus": "GPUs", "disk_gb": "disk", "vm_addresses": "VM addresses"}


def room(node: dict) -> dict[str, float]:
    cap = node.get("capacity") or {}
    addresses = cap.get("vm_addresses")
    return {"memory_mb": cap.get("memory_mb", 0), "gpus": cap.get("gpus", 0),
            "disk_gb": cap.get("disk_gb", 0), "vm_addresses": math.inf if addresses is None else addresses}


def needs(instance: dict) -> dict[str, int]:
    res = instance.get("resources") or {}
    return {"memory_mb": res.get("memory_mb", 0), "gpus": (res.get("gpu") or {}).get("count", 0),
            "disk_gb": res.get("disk_gb", 0), "vm_addresses": 1}


def _creation_order(instance: dict) -> tuple[int, str]:
    return instance.get("created_at", 0), instance["instance_id"]


def score(instance_id: str, address: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{instance_id}|{address}".encode()).digest()[:8], "big")


def place(instance: dict, nodes: Iterable[dict], *, now_ms: int, stale_ms: int = DEFAULT_STALE_MS,
          statuses: Iterable[dict] = ()) -> list[str]:
    """Addresses of the nodes that should run `instance`'s replicas, best first, if it were the
    only instance."""
    return place_all([instance], nodes, now_ms=now_ms, stale_ms=stale_ms, statuses=statuses)[instance["instance_id"]]


def candidates(nodes: Iterable[dict], instances: list[dict], statuses: Iterable[dict], *,
               now_ms: int, stale_ms: int) -> list[dict]:
    """The live nodes whose capacity claims do not contradict their reports."""
    used = running_memory(statuses, instances)
    return [n for n in live_nodes(nodes, now_ms, stale_ms) if not overclaims(n, used)]


def place_all(instances: Iterable[dict], nodes: Iterable[dict], *, now_ms: int,
              stale_ms: int = DEFAULT_STALE_MS, statuses: Iterable[dict] = ()) -> dict[str, list[str]]:
    """Every instance's replicas. Memory, GPUs, disk and VM addresses (BOOKED) are not
    overcommitted: instances take what is left on each node in creation order (oldest first, then
    id), so a new instance never moves an older one; a stopped instance keeps its room (and its
    disk), so starting it again lands where it was. vCPUs are checked per instance only (they
    are shared). `statuses`: the instance_status reports (running ones count; see the module's
    docstring)."""
    instances = list(instances)
    live = candidates(nodes, instances, statuses, now_ms=now_ms, stale_ms=stale_ms)
    return _book(instances, live, doubters(live), observers(live))[0]


def _book(instances: list[dict], live: list[dict], doubted: Mapping[str, set[str]], watching: set[str],
          until: tuple[int, str] | None = None) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """place_all's booking: the placements and what is left on each node (of the instances
    created before `until`, when given)."""
    left = {n["address"]: room(n) for n in live}
    out: dict[str, list[str]] = {}
    for inst in sorted(instances, key=_creation_order):
        if until is not None and _creation_order(inst) >= until:
            break
        want = needs(inst)
        fit = [n for n in live if fits(n, inst.get("resources") or {})
               and all(left[n["address"]][k] >= want[k] for k in BOOKED)
               and not passed_over(doubted, watching, inst["instance_id"], n["address"])]
        ranked = sorted(fit, key=lambda n: (score(inst["instance_id"], n["address"]), n["address"]),
                        reverse=True)[: inst.get("replicas", 1)]
        for n in ranked:
            for k in BOOKED:
                left[n["address"]][k] -= want[k]
        out[inst["instance_id"]] = [n["address"] for n in ranked]
    return out, left


def shortfall(instance: dict, placed: list[str], nodes: Iterable[dict], *, now_ms: int,
              stale_ms: int = DEFAULT_STALE_MS, statuses: Iterable[dict] = (),
              instances: Iterable[dict] = ()) -> str | None:
    """Why `instance` got fewer replicas than it asks for (None when it got them all): what no
    live node offers, or that the nodes that could are full (with `instances`, every instance of
    the fog: which of the booked resources the older instances took)."""
    wanted = instance.get("replicas", 1)
    if len(placed) >= wanted:
        return None
    live = candidates(nodes, [instance], statuses, now_ms=now_ms, stale_ms=stale_ms)
    res = instance.get("resources") or {}
    needs = [("runs VMs", lambda c: c.get("vms", True) is not False),
             (f"{res.get('vcpus', 1)} vCPUs", lambda c: c.get("vcpus", 0) >= res.get("vcpus", 1)),
             (f"{res.get('memory_mb', 0)} MB of memory", lambda c: c.get("memory_mb", 0) >= res.get("memory_mb", 0)),
             (f"{res.get('disk_gb', 0)} GB of disk", lambda c: c.get("disk_gb", 0) >= res.get("disk_gb", 0)),
             (gpu_wish(res.get("gpu")), lambda c: has_gpus(c, res.get("gpu")))]
    got = f"{len(placed)} of {wanted} replicas placed"
    if not live:
        return f"{got}: no live node in the fog"
    for what, ok in needs:
        if not any(ok(n.get("capacity") or {}) for n in live):
            return f"{got}: no live node {what if what == 'runs VMs' else 'has ' + what}"
    doubted, watching = doubters(live), observers(live)
    passed = [n for n in live if passed_over(doubted, watching, instance["instance_id"], n["address"])]
    if passed:
        return (f"{got}: the nodes that fit are full or too few ({len(live)} live; {len(passed)} passed "
                f"over for this instance: they did not run it in time)")
    full = _full(instance, list(instances), live, doubted, watching)
    return f"{got}: the nodes that fit are full or too few ({len(live)} live{full})"


def _full(instance: dict, instances: list[dict], live: list[dict], doubted: Mapping[str, set[str]],
          watching: set[str]) -> str:
    """"; <resource> taken on N", for what the instances created before `instance` left too
    little of on the nodes that otherwise fit it ("" without the instances)."""
    if not instances:
        return ""
    left = _book(instances, live, doubted, watching, until=_creation_order(instance))[1]
    want = needs(instance)
    short = {k: sum(1 for n in live if fits(n, instance.get("resources") or {})
                    and left[n["address"]][k] < want[k]) for k in BOOKED}
    said = [f"{_WHAT[k]} taken on {count}" for k, count in short.items() if count]
    return "; " + ", ".join(said) if said else ""


@dataclass
class Doubts:
    """What one node saw of the replicas placed on other nodes: a pair (instance, node) placed
    and wanted running but not reported running at the instance's generation for `deadline`
    seconds becomes a doubt, published in the watcher's node record. A doubt lapses when the
    node reports the replica running, when the instance is gone, or after DOUBT_TTL (the node
    gets another chance). Times are the watcher's own monotonic clock: nobody else's claim of
    time enters."""

    deadline: float
    pending: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)  # "<instance>@<node>" -> doubted at

    def observe(self, now: float, expected: Mapping[tuple[str, str], int], running: set[tuple[str, str]],
                instances: set[str]) -> bool:
        """`expected`: (instance, node) -> the generation placement wants running there;
        `running`: the pairs reported running at their instance's generation; `instances`: the
        ids that exist. True when the published list changed."""
        before = self.published()
        for pair, generation in expected.items():
            if pair in running:
                self.pending.pop(pair, None)
                continue
            first = self.pending.get(pair)
            if first is None or first[0] != generation:
                self.pending[pair] = (generation, now)
            elif now - first[1] >= self.deadline:
                self.since.setdefault(f"{pair[0]}@{pair[1]}", now)
        for pair in [p for p in self.pending if p not in expected]:
            del self.pending[pair]
        for key, at in list(self.since.items()):
            iid, _, node = key.rpartition("@")
            if iid not in instances or (iid, node) in running or now - at >= DOUBT_TTL:
                del self.since[key]
        return self.published() != before

    def published(self) -> list[str]:
        """The newest MAX_DOUBTS doubts, sorted (what the node record carries)."""
        newest = sorted(self.since, key=lambda k: (-self.since[k], k))[:MAX_DOUBTS]
        return sorted(newest)
