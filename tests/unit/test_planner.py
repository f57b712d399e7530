"""The replica planner as a table: every (reported state, observation) pair it can meet -> the
event it classifies, the actions it takes and the state it reports. No trio, no VMs, no clock
but the numbers in the observations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from formation import guest
from formation.node import planner
from formation.node.planner import (
    Boot,
    Build,
    Desired,
    Event,
    FetchContext,
    Images,
    Observed,
    Pause,
    Replica,
    Report,
    Resume,
    StartBuild,
    State,
    Stop,
)

IMG = Path("/images/x/image.raw")
BID = "b" * 64
RUN = Desired(generation=1, running=True, build_id=BID, has_formfile=True, port=8000)
PAUSE = replace(RUN, running=False, paused=True)
STARTED = guest.read_service(f"{guest.BOOT}\n{guest.SERVICE_START}\n")
EXITING = guest.read_service(f"{guest.BOOT}\n" + f"{guest.SERVICE_START}\nboom\n{guest.SERVICE_EXIT}3\n" * 3)
IDLE = guest.read_service(f"{guest.BOOT}\n{guest.NO_ENTRYPOINT}\n")


def rep(state: str | None = None, reason: str = "", **kw) -> Replica:
    r = Replica("i1", "10.0.0.2", **kw)
    if state:
        r.reported = {"state": state, "reason": reason}
    return r


READY = Images(ready=IMG)


def obs(alive=False, images=READY, now=100.0, **kw) -> Observed:
    return Observed(now=now, alive=alive, images=images, **kw)


def kinds(actions) -> list[type]:
    return [type(a) for a in actions]


BOOTED = dict(generation=1, want_running=True, booted_at=50.0)
# (name, desired, replica, observation) -> (event, actions, reported state or None)
TABLE = [
    ("stop a running VM", replace(RUN, running=False), rep("running", **BOOTED), obs(alive=True),
     Event.STOP_WANTED, [Stop, Report], State.STOPPED),
    ("stopped VM stays stopped", replace(RUN, running=False), rep("stopped", "stopped by its owner"), obs(),
     Event.STOPPED, [], None),
    ("stopped after a crash", replace(RUN, running=False), rep("running", **BOOTED), obs(),
     Event.STOPPED, [Report], State.STOPPED),
    ("no image, no Formfile", replace(RUN, has_formfile=False), rep(), obs(images=Images()),
     Event.NO_IMAGE, [Report], State.PENDING),
    ("image building here", RUN, rep(), obs(images=Images(build=Build(BID, "building", " (step 1/3)"))),
     Event.IMAGE_BUILDING, [Report], State.BUILDING),
    ("image build failed", RUN, rep("building"), obs(images=Images(build=Build(BID, "failed", error="x"))),
     Event.BUILD_FAILED, [Report], State.FAILED),
    ("needs a context", RUN, rep(), obs(images=Images()),
     Event.NEEDS_CONTEXT, [FetchContext], None),
    ("context missing lately", RUN, rep(context_missing_at=90.0), obs(images=Images()),
     Event.CONTEXT_MISSING, [Report], State.PENDING),
    ("context missing long ago", RUN, rep("pending", context_missing_at=80.0), obs(images=Images()),
     Event.NEEDS_CONTEXT, [FetchContext], None),
    ("context known: build", RUN, rep(context_known=True, context=b"tar"), obs(images=Images()),
     Event.NEEDS_BUILD, [StartBuild], None),
    ("own build queued", RUN, rep(build_id=BID, build_generation=1),
     obs(images=Images(own=Build(BID, "queued"))), Event.IMAGE_BUILDING, [Report], State.BUILDING),
    ("own build makes another image", RUN, rep(build_id="c" * 64, build_generation=1),
     obs(images=Images(own=Build("c" * 64, "done"))), Event.FOREIGN_IMAGE, [Report], State.FAILED),
    ("own build failed, same generation", RUN, rep("building", build_id=BID, build_generation=1),
     obs(images=Images(own=Build(BID, "failed", error="bad"))), Event.BUILD_FAILED, [Report], State.FAILED),
    ("own build failed, restarted since", replace(RUN, generation=2),
     rep("failed", build_id=BID, build_generation=1, context_known=True),
     obs(images=Images(own=Build(BID, "failed"))), Event.NEEDS_BUILD, [StartBuild], None),
    ("own image removed", RUN, rep("running", build_id=BID, build_generation=1),
     obs(images=Images(own=Build(BID, "done"))), Event.IMAGE_GONE, [], None),
    ("own image done: boot", RUN, rep("building", build_id=BID, build_generation=1),
     obs(images=Images(own=Build(BID, "done"), own_image=IMG)), Event.NOT_BOOTED, [Boot, Report], State.BOOTING),
    ("first boot", RUN, rep(), obs(), Event.NOT_BOOTED, [Boot, Report], State.BOOTING),
    ("restart: new generation", replace(RUN, generation=2), rep("running", **BOOTED), obs(alive=True),
     Event.NEW_GENERATION, [Stop, Boot, Report], State.BOOTING),
    ("crashed: boot again", RUN, rep("running", **BOOTED), obs(),
     Event.CRASHED, [Boot, Report], State.BOOTING),
    ("crashed again soon: back off", RUN, rep("booting", **BOOTED, streak=1), obs(now=60.0),
     Event.BACKING_OFF, [Report], State.FAILED),
    ("booting, console silent", RUN, rep("booting", **BOOTED), obs(alive=True),
     Event.WAITING, [], None),
    ("no entrypoint", RUN, rep("booting", **BOOTED), obs(alive=True, console=IDLE),
     Event.NO_ENTRYPOINT, [Report], State.RUNNING),
    ("started, port silent", RUN, rep("booting", **BOOTED), obs(alive=True, console=STARTED, answers=False),
     Event.WAITING, [], None),
    ("started, port answers", RUN, rep("booting", **BOOTED), obs(alive=True, console=STARTED, answers=True),
     Event.SERVICE_UP, [Report], State.RUNNING),
    ("started, nothing exposed", replace(RUN, port=None), rep("booting", **BOOTED),
     obs(alive=True, console=STARTED), Event.SERVICE_UP, [Report], State.RUNNING),
    ("running stays running", RUN, rep("running", **BOOTED), obs(alive=True, console=STARTED, answers=True),
     Event.WAITING, [], None),
    ("entrypoint keeps exiting", RUN, rep("running", **BOOTED), obs(alive=True, console=EXITING),
     Event.CRASH_LOOP, [Report], State.FAILED),
    ("recovered after a crash loop", RUN, rep("failed", **BOOTED), obs(alive=True, console=STARTED, answers=True),
     Event.SERVICE_UP, [Report], State.RUNNING),
    ("pause a running VM", PAUSE, rep("running", **BOOTED), obs(alive=True),
     Event.PAUSE_WANTED, [Pause, Report], State.PAUSED),
    ("a VM found paused is reported paused", PAUSE, rep("booting", **BOOTED), obs(alive=True, paused=True),
     Event.PAUSED, [Report], State.PAUSED),
    ("paused, no VM here: nothing is booted to pause it", PAUSE, rep(), obs(),
     Event.PAUSED_DOWN, [Report], State.STOPPED),
    ("resume a paused VM", RUN, rep("paused", **BOOTED), obs(alive=True, paused=True),
     Event.RESUME_WANTED, [Resume], None),
    ("restart a paused VM", replace(RUN, generation=2), rep("paused", **BOOTED), obs(alive=True, paused=True),
     Event.NEW_GENERATION, [Stop, Boot, Report], State.BOOTING),
]


@pytest.mark.parametrize(("want", "before", "seen", "event", "actions", "state"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_transition(want, before, seen, event, actions, state):
    assert planner.classify(want, _noted(want, before, seen), seen)[0] is event
    after, done = planner.plan(want, before, seen)
    assert kinds(done) == actions
    reports = [a for a in done if isinstance(a, Report)]
    assert [r.state for r in reports] == ([state] if state else [])
    if reports:
        assert after.reported == {"state": state.value, "reason": reports[0].reason}
    assert after is not before  # the memory given is not changed: the caller decides to keep it


def _noted(want, before, seen):
    """The replica as classify sees it: plan notes a crash before classifying."""
    r = replace(before, reported=dict(before.reported))
    if want.running and not seen.alive and r.want_running and r.crashed_at is None \
            and r.generation == want.generation:
        planner._note_crash(r, seen.now)
    return r


def test_every_event_is_in_the_table_and_reached():
    assert set(planner.TRANSITIONS) == set(Event)
    assert {row[4] for row in TABLE} == set(Event)


def test_a_report_is_not_repeated():
    want, r = RUN, rep()
    r, first = planner.plan(want, r, obs(images=Images()))
    r.context_missing_at = 99.0
    r, second = planner.plan(want, r, obs(images=Images()))
    r, third = planner.plan(want, r, obs(images=Images(), now=101.0))
    assert kinds(first) == [FetchContext]
    assert kinds(second) == [Report] and second[0].state is State.PENDING
    assert third == []


def test_a_paused_replica_is_not_reported_again():
    after, first = planner.plan(PAUSE, rep("running", **BOOTED), obs(alive=True))
    assert kinds(first) == [Pause, Report] and "paused by its owner" in first[1].reason
    again, second = planner.plan(PAUSE, after, obs(alive=True, paused=True))
    assert second == [] and again.want_running  # booted and not stopped: its death is a crash
    # resumed: the next look, the VM running, reads its console and reports it running
    _, resumed = planner.plan(RUN, again, obs(alive=True, paused=True))
    assert kinds(resumed) == [Resume]
    _, running = planner.plan(RUN, again, obs(alive=True, console=STARTED, answers=True))
    assert kinds(running) == [Report] and running[0].state is State.RUNNING


def test_boot_remembers_generation_and_want():
    after, actions = planner.plan(replace(RUN, generation=4), rep(), obs(now=7.0))
    assert actions[0] == Boot(IMG)
    assert (after.generation, after.want_running, after.booted_at, after.restarts) == (4, True, 7.0, 0)


def test_crash_back_off_grows_and_a_stable_vm_starts_over():
    r, t = rep(), 0.0
    r, _ = planner.plan(RUN, r, obs(now=t))  # first boot
    waits = []
    for _ in range(6):
        t += 1.0  # it dies a second after each boot
        died = t
        r, actions = planner.plan(RUN, r, obs(now=t))
        while not any(isinstance(a, Boot) for a in actions):
            assert kinds(actions) in ([Report], [])  # "failed", said once while it waits
            t += 0.5
            r, actions = planner.plan(RUN, r, obs(now=t))
        waits.append(t - died)
    assert waits == [0.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert r.restarts == 6 and r.streak == 6
    assert planner.backoff(100) == planner.BACKOFF_MAX
    # lived long enough: the next crash starts a new streak, booted at once
    t += planner.STABLE_AFTER + 1
    r, actions = planner.plan(RUN, r, obs(now=t))
    assert kinds(actions) == [Boot, Report] and r.streak == 1


def test_after_failure_reports_once():
    r, actions = planner.after_failure(rep("booting"), "qemu said no")
    assert actions == [Report(State.FAILED, "qemu said no")]
    assert planner.after_failure(r, "qemu said no")[1] == []


# ---- make before break --------------------------------------------------------------------------

def hand(now=100.0, deleted=False, wanted=True, alive=True, taken_by=None, unheard=False) -> planner.Handover:
    return planner.Handover(now=now, deleted=deleted, wanted=wanted, alive=alive, taken_by=taken_by,
                            unheard=unheard)


@pytest.mark.parametrize(("before", "seen", "actions", "state"), [
    (rep("running", **BOOTED), hand(deleted=True), [planner.Remove], None),
    (rep("running", **BOOTED), hand(), [], None),  # nobody else runs it yet: keep serving
    (rep("running", **BOOTED), hand(taken_by="0xb"), [Stop, Report], State.STOPPED),
    (rep("running", **BOOTED), hand(wanted=False), [Stop, Report], State.STOPPED),
    (rep("stopped", "placed on 0xb now, which runs it", **BOOTED, retired_at=50.0),
     hand(alive=False, taken_by="0xb"), [], None),
    (rep("stopped", **BOOTED, retired_at=100.0 - planner.RETIRE_GRACE),
     hand(alive=False, taken_by="0xb"), [planner.Remove], None),
    # this node just came back and nobody lists it yet: its replica stays as it is
    (rep("running", **BOOTED), hand(taken_by="0xb", unheard=True), [], None),
    (rep("running", **BOOTED), hand(wanted=False, unheard=True), [Stop, Report], State.STOPPED),
    (rep("running", **BOOTED), hand(deleted=True, unheard=True), [planner.Remove], None),
], ids=["deleted", "not taken yet", "taken", "stopped by owner", "waiting out the grace", "grace over",
        "unheard: kept", "unheard, stopped by owner", "unheard, deleted"])
def test_a_replica_placed_elsewhere_is_handed_over(before, seen, actions, state):
    after, done = planner.retire(before, seen)
    assert kinds(done) == actions
    assert [a.state for a in done if isinstance(a, Report)] == ([state] if state else [])
    if Stop in actions:
        assert not after.want_running and after.retired_at == seen.now


def test_placement_coming_back_cancels_the_handover():
    r, _ = planner.retire(rep("running", **BOOTED), hand(taken_by="0xb"))
    r, actions = planner.retire(r, hand(now=200.0))  # the other node stopped running it
    assert actions == [] and r.retired_at is None


def test_health_needs_two_failures_to_go_unhealthy_and_one_success_to_come_back():
    h, fails = "unknown", 0
    h, fails = planner.next_health(h, fails, True)
    assert (h, fails) == ("healthy", 0)
    h, fails = planner.next_health(h, fails, False)
    assert (h, fails) == ("healthy", 1)  # one lost connection changes nothing
    h, fails = planner.next_health(h, fails, True)
    assert (h, fails) == ("healthy", 0)
    for _ in range(planner.UNHEALTHY_AFTER):
        h, fails = planner.next_health(h, fails, False)
    assert h == "unhealthy"
    h, fails = planner.next_health(h, fails, False)
    assert h == "unhealthy"
    assert planner.next_health(h, fails, True) == ("healthy", 0)
    assert planner.next_health("unknown", 1, False) == ("unhealthy", 2)


@pytest.mark.parametrize("want", [RUN, replace(RUN, paused=True)])
def test_a_hold_stops_a_wanted_replica_and_says_why(want):
    """Unpaid rent (charging.py) holds a replica its owner wants running or paused: its VM is
    stopped and its status says why; once the hold is gone it boots again as for a start."""
    held = replace(want, hold="waiting for credits: ...")
    running = rep("running", want_running=True)
    new, actions = planner.plan(held, running, obs(alive=True))
    assert Stop in kinds(actions)
    assert new.reported == {"state": "stopped", "reason": "waiting for credits: ..."}
    new, actions = planner.plan(held, new, obs(alive=False))
    assert actions == [] or Boot not in kinds(actions)
    new, actions = planner.plan(RUN, new, obs(alive=False))
    assert Boot in kinds(actions)
