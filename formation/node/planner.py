"""The replica planner: for one instance placed on this node, what to do next, decided from what
was observed and remembered, with no IO (no awaits, no clock, no files) so that every transition
is a table row a test can check (tests/unit/test_planner.py).

The scheduler (scheduler.py) gathers an `Observed` for each instance, calls `plan`, saves the
replica memory it returns and carries out its actions in order. The lifecycle a replica reports
(pending, building, booting, running, paused, stopped, failed) follows from one classified event per
look, h11-style: `classify` names what the observation is, `TRANSITIONS` says what that event
makes the replica report and which actions it takes; `plan` fills in the reasons.

Timers are plain numbers on the scheduler's clock (trio's, so MockClock drives them in tests):
a VM that keeps exiting is booted again after a growing back-off, and a build context that no
connected node had is asked for again after CONTEXT_RETRY seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from pathlib import Path

from formation.guest import ServiceView

CONTEXT_RETRY = 15.0  # seconds before peers are asked again for a build context they lacked
CRASH_LOOP_EXITS = 3  # entrypoint exits in one boot that make the replica "failed"
BACKOFF_FIRST = 2.0  # seconds before the second boot of a VM that exited soon after its boot
BACKOFF_MAX = 300.0
STABLE_AFTER = 120.0  # a VM that lived this long before exiting starts a new crash streak


class State(enum.StrEnum):
    PENDING = "pending"
    BUILDING = "building"
    BOOTING = "booting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"


# ---- what the planner sees ----------------------------------------------------------------------


@dataclass(frozen=True)
class Desired:
    """The instance record's part the planner needs."""

    generation: int
    running: bool  # desired_state is "running"
    build_id: str | None
    has_formfile: bool
    port: int | None = None  # the first EXPOSEd port: "running" waits until it answers
    paused: bool = False  # desired_state is "paused": the VM keeps its memory, its vCPUs stopped
    hold: str = ""  # why it may not run now though its owner wants it (unpaid rent): stopped, saying so


@dataclass(frozen=True)
class Build:
    """A build of this node's build service, as its status says."""

    build_id: str
    state: str  # queued, building, done, failed
    progress: str = ""  # " (step 2/5)"
    error: str = ""  # why it failed, in words


@dataclass(frozen=True)
class Images:
    """Where the image to boot stands: on disk, or being built here."""

    ready: Path | None = None  # the instance's image, on this node
    build: Build | None = None  # this node's build of the instance's build_id, if any
    own: Build | None = None  # the build this node submitted for the instance (memory.build_id)
    own_image: Path | None = None  # own's image, when it is done and still on disk


@dataclass(frozen=True)
class Observed:
    now: float
    alive: bool  # the VM's process runs
    images: Images = Images()
    console: ServiceView | None = None  # None: not read (nothing new on it since the last look)
    answers: bool | None = None  # the port answered; None: not probed
    paused: bool = False  # the VM is alive with its vCPUs stopped (looked at when pausing matters)


@dataclass(frozen=True)
class Handover:
    """What the scheduler sees of an instance placed elsewhere now."""

    now: float
    deleted: bool  # the instance is gone (deleted by its owner): nothing to hand over
    wanted: bool  # its owner wants it running (not stopped)
    alive: bool  # our VM of it runs
    taken_by: str | None  # a live member placed for it that reports it running, if any
    # this node beats but no other member lists it yet, for less than a staleness window (it
    # just came back from a partition): placement counts it out for want of a word, not on
    # evidence that it is gone, and is about to count it in again
    unheard: bool = False


@dataclass
class Replica:
    """What this node remembers of its replica of an instance. The fields before `reported` are
    saved (instances/<id>.json); the timers and the fetched context are not: they are on the
    scheduler's monotonic clock, which a restarted node does not share."""

    instance_id: str
    ip: str
    generation: int = 0  # of the last boot
    want_running: bool = False  # booted and not stopped since: its death is a crash
    restarts: int = 0
    build_id: str | None = None  # the build this node submitted for the instance
    build_generation: int = 0
    reported: dict = field(default_factory=dict)  # the last instance_status {state, reason}
    # not saved:
    booted_at: float | None = None
    crashed_at: float | None = None  # when its VM was seen down, not stopped by us
    streak: int = 0  # exits in a row, each soon after its boot
    next_boot: float = 0.0  # not booted again before (a back-off after a crash)
    context_known: bool = False  # `context` holds what the build needs (None: the Formfile alone)
    context: bytes | None = None
    context_missing_at: float | None = None  # when no connected node had it
    retired_at: float | None = None  # when another node took the replica over (placement moved)
    console_size: int = -1
    health: str = "unknown"  # what its status says of the probe (next_health); not saved
    health_fails: int = 0
    health_at: int = 0  # wall ms when its health last changed (the status's checked_at)

    SAVED = ("instance_id", "ip", "generation", "want_running", "restarts", "build_id",
             "build_generation", "reported")

    def saved(self) -> dict:
        return {k: getattr(self, k) for k in self.SAVED}


# ---- what the planner asks for ------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    state: State
    reason: str = ""


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Boot:
    image: Path


@dataclass(frozen=True)
class Pause:
    """Stop the VM's vCPUs; it keeps its memory (and its process, its tap, its address)."""


@dataclass(frozen=True)
class Resume:
    """Run a paused VM's vCPUs again."""


@dataclass(frozen=True)
class FetchContext:
    """Find the build context: the Formfile alone, kept here, or from a connected node."""


@dataclass(frozen=True)
class StartBuild:
    context: bytes | None


@dataclass(frozen=True)
class Remove:
    """Delete the VM, its disk and tap, and withdraw this node's status of it."""


Action = Report | Stop | Boot | Pause | Resume | FetchContext | StartBuild | Remove


# ---- the table --------------------------------------------------------------------------------


class Event(enum.Enum):
    STOP_WANTED = "the owner stopped it, VM alive"
    STOPPED = "the owner stopped it, VM down"
    PAUSE_WANTED = "the owner paused it, VM running"
    PAUSED = "the owner paused it, VM paused"
    PAUSED_DOWN = "the owner paused it, VM down: nothing to pause"
    RESUME_WANTED = "the owner wants it running, VM paused"
    NO_IMAGE = "no image here and no Formfile to build one"
    IMAGE_BUILDING = "its image is being built"
    BUILD_FAILED = "its image's build failed"
    FOREIGN_IMAGE = "the build here makes another image"
    NEEDS_CONTEXT = "the build context must be found"
    CONTEXT_MISSING = "no connected node had the build context"
    NEEDS_BUILD = "the build context is known"
    IMAGE_GONE = "the image built here was removed"
    NEW_GENERATION = "VM alive, an older generation (restart)"
    NOT_BOOTED = "VM down, not booted since it was wanted"
    CRASHED = "VM down, it exited on its own"
    BACKING_OFF = "VM down, exited again soon after its boot: waiting"
    NO_ENTRYPOINT = "VM up, the image has no entrypoint"
    CRASH_LOOP = "VM up, the entrypoint keeps exiting"
    SERVICE_UP = "VM up, the entrypoint started (and its port answers)"
    WAITING = "VM up, nothing decided yet"


# event -> (state to report, or None: report nothing; the actions' kinds, in order)
TRANSITIONS: dict[Event, tuple[State | None, tuple[type, ...]]] = {
    Event.STOP_WANTED: (State.STOPPED, (Stop,)),
    Event.STOPPED: (State.STOPPED, ()),
    Event.PAUSE_WANTED: (State.PAUSED, (Pause,)),
    Event.PAUSED: (State.PAUSED, ()),
    Event.PAUSED_DOWN: (State.STOPPED, ()),
    Event.RESUME_WANTED: (None, (Resume,)),  # the next look sees it run (and reports it running)
    Event.NO_IMAGE: (State.PENDING, ()),
    Event.IMAGE_BUILDING: (State.BUILDING, ()),
    Event.BUILD_FAILED: (State.FAILED, ()),
    Event.FOREIGN_IMAGE: (State.FAILED, ()),
    Event.NEEDS_CONTEXT: (None, (FetchContext,)),
    Event.CONTEXT_MISSING: (State.PENDING, ()),
    Event.NEEDS_BUILD: (None, (StartBuild,)),
    Event.IMAGE_GONE: (None, ()),
    Event.NEW_GENERATION: (State.BOOTING, (Stop, Boot)),
    Event.NOT_BOOTED: (State.BOOTING, (Boot,)),
    Event.CRASHED: (State.BOOTING, (Boot,)),
    Event.BACKING_OFF: (State.FAILED, ()),
    Event.NO_ENTRYPOINT: (State.RUNNING, ()),
    Event.CRASH_LOOP: (State.FAILED, ()),
    Event.SERVICE_UP: (State.RUNNING, ()),
    Event.WAITING: (None, ()),
}


def classify(want: Desired, rep: Replica, obs: Observed) -> tuple[Event, Path | None]:
    """What this look at the replica is, and the image to boot when there is one."""
    if want.hold:
        return (Event.STOP_WANTED if obs.alive else Event.STOPPED), None
    if want.paused:  # a paused VM is not booted, only paused where it runs
        if not obs.alive:
            return Event.PAUSED_DOWN, None
        return (Event.PAUSED if obs.paused else Event.PAUSE_WANTED), None
    if not want.running:
        return (Event.STOP_WANTED if obs.alive else Event.STOPPED), None
    image, event = _image(want, rep, obs)
    if image is None:
        return event, None
    if obs.alive:
        if rep.generation != want.generation:
            return Event.NEW_GENERATION, image
        if obs.paused:
            return Event.RESUME_WANTED, image
        return _service(want, rep, obs), image
    if rep.want_running and rep.generation == want.generation:
        if rep.crashed_at is not None and obs.now < rep.next_boot:
            return Event.BACKING_OFF, image
        return Event.CRASHED, image
    return Event.NOT_BOOTED, image


def _image(want: Desired, rep: Replica, obs: Observed) -> tuple[Path | None, Event]:
    im = obs.images
    if im.ready is not None:
        return im.ready, Event.WAITING
    if im.build is not None and im.build.state in ("queued", "building"):
        return None, Event.IMAGE_BUILDING
    if im.build is not None and im.build.state == "failed":
        return None, Event.BUILD_FAILED
    if not want.has_formfile:
        return None, Event.NO_IMAGE
    # built here, from the Formfile (and the context): a failed build is tried again only for a
    # new generation (a restart), not in a loop
    own = im.own
    if own is None or (own.state == "failed" and rep.build_generation != want.generation):
        if not rep.context_known:
            recent = rep.context_missing_at is not None and obs.now < rep.context_missing_at + CONTEXT_RETRY
            return None, (Event.CONTEXT_MISSING if recent else Event.NEEDS_CONTEXT)
        return None, Event.NEEDS_BUILD
    if want.build_id and own.build_id != want.build_id:
        return None, Event.FOREIGN_IMAGE
    if own.state == "done":
        return (im.own_image, Event.WAITING) if im.own_image else (None, Event.IMAGE_GONE)
    if own.state == "failed":
        return None, Event.BUILD_FAILED
    return None, Event.IMAGE_BUILDING


def _service(want: Desired, rep: Replica, obs: Observed) -> Event:
    view = obs.console
    if view is None:
        return Event.WAITING
    if view.no_entrypoint:
        return Event.NO_ENTRYPOINT
    if view.exits >= CRASH_LOOP_EXITS and view.exited_last:
        return Event.CRASH_LOOP
    if rep.reported.get("state") == State.RUNNING or not view.started:
        return Event.WAITING
    if want.port is not None and not obs.answers:
        return Event.WAITING
    return Event.SERVICE_UP


# ---- the plan ---------------------------------------------------------------------------------


def plan(want: Desired, rep: Replica, obs: Observed) -> tuple[Replica, list[Action]]:
    """The replica's new memory and the actions to take, in order."""
    new = replace(rep, reported=dict(rep.reported))
    if (want.running and not obs.alive and rep.want_running and rep.crashed_at is None
            and rep.generation == want.generation):
        _note_crash(new, obs.now)
    event, image = classify(want, new, obs)
    state, kinds = TRANSITIONS[event]
    actions: list[Action] = []
    reason = ""
    for kind in kinds:
        if kind is Stop:
            new.want_running = False
            actions.append(Stop())
        elif kind is Boot:
            assert image is not None
            reason = _boot(want, new, obs, crashed=event is Event.CRASHED)
            actions.append(Boot(image))
        elif kind is Pause:
            actions.append(Pause())
        elif kind is Resume:
            actions.append(Resume())
        elif kind is FetchContext:
            actions.append(FetchContext())
        elif kind is StartBuild:
            actions.append(StartBuild(rep.context))
    if event is Event.STOPPED:
        new.want_running = False  # it went down after all: not a crash when it is started again
    if event is Event.IMAGE_GONE:
        new.build_id = None  # removed meanwhile: the next look builds it again
    if state is not None:
        reason = reason or _reason(event, want, new, obs)
        if new.reported != {"state": state.value, "reason": reason}:
            new.reported = {"state": state.value, "reason": reason}
            actions.append(Report(state, reason))
    return new, actions


def _note_crash(new: Replica, now: float) -> None:
    """Its VM is down on its own: one more in the streak if it went down soon after its boot,
    and the time before which it is not booted again."""
    lived = now - new.booted_at if new.booted_at is not None else STABLE_AFTER
    new.streak = 1 if lived >= STABLE_AFTER else new.streak + 1
    new.crashed_at = now
    new.next_boot = now + backoff(new.streak)


def _boot(want: Desired, new: Replica, obs: Observed, *, crashed: bool) -> str:
    """Remember the boot; the reason it is reported with."""
    reason = ""
    if crashed:
        new.restarts += 1
        reason = f"restarted after its VM exited ({_times(new.restarts)})"
    else:
        new.streak = 0
    new.crashed_at = None
    new.booted_at = obs.now
    new.generation = want.generation
    new.want_running = True
    return reason


def backoff(streak: int) -> float:
    """Seconds before the next boot of a VM that exited `streak` times in a row soon after
    booting: none for the first exit, then 2, 4, 8 ... up to BACKOFF_MAX."""
    if streak <= 1:
        return 0.0
    return min(BACKOFF_FIRST * 2 ** (streak - 2), BACKOFF_MAX)


def _reason(event: Event, want: Desired, rep: Replica, obs: Observed) -> str:
    im, bid = obs.images, (want.build_id or "?")[:12]
    if event in (Event.STOP_WANTED, Event.STOPPED):
        return want.hold or "stopped by its owner"
    if event in (Event.PAUSE_WANTED, Event.PAUSED):
        return "paused by its owner (its VM keeps its memory; resume runs it on)"
    if event is Event.PAUSED_DOWN:
        return "paused by its owner, but no VM of it runs on this node to pause: resume (or start) boots one"
    if event is Event.NO_IMAGE:
        return f"image {bid} is not on this node, and the instance has no Formfile to build it from"
    if event is Event.IMAGE_BUILDING:
        b = im.build if im.build is not None and im.build.state in ("queued", "building") else im.own
        return f"building image {b.build_id[:12]}{b.progress}" if b else "building its image"
    if event is Event.BUILD_FAILED:
        b = im.build if im.build is not None and im.build.state == "failed" else im.own
        return b.error if b and b.error else "its image's build failed"
    if event is Event.FOREIGN_IMAGE:
        made = im.own.build_id[:12] if im.own else "?"
        return (f"the instance's Formfile and build context make image {made} here, not {bid} "
                "(another Debian base?)")
    if event is Event.CONTEXT_MISSING:
        return f"image {bid} is not on this node and no connected node has its build context yet"
    if event is Event.BACKING_OFF:
        wait = backoff(rep.streak)
        return (f"its VM exited {_times(rep.streak)} in a row soon after booting; "
                f"booting it again after {wait:.0f} s")
    if event is Event.NO_ENTRYPOINT:
        return "no entrypoint"
    if event is Event.CRASH_LOOP:
        view = obs.console
        assert view is not None
        return (f"the entrypoint keeps exiting (status {view.last_rc}, {view.exits} times); "
                f"last output: {' | '.join(view.output_tail)[-1500:]}")
    if event is Event.SERVICE_UP:
        return f"restarted {_times(rep.restarts)} after its VM exited" if rep.restarts else ""
    return ""


def _times(n: int) -> str:
    return f"{n} time{'s' * (n != 1)}"


# ---- health: the node's own probe of its running replicas -------------------------------------

UNHEALTHY_AFTER = 2  # failed probes in a row that make a healthy (or unknown) replica unhealthy


def next_health(health: str, fails: int, ok: bool) -> tuple[str, int]:
    """Hysteresis of a replica's health: (health, failures in a row) after one probe. Two
    failures in a row to go unhealthy, one success to be healthy again, so that one lost
    connection does not flap the names (and gossip a status op) each time."""
    if ok:
        return "healthy", 0
    fails += 1
    if fails >= UNHEALTHY_AFTER:
        return "unhealthy", fails
    return health, fails


# ---- a replica no longer placed here: make before break ----------------------------------------

RETIRE_GRACE = 600.0  # seconds a handed-over replica's stopped VM (and its disk) is kept


def retire(rep: Replica, seen: Handover) -> tuple[Replica, list[Action]]:
    """A replica placement no longer gives this node. Deleted instance: remove it at once. Else
    keep it running until a node placed for it reports it running, then stop it, and remove its
    stopped VM only after RETIRE_GRACE (placement may come back, e.g. a flapping node). While
    this node is `unheard` nothing changes: stopping its replica for a successor would last a
    heartbeat, then placement comes back and the replica boots again (a flap)."""
    if seen.deleted:
        return rep, [Remove()]
    if seen.unheard and seen.wanted:
        return rep, []
    new = replace(rep, reported=dict(rep.reported))
    if seen.taken_by is None and seen.wanted:
        new.retired_at = None
        return new, []  # nobody else runs it yet: ours keeps serving
    actions: list[Action] = []
    if new.retired_at is None:
        new.retired_at = seen.now
    if seen.alive:
        new.want_running = False
        actions.append(Stop())
    if seen.now >= new.retired_at + RETIRE_GRACE:
        return new, [Remove()]
    reason = (f"placed on {seen.taken_by} now, which runs it" if seen.wanted
              else "stopped by its owner (and placed elsewhere now)")
    if new.reported != {"state": State.STOPPED.value, "reason": reason}:
        new.reported = {"state": State.STOPPED.value, "reason": reason}
        actions.append(Report(State.STOPPED, reason))
    return new, actions


def after_failure(rep: Replica, reason: str) -> tuple[Replica, list[Action]]:
    """An action failed (the VM backend or the build service refused): report it. The next look
    plans again from what it then observes."""
    new = replace(rep, reported={"state": State.FAILED.value, "reason": reason})
    if rep.reported == new.reported:
        return new, []
    return new, [Report(State.FAILED, reason)]
