"""The guest's console protocol (formation/guest): what `read_service` makes of a run VM's
console, what `read_build_line` makes of a build VM's lines, and that the guest's shell scripts
and the builder's step lines really print what the module parses."""

from __future__ import annotations

import re
import subprocess

import pytest

from formation import guest
from formation.guest import BuildLine, read_build_line, read_service
from formation.vm.fake import BOOT_LOG

START, EXIT, BOOT = guest.SERVICE_START, guest.SERVICE_EXIT, guest.BOOT


def console(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


# ---- read_service ---------------------------------------------------------------------------


def test_only_the_last_boot_counts():
    old = console(BOOT, START, "old crash", f"{EXIT}1", START, f"{EXIT}2", START, f"{EXIT}3")
    view = read_service(old + console(BOOT, "kernel says hi", START, "listening on :8000"))
    assert view.booted
    assert (view.started, view.exits, view.last_rc) == (1, 0, "")
    assert not view.exited_last
    assert view.output_tail == ("kernel says hi", "listening on :8000")


def test_a_console_without_a_boot_marker_is_read_whole():
    """A tail that cut off the boot marker (or a guest that never got that far)."""
    view = read_service(console("boom", f"{EXIT}1", START))
    assert not view.booted
    assert (view.started, view.exits, view.last_rc) == (1, 1, "1")
    assert read_service("") == guest.ServiceView(False, False, 0, 0, "", ())


def test_an_image_without_entrypoint_idles_ready():
    view = read_service(console(BOOT, guest.NO_ENTRYPOINT))
    assert view.booted and view.no_entrypoint
    assert (view.started, view.exits, view.exited_last) == (0, 0, False)
    # an earlier boot's "no entrypoint" does not count for this one
    assert not read_service(console(BOOT, guest.NO_ENTRYPOINT, BOOT, START)).no_entrypoint


@pytest.mark.parametrize("lines, started, exits, exited_last", [
    ((START,), 1, 0, False),
    ((START, f"{EXIT}1"), 1, 1, True),
    ((START, f"{EXIT}1", START), 2, 1, False),  # restarted by the guest: up again
    ((START, f"{EXIT}1", START, f"{EXIT}1"), 2, 2, True),
    ((), 0, 0, False),  # booted, entrypoint not started yet
])
def test_starts_and_exits_say_whether_the_entrypoint_is_down(lines, started, exits, exited_last):
    view = read_service(console(BOOT, *lines))
    assert (view.started, view.exits, view.exited_last) == (started, exits, exited_last)


def test_the_last_exit_status_counts():
    view = read_service(console(BOOT, START, f"{EXIT}3", START, f"{EXIT}137", START, f"{EXIT}0"))
    assert (view.exits, view.last_rc) == (3, "0")
    assert read_service(console(BOOT, START, EXIT.rstrip())).last_rc == "?"  # no status printed
    assert read_service(console(BOOT, START, f"{EXIT}2 (killed)")).last_rc == "2"


def test_the_output_tail_is_the_services_last_lines_without_markers():
    view = read_service(console(
        BOOT, START, "one", "", "  two  \r", f"{EXIT}1", "FORMATION-GUEST stopping (power button)",
        START, "three", "four", guest.NO_ENTRYPOINT, "five"))
    assert view.output_tail == ("three", "four", "five")
    assert read_service(console(BOOT, START, "one", "", "  two  \r"), tail_lines=5).output_tail == \
        ("one", "two")


def test_the_boot_markers_own_words_are_not_service_output():
    """Stage 1 prints `FORMATION-GUEST-INIT uptime=<s>` (formation/guest/init)."""
    view = read_service(f"{BOOT} uptime=1.84\n{START}\n")
    assert view.booted and view.started == 1
    assert view.output_tail == ()


def test_the_fake_backends_boot_log_is_a_booted_started_service():
    view = read_service(BOOT_LOG)
    assert view.booted and not view.no_entrypoint
    assert (view.started, view.exits, view.exited_last) == (1, 0, False)
    assert BOOT not in " ".join(view.output_tail)


# ---- read_build_line ------------------------------------------------------------------------


@pytest.mark.parametrize("line, marker", [
    ("FORMATION-STEP 0 begin", BuildLine("begin", 0)),
    ("FORMATION-STEP 12 begin\r\n", BuildLine("begin", 12)),
    ("FORMATION-STEP 3 end rc=0", BuildLine("end", 3, 0)),
    ("FORMATION-STEP 3 end rc=100\n", BuildLine("end", 3, 100)),
    ("FORMATION-STEP 3 end rc=", BuildLine("end", 3, 1)),  # no status: a failure
    ("FORMATION-STEP 3 end rc=x", BuildLine("end", 3, 1)),
    ("FORMATION-GUEST build-end rc=0", BuildLine("build-end", rc=0)),
    ("FORMATION-GUEST build-end rc=2\r", BuildLine("build-end", rc=2)),
    ("FORMATION-GUEST build-end rc=", BuildLine("build-end", rc=1)),
])
def test_build_markers(line, marker):
    assert read_build_line(line) == marker


@pytest.mark.parametrize("line", [
    "",
    "Setting up curl (7.88.1-10) ...",
    "FORMATION-STEP",
    "FORMATION-STEP ",
    "FORMATION-STEP 3",
    "FORMATION-STEP x begin",
    "FORMATION-STEP -1 begin",  # no such step
    "FORMATION-STEP 3 end",  # no status
    "FORMATION-STEP 3 ended rc=0",
    "FORMATION-STEP 3 bogus",
    "FORMATION-STEP3 begin",
    " FORMATION-STEP 3 begin",  # a marker starts its line
    "echo FORMATION-STEP 3 begin",
    "FORMATION-GUEST build-start",
    "FORMATION-GUEST entrypoint-exit rc=1",
])
def test_other_lines_are_not_build_markers(line):
    assert read_build_line(line) is None


# ---- the scripts print what the module parses -------------------------------------------------


def sh(script: str) -> list[str]:
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True, timeout=10)
    return out.stdout.splitlines()


def script_lines(name: str) -> list[str]:
    """The console lines the guest script `name` can print, with $rc=7 and $*="reason": each
    `echo "..."` of it and each call of its `say` function, run through sh as written."""
    text = (guest.DIR / name).read_text()
    say = re.findall(r"^say\(\) \{.*\}$", text, re.M)
    calls = re.findall(r"\bsay \"[^\"]*\"", text)
    echoes = re.findall(r"\becho \"[^\"]*\"", text)
    assert echoes or calls, f"{name}: no output found"
    return sh("\n".join(["rc=7", "set -- reason", *say, *calls, *echoes]))


def printing(lines: list[str], marker: str) -> list[str]:
    return [line for line in lines if line.startswith(marker)]


def test_the_guest_scripts_print_the_markers():
    stage1, stage2 = script_lines("init"), script_lines("guest-init")
    assert printing(stage1, guest.BOOT)
    assert printing(stage1, guest.BOOT_FAILED) == [f"{guest.BOOT_FAILED} reason"]
    for marker in (guest.SERVICE_START, guest.SERVICE_EXIT, guest.NO_ENTRYPOINT, guest.BUILD_END):
        assert printing(stage2, marker), f"guest-init prints no line starting {marker!r}"
    assert printing(stage2, guest.SERVICE_EXIT) == [f"{guest.SERVICE_EXIT}7"]
    assert printing(stage2, guest.BUILD_END) == [f"{guest.BUILD_END}7"]


def test_what_the_guest_scripts_print_reads_back():
    (boot,) = printing(script_lines("init"), guest.BOOT)
    stage2 = script_lines("guest-init")
    run = [boot, *printing(stage2, guest.SERVICE_START), *printing(stage2, guest.SERVICE_EXIT)]
    view = read_service(console(*run))
    assert view.booted and (view.started, view.exits, view.last_rc) == (1, 1, "7")
    assert view.exited_last
    assert read_service(console(boot, *printing(stage2, guest.NO_ENTRYPOINT))).no_entrypoint
    assert [read_build_line(line) for line in printing(stage2, guest.BUILD_END)] == \
        [BuildLine("build-end", rc=7)]


def test_the_step_lines_print_what_read_build_line_reads():
    out = sh(f"{guest.step_begin(3)}\necho 'the step prints this'\nrc=7\n{guest.step_end(3)}")
    assert [read_build_line(line) for line in out] == \
        [BuildLine("begin", 3), None, BuildLine("end", 3, 7)]
    assert [read_build_line(line) for line in sh(f"rc=0; {guest.step_end(0)}")] == [BuildLine("end", 0, 0)]
