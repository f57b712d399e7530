"""Pause and resume through the desired state: the owner's signed request changes the instance's
desired_state, the scheduler pauses (QMP stop) or resumes (QMP cont) its VM on the next pass and
reports it. On the in-memory VM backend (tests/fake_vms.py) and trio's virtual clock, with the
rig of test_scheduler_timers.py (a real store, a user's signed requests relayed by the node).
"""

from __future__ import annotations

import pytest

from formation.crdt.op import OpError
from tests.unit.test_scheduler_timers import BID, Rig


async def test_pause_keeps_the_vm_and_resume_runs_it_on(tmp_path, autojump_clock):
    rig = Rig(tmp_path)
    iid = await rig.create(build_id=BID)
    await rig.look()
    await rig.look()
    assert await rig.status(iid) == ("running", "")
    boots = rig.backend.vms[iid].boots

    await rig.request("POST", f"/v1/instance/{iid}/pause")
    await rig.look()
    assert rig.backend.events[-1] == ("pause", iid)
    state, reason = await rig.status(iid)
    assert state == "paused" and "paused by its owner" in reason
    assert rig.backend.is_alive(iid) and (await rig.backend.status(iid)).state == "paused"
    seen = len(rig.backend.events)
    await rig.look()  # paused stays paused: nothing done, nothing reported again
    assert len(rig.backend.events) == seen and (await rig.status(iid))[0] == "paused"

    await rig.request("POST", f"/v1/instance/{iid}/resume")
    await rig.look()  # resumed, and seen running in the same pass
    assert rig.backend.events[-1] == ("resume", iid)
    assert await rig.status(iid) == ("running", "")
    assert rig.backend.vms[iid].boots == boots  # the same VM: not booted again

    # start runs a paused instance on too; stop of a paused one stops its VM
    await rig.request("POST", f"/v1/instance/{iid}/pause")
    await rig.look()
    await rig.request("POST", f"/v1/instance/{iid}/start")
    await rig.look()
    assert rig.backend.events[-2:] == [("pause", iid), ("resume", iid)]
    await rig.request("POST", f"/v1/instance/{iid}/pause")
    await rig.look()
    await rig.request("POST", f"/v1/instance/{iid}/stop")
    await rig.look()
    assert rig.backend.events[-1] == ("stop", iid) and not rig.backend.is_alive(iid)
    assert (await rig.status(iid))[0] == "stopped"

    # a stopped instance has no VM to pause or resume: refused, saying what to run instead
    for action in ("pause", "resume"):
        with pytest.raises(OpError) as e:
            await rig.request("POST", f"/v1/instance/{iid}/{action}")
        assert e.value.code == "unprocessable" and f"form manage start {iid}" in e.value.detail


async def test_a_paused_vm_that_dies_is_reported_stopped_and_booted_on_resume(tmp_path, autojump_clock):
    rig = Rig(tmp_path)
    iid = await rig.create(build_id=BID)
    await rig.look()
    await rig.request("POST", f"/v1/instance/{iid}/pause")
    await rig.look()
    rig.backend.crash(iid)
    await rig.look()
    state, reason = await rig.status(iid)
    assert state == "stopped" and "no VM of it runs on this node" in reason
    assert rig.boots == [rig.boots[0]]  # a paused instance is not booted just to be paused
    await rig.request("POST", f"/v1/instance/{iid}/resume")
    await rig.look()
    assert rig.backend.is_alive(iid) and len(rig.boots) == 2
