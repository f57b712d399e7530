"""Usage metering (docs/economy.md): what this node measures of the instances it serves,
written as cumulative signed `usage` records (formation/crdt/kinds/usage_kinds.py).

Two sources:
- the VMs this node hosts (its scheduler's replicas): every `[node] usage_interval_seconds` the
  meter reads each VM's process (the scheduler's `metrics`: CPU seconds and uptime) and its tap's
  byte counters (/sys/class/net/<tap>/statistics), and adds what changed since its last look:
  CPU time; booked memory and disk times the time the VM process was up (running or paused: a
  paused VM keeps both); bytes in and out of the VM;
- the calls this node's hire proxy sent to an instance (`HireLedger`, fed by api/hire.py): how
  many, how long, and the tokens the agent reported in its answer's `X-Formation-Tokens` header.

Counters never go backwards, across VM restarts and node restarts alike. The meter keeps, per
instance, its exact totals (CPU, memory and disk in thousandths) and the last readings of the VM
process (when it booted, its CPU and uptime) and of the tap in `<data_dir>/usage.json`, written
(fsync, atomic rename) before the records that carry them. A VM process it has a reading of is
counted by difference; a new process (booted elsewhen, or its CPU or uptime went down) from its
start; a process older than its last look with no reading (the file was lost) only from now on,
so a lost file costs what was not counted, never a second count. At start the totals are also
raised to this node's own records in the state, so the records never go down either.

A record is written only when a published figure changed. What the node measured between its
last write and a crash (at most one interval) is lost, and so are the hires of that interval.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from formation.crdt.kinds.usage_kinds import COUNTERS, MAX_COUNTER
from formation.crdt.op import OpError
from formation.files import write_atomic
from formation.vm import network
from formation.vm.spec import VmError

from .ports import NodeState
from .vmside import VmSide, VmsOn

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger("formation.metering")

USAGE_FILE = "usage.json"
FILE_VERSION = 1
# counters the meter keeps in thousandths (CPU ms, MB x ms, GB x ms): a record shows whole units
MILLI = frozenset({"cpu_seconds", "memory_mb_seconds", "disk_gb_seconds"})
SAME_PROCESS_MS = 5_000  # two readings whose boot times differ by more are of two VM processes

# ---- the agent's token report -------------------------------------------------------------------

TOKENS_HEADER = "X-Formation-Tokens"
MAX_TOKENS_PER_CALL = 10**9
MAX_TOKENS_HEADER = 64  # characters
_TOKENS = re.compile(r"(in|out)=([0-9]{1,10})")


def parse_tokens(value: str | None) -> tuple[int, int] | None:
    """`X-Formation-Tokens: in=12,out=40` (either part may be missing: 0; spaces around the
    parts are allowed; each at most MAX_TOKENS_PER_CALL) -> (12, 40). None when there is no
    header, or it is not exactly that (then nothing is counted for the call's tokens)."""
    if value is None or len(value) > MAX_TOKENS_HEADER:
        return None
    got: dict[str, int] = {}
    for part in value.split(","):
        m = _TOKENS.fullmatch(part.strip())
        if m is None or m[1] in got:
            return None
        got[m[1]] = int(m[2])
    if not got or any(v > MAX_TOKENS_PER_CALL for v in got.values()):
        return None
    return got.get("in", 0), got.get("out", 0)


# ---- calls, as the hire proxy saw them ----------------------------------------------------------

@dataclass
class Tally:
    hires: int = 0
    hire_ms: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


class HireLedger:
    """The calls this node's hire proxy sent to each instance since the meter last took them,
    and this node's totals since it started (for /metrics). In memory: a crash loses at most
    one metering interval of calls."""

    MAX_PENDING = 100_000  # instances with calls not yet taken (ids come from the state)

    def __init__(self) -> None:
        self.pending: dict[str, Tally] = {}
        self.hires = 0
        self.hire_ms = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.dropped = 0  # calls not counted: MAX_PENDING instances were waiting

    def record(self, instance_id: str, ms: int, tokens: tuple[int, int] | None) -> None:
        ms = max(0, int(ms))
        tin, tout = tokens or (0, 0)
        self.hires += 1
        self.hire_ms += ms
        self.tokens_in += tin
        self.tokens_out += tout
        tally = self.pending.get(instance_id)
        if tally is None:
            if len(self.pending) >= self.MAX_PENDING:
                self.dropped += 1
                return
            tally = self.pending[instance_id] = Tally()
        tally.hires += 1
        tally.hire_ms += ms
        tally.tokens_in += tin
        tally.tokens_out += tout

    def take(self) -> dict[str, Tally]:
        taken, self.pending = self.pending, {}
        return taken


# ---- the meter ----------------------------------------------------------------------------------

class MeteringNode(NodeState, Protocol):
    vms: VmSide
    hires: HireLedger


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def tap_bytes(tap: str) -> tuple[int, int] | None:
    """(rx, tx) bytes of a tap as the host counts them (rx: what the VM sent), or None."""
    base = Path("/sys/class/net") / tap / "statistics"
    try:
        return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Entry:
    """What the meter holds of one instance: exact totals and the last readings."""

    instance_id: str
    owner: str
    started_at: int
    acc: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    memory_mb: int = 0  # booked, as the instance record said last
    disk_gb: int = 0
    vm: dict | None = None  # {"boot_ms", "cpu_ms", "up_ms"} of the VM process last seen up
    tap: dict | None = None  # {"rx", "tx"} of its tap, as last read (host side)
    seen_ms: int = 0  # when the meter last looked at its VM (0: nothing was ever counted here)
    published: dict | None = None  # counters and owner of the record last written

    def add(self, name: str, amount: int) -> None:
        if amount > 0:
            cap = MAX_COUNTER * (1000 if name in MILLI else 1)
            self.acc[name] = min(cap, self.acc[name] + amount)

    def figures(self) -> dict:
        """The counters and owner a record shows."""
        out = {c: self.acc[c] // 1000 if c in MILLI else self.acc[c] for c in COUNTERS}
        out["owner"] = self.owner
        return out

    def saved(self) -> dict:
        return {"owner": self.owner, "started_at": self.started_at, "acc": self.acc, "memory_mb": self.memory_mb,
                "disk_gb": self.disk_gb, "vm": self.vm, "tap": self.tap, "seen_ms": self.seen_ms,
                "published": self.published}

    @classmethod
    def load(cls, iid: str, d: dict) -> Entry:
        acc = dict.fromkeys(COUNTERS, 0)
        acc.update({c: int(v) for c, v in d.get("acc", {}).items() if c in acc and int(v) >= 0})
        return cls(iid, str(d["owner"]), int(d["started_at"]), acc, int(d.get("memory_mb", 0)),
                   int(d.get("disk_gb", 0)), _ints(d.get("vm"), ("boot_ms", "cpu_ms", "up_ms")),
                   _ints(d.get("tap"), ("rx", "tx")), int(d.get("seen_ms", 0)), d.get("published"))

    def raise_to(self, record: dict) -> None:
        """Totals at least those of this node's own record in the state."""
        for c in COUNTERS:
            floor = int(record.get(c, 0)) * (1000 if c in MILLI else 1)
            self.acc[c] = max(self.acc[c], floor)
        self.started_at = min(self.started_at, int(record.get("started_at", self.started_at)))


def _unwritten(entry: Entry) -> bool:
    """Whether the entry shows what no record of it shows yet (all zero: nothing to show)."""
    figures = entry.figures()
    return figures != entry.published and any(figures[c] for c in COUNTERS)


def _ints(d, keys: tuple[str, ...]) -> dict | None:
    if not isinstance(d, dict):
        return None
    return {k: int(d[k]) for k in keys}


class Meter:
    """The node's metering task (in its nursery): a look every usage_interval_seconds."""

    def __init__(self, node: MeteringNode, *, clock: Callable[[], int] = wall_ms,
                 read_tap: Callable[[str], tuple[int, int] | None] = tap_bytes):
        self.node = node
        self.clock = clock
        self.read_tap = read_tap
        self.path = node.config.data_dir / USAGE_FILE
        self.entries: dict[str, Entry] = {}
        self.writes = 0  # usage records written since the node started
        self.failures = 0  # ticks or writes that failed (logged)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.load()
        task_status.started()
        interval = float(self.node.config.node.usage_interval_seconds)
        while True:
            await trio.sleep(interval)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one failed look must not end metering
                self.failures += 1
                log.exception("metering failed (the next look tries again)")

    async def load(self) -> None:
        """The totals and readings saved by the last run, raised to this node's own records."""
        self.entries = {}
        try:
            doc = json.loads(await trio.to_thread.run_sync(self.path.read_bytes))
            for iid, d in doc.get("entries", {}).items():
                self.entries[iid] = Entry.load(iid, d)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring unreadable %s (%s): instances are counted from their records in "
                        "the state, and VM processes already running from now on", self.path, exc)
            self.entries = {}
        for iid, entry in self.entries.items():
            own = await self.node.astore.get("usage", self._key(iid))
            if own is not None:
                entry.raise_to(own)

    def _key(self, iid: str) -> str:
        return f"{iid}@{self.node.address}"

    async def tick(self) -> list[dict]:
        """One look: sample the hosted VMs, take the calls, save, write the records that changed.
        Returns the records written."""
        now = self.clock()
        side = self.node.vms
        scheduler = side.scheduler if isinstance(side, VmsOn) else None
        hosted = set(scheduler.replicas) if scheduler is not None else set()
        calls = self.node.hires.take()
        for iid in sorted(hosted | set(calls) | set(self.entries)):
            inst = await self.node.astore.get("instance", iid)
            entry = self.entries.get(iid)
            if entry is None:
                if iid not in hosted and iid not in calls:
                    continue
                entry = await self._open(iid, inst, now)
                if entry is None:  # no instance record and no usage of ours: whose is it?
                    continue
                self.entries[iid] = entry
            if inst is not None:
                res = inst.get("resources") or {}
                entry.owner = inst["owner"]
                entry.memory_mb, entry.disk_gb = int(res.get("memory_mb", 0)), int(res.get("disk_gb", 0))
            if iid in hosted:
                await self._sample(entry, scheduler, now)
            tally = calls.get(iid)
            if tally is not None:
                for name in ("hires", "hire_ms", "tokens_in", "tokens_out"):
                    entry.add(name, getattr(tally, name))
        changed = [e for e in self.entries.values() if _unwritten(e)]
        await self._save()  # the totals are on disk before any record shows them
        written = []
        for entry in changed:
            record = {"instance_id": entry.instance_id, "node": self.node.address, **entry.figures(),
                      "started_at": entry.started_at, "updated_at": max(now, entry.started_at)}
            try:
                await self.node.write("usage", self._key(entry.instance_id), record)
            except OpError as exc:  # kept: the next look writes it again
                self.failures += 1
                log.warning("instance %s: could not write its usage: %s", entry.instance_id, exc)
                continue
            entry.published = entry.figures()
            self.writes += 1
            written.append(record)
        # forget what is neither hosted here nor waiting to be written (its record holds it all)
        for iid in [i for i, e in self.entries.items() if i not in hosted and not _unwritten(e)]:
            del self.entries[iid]
        if written:
            await self._save()
        return written

    async def _open(self, iid: str, inst: dict | None, now: int) -> Entry | None:
        """The entry of an instance the meter holds none of: from this node's record of it in the
        state (totals go on from there), or new (nothing was counted here: the VM process and
        its tap are counted from their start)."""
        own = await self.node.astore.get("usage", self._key(iid))
        owner = inst["owner"] if inst is not None else own["owner"] if own is not None else None
        if owner is None:
            return None
        if own is None:
            return Entry(iid, owner, now, tap={"rx": 0, "tx": 0})
        entry = Entry(iid, owner, now, seen_ms=int(own.get("updated_at", now)) or now)
        entry.raise_to(own)
        entry.published = {**{c: own.get(c, 0) for c in COUNTERS}, "owner": own["owner"]}
        return entry

    async def _sample(self, entry: Entry, scheduler: Scheduler, now: int) -> None:
        iid = entry.instance_id
        try:
            m = await scheduler.metrics(iid)
        except (VmError, OSError) as exc:
            log.debug("instance %s: no metrics: %s", iid, exc)
            m = None
        up = m is not None and m.get("vm_state") in ("running", "paused") \
            and m.get("cpu_seconds") is not None and m.get("uptime_s") is not None
        if up:
            cpu_ms, up_ms = int(m["cpu_seconds"] * 1000), int(m["uptime_s"] * 1000)
            boot_ms = now - up_ms
            last = entry.vm
            same = (last is not None and abs(boot_ms - last["boot_ms"]) <= SAME_PROCESS_MS
                    and cpu_ms >= last["cpu_ms"] and up_ms >= last["up_ms"])
            if same:
                d_cpu, d_up = cpu_ms - last["cpu_ms"], up_ms - last["up_ms"]
            elif last is not None or boot_ms + SAME_PROCESS_MS >= entry.seen_ms:
                d_cpu, d_up = cpu_ms, up_ms  # a process born since the last look: all of it
            else:
                d_cpu = d_up = 0  # older than our last look, and no reading of it: from now on
            entry.add("cpu_seconds", d_cpu)
            entry.add("memory_mb_seconds", entry.memory_mb * d_up)
            entry.add("disk_gb_seconds", entry.disk_gb * d_up)
            entry.vm = {"boot_ms": boot_ms, "cpu_ms": cpu_ms, "up_ms": up_ms}
        else:
            entry.vm = None  # the next process seen up is a new one
        entry.seen_ms = now
        counted = self.read_tap(network.tap_name(iid))
        if counted is not None:
            rx, tx = counted
            last_tap = entry.tap
            if last_tap is not None:
                # host rx = bytes out of the VM; host tx = bytes into it; a new tap starts at 0
                entry.add("net_tx_bytes", rx - last_tap["rx"] if rx >= last_tap["rx"] else rx)
                entry.add("net_rx_bytes", tx - last_tap["tx"] if tx >= last_tap["tx"] else tx)
            entry.tap = {"rx": rx, "tx": tx}

    async def _save(self) -> None:
        doc = {"version": FILE_VERSION, "node": self.node.address,
               "entries": {iid: e.saved() for iid, e in sorted(self.entries.items())}}
        await trio.to_thread.run_sync(write_atomic, self.path, json.dumps(doc, separators=(",", ":")))
