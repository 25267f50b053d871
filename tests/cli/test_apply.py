"""apply / dry-run / status / revert against real targets, and the faults around them:
the CLI killed mid-transition, the target exiting mid-apply."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading

import pytest
from lp_harness import GREET_FIX, LIVEPATCH, cli, cli_json, wait_for, write_patch

SLOW_FIX = """import livepatch
patch = livepatch.Patch("fix-slow", description="faster")

@patch.function("greeter:slow")
def slow(seconds):
    return "slow-new"
"""

SLEEPY_FIX = """import pathlib, time, livepatch
patch = livepatch.Patch("fix-sleepy", description="takes its time")

@patch.pre_patch
def settle():
    pathlib.Path("MARKER").write_text("inside pre_patch")
    time.sleep(30)

@patch.function("greeter:greet")
def greet(name):
    return "SLEEPY " + name
"""


def test_apply_status_revert_round_trip(lp, target) -> None:
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    code, applied = cli_json(lp, "apply", str(patch), "--pid", str(target.pid))
    assert code == 0 and applied["ok"] and applied["state"] == "applied"
    assert applied["patch"] == "fix-greet" and applied["transition"]["state"] == "complete"
    assert target.ask("greet r") == "HELLO r"
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert status["patches"][0]["name"] == "fix-greet"
    assert status["patches"][0]["sha256"] == applied["sha256"]
    assert status["agent"]["pid"] == target.pid
    # a second apply of the same patch is refused and changes nothing
    done = cli(lp, "apply", str(patch), "--pid", str(target.pid))
    assert done.returncode == 1 and "already" in done.stderr
    done = cli(lp, "revert", "fix-greet", "--pid", str(target.pid))
    assert done.returncode == 0 and "reverted" in done.stdout
    assert target.ask("greet r") == "hello r"
    # every model counts the target's tasks alike: its main thread and its ticker, not
    # the agent's threads (hybrid once counted the one applying the patch: 3 of 3; a
    # forced or immediate one said 0 of 0)
    for model, *forced in (("hybrid",), ("stop",), ("two_universe", "--force"),
                           ("immediate",)):
        code, applied = cli_json(lp, "apply", str(patch), "--pid", str(target.pid),
                                 "--model", model, "--no-persist", *forced)
        assert code == 0, applied
        assert applied["transition"]["tasks_total"] == 2, (model, applied["transition"])
        assert applied["transition"]["tasks_switched"] == 2, (model, applied["transition"])
        assert cli(lp, "revert", "fix-greet", "--pid", str(target.pid),
                   "--model", model, *forced).returncode == 0


def test_dry_run_verifies_and_reports_running_threads_without_change(lp, target) -> None:
    assert target.ask("slow 20") == "started"
    patch = write_patch(lp.tmp, "slowfix", SLOW_FIX)
    code, plan = cli_json(lp, "apply", str(patch), "--pid", str(target.pid), "--dry-run")
    assert code == 0 and plan["dry_run"]
    (proc,) = plan["processes"]
    assert [c["target"] for c in proc["changes"]] == ["greeter:slow"]
    running = proc["running"]
    assert len(running) == 1 and "greeter:slow" in running[0]["frames"][0]
    assert running[0]["task"].startswith("thread ")
    text = cli(lp, "apply", str(patch), "--pid", str(target.pid), "--dry-run").stdout
    assert "tasks running patched functions right now" in text and "nothing was changed" in text
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert status["patches"] == [] and status["transition"] is None
    assert [r["event"] for r in lp.audit_records()] == ["plan", "plan"]


def test_cli_killed_mid_transition_leaves_the_target_to_finish(lp, target) -> None:
    """The transition belongs to the target: killing the CLI does not stop or break it."""
    assert target.ask("slow 60") == "started"
    patch = write_patch(lp.tmp, "slowfix", SLOW_FIX)
    apply = subprocess.Popen(
        [str(LIVEPATCH), "apply", str(patch), "--pid", str(target.pid), "--timeout", "30"],
        env=lp.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = {}

        def in_flight() -> bool:
            code, status = cli_json(lp, "status", "--pid", str(target.pid))
            seen["status"] = status
            blocked = (status["transition"] or {}).get("blockers")
            return bool(blocked) or bool(status["patches"])

        wait_for(in_flight, timeout=20, what="the transition to start")
        # a thread is inside greeter.slow: the transition must wait for it
        assert seen["status"]["transition"] is not None, seen["status"]["patches"]
        apply.send_signal(signal.SIGKILL)
        apply.wait(timeout=10)
        blocked = seen["status"]["transition"]
        assert blocked["state"] == "running" and blocked["patch"] == "fix-slow"
        assert any("greeter" in " ".join(b["frames"]) for b in blocked["blockers"])

        assert target.ask("release") == "released"  # the blocked task leaves the function

        def settled() -> bool:
            code, status = cli_json(lp, "status", "--pid", str(target.pid))
            seen["status"] = status
            return status["transition"] is None

        wait_for(settled, timeout=30, what="the target to finish the transition alone")
        assert [p["name"] for p in seen["status"]["patches"]] == ["fix-slow"]
        wait_for(lambda: ("apply", "ok") in [(r["event"], r["result"]) for r in lp.audit_records()])
    finally:
        if apply.poll() is None:
            apply.kill()
        apply.communicate(timeout=10)


def test_revert_mid_apply_turns_it_around_and_the_apply_says_so(lp, target) -> None:
    """The on-call case: an apply is stuck behind a busy thread and someone reverts it.
    The revert turns the transition around; the waiting apply must then fail (not
    report "applied", not record the patch for later processes of the program)."""
    assert target.ask("slow 60") == "started"
    patch = write_patch(lp.tmp, "slowfix", SLOW_FIX)
    apply = subprocess.Popen(
        [str(LIVEPATCH), "apply", str(patch), "--pid", str(target.pid), "--timeout", "30"],
        env=lp.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        def in_flight() -> bool:
            code, status = cli_json(lp, "status", "--pid", str(target.pid))
            return bool((status["transition"] or {}).get("blockers"))

        wait_for(in_flight, timeout=20, what="the apply to wait for the busy thread")
        shown = cli(lp, "status", "--pid", str(target.pid)).stdout
        assert shown.count("in slow") == 1, shown  # the blocking frame, listed once
        reverted = cli(lp, "revert", "fix-slow", "--pid", str(target.pid))
        assert reverted.returncode == 0, reverted.stderr
        assert "turned around" in reverted.stdout, reverted.stdout
        out, err = apply.communicate(timeout=30)
        assert apply.returncode == 1, (out, err)
        assert "a revert turned the apply around" in err and "not applied" in err, err
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.communicate(timeout=10)
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert status["patches"] == [] and status["transition"] is None
    assert not list((lp.state_dir / "programs").glob("*.json"))
    events = [(r["event"], r["result"]) for r in lp.audit_records()]
    assert ("apply", "transition-reversed") in events and ("revert", "ok") in events, events
    assert ("apply", "ok") not in events, events
    assert target.ask("release") == "released"


def test_forced_apply_names_the_tasks_it_forced_past(lp, target) -> None:
    assert target.ask("slow 60") == "started"
    patch = write_patch(lp.tmp, "slowfix", SLOW_FIX)
    try:
        done = cli(lp, "apply", str(patch), "--pid", str(target.pid), "--force")
        assert done.returncode == 0, done.stderr
        assert "(forced)" in done.stdout and "forced past 1 task(s)" in done.stdout, done.stdout
        assert "in slow" in done.stdout, done.stdout
        code, result = cli_json(lp, "revert", "fix-slow", "--pid", str(target.pid))
        assert code == 0 and result["transition"]["forced_past"] == []
    finally:
        assert target.ask("release") == "released"


def test_target_exiting_mid_apply_is_reported(lp, target) -> None:
    marker = lp.tmp / "in-pre-patch"
    patch = write_patch(lp.tmp, "sleepy", SLEEPY_FIX.replace("MARKER", str(marker)))
    apply = subprocess.Popen(
        [str(LIVEPATCH), "apply", str(patch), "--pid", str(target.pid)],
        env=lp.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(marker.exists, timeout=30, what="the target to enter the pre_patch callback")
    target.proc.send_signal(signal.SIGKILL)
    out, err = apply.communicate(timeout=20)
    assert apply.returncode == 4, (out, err)
    assert f"process {target.pid} exited" in err
    done = cli(lp, "status", "--pid", str(target.pid))
    assert done.returncode == 3


def _stderr_line(proc: subprocess.Popen[str], containing: str, timeout: float) -> str:
    """Read `proc`'s stderr until a line holds `containing` (or fail after `timeout`)."""
    found: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if containing in line:
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"no line with {containing!r} on stderr within {timeout}s"
    return found[0]


def test_an_agent_kept_off_the_gil_is_explained_and_an_abandoned_apply_never_starts(
    lp, target
) -> None:
    """A thread of the target holds the GIL in one long C call, so the agent (Python code)
    cannot answer. The command says so while it waits, then applies; and an apply given
    up with Ctrl-C before the agent could start it is dropped, not applied later."""
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    assert target.ask("hog 4") == "hogging"
    # --tree (a tree of one here): each process's line says why it waits
    done = cli(lp, "apply", str(patch), "--pid", str(target.pid), "--tree")
    assert done.returncode == 0, done.stderr
    waiting = f"pid {target.pid}: waiting (no answer from its agent for 2s; thread "
    assert waiting in done.stdout, done.stdout
    busy = "is running on a CPU most of the time: probably a long C call that holds the GIL"
    assert busy in done.stdout, done.stdout
    assert target.ask("greet a") == "HELLO a"
    assert cli(lp, "revert", "fix-greet", "--pid", str(target.pid)).returncode == 0

    assert target.ask("hog 4") == "hogging"
    apply = subprocess.Popen(
        [str(LIVEPATCH), "apply", str(patch), "--pid", str(target.pid)],
        env=lp.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = _stderr_line(apply, "no answer from its agent for 2s", timeout=20)
        assert "is running on a CPU most of the time" in line, line
        apply.send_signal(signal.SIGINT)
        apply.communicate(timeout=20)
        assert apply.returncode == 130
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.communicate(timeout=10)
    assert target.ask("greet b", timeout=30) == "hello b"  # after the hog: not patched
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert code == 0 and status["patches"] == [], status
    # the agent read the request once the hog ended, found its client gone, and said so
    wait_for(lambda: ("apply", "abandoned") in [(r["event"], r["result"])
                                                for r in lp.audit_records()],
             what="the abandoned apply in the audit log")
    assert [r["result"] for r in lp.audit_records() if r["event"] == "apply"] == [
        "ok", "abandoned"]
    assert target.ask("greet c") == "hello c"


def test_an_agent_at_work_before_its_transition_is_not_taken_for_a_silent_one(
    lp, target
) -> None:
    """A pre_patch callback that takes seconds: the agent's heartbeats say it is at
    work, and the command shows that instead of warning that it does not answer."""
    patch = write_patch(lp.tmp, "pre", SLEEPY_FIX.replace("time.sleep(30)", "time.sleep(3)")
                        .replace("MARKER", str(lp.tmp / "marker")))
    done = cli(lp, "apply", str(patch), "--pid", str(target.pid))
    assert done.returncode == 0, done.stderr
    assert re.search(rf"pid {target.pid}: working for \d+s \(loading", done.stdout), done.stdout
    assert "no answer" not in done.stderr, done.stderr
    assert target.ask("greet a") == "SLEEPY a"


def test_a_stopped_target_is_named_as_stopped_while_the_command_waits(lp, target) -> None:
    target.proc.send_signal(signal.SIGSTOP)
    try:
        status = subprocess.Popen(
            [str(LIVEPATCH), "status", "--pid", str(target.pid)],
            env=lp.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = _stderr_line(status, "no answer from its agent", timeout=20)
        assert f"process {target.pid} is stopped" in line and "kill -CONT" in line, line
    finally:
        target.proc.send_signal(signal.SIGCONT)
    out, _ = status.communicate(timeout=20)
    assert status.returncode == 0 and f"pid {target.pid}" in out, out


def test_sockets_on_fds_over_1023_are_served_and_checked(lp, target) -> None:
    """A server holding thousands of connections, or a --tree of many processes, puts
    sockets on fds over 1023, which select() refuses: the agent checked for a hung-up
    client with it (every request would have been an internal error), and the command
    waited for answers with it."""
    import resource

    from livepatch.agent.server import _hung_up

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"RLIMIT_NOFILE is {soft}: no fd over 1023 to be had")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        mine, theirs = socket.socketpair()
        with mine, theirs:
            assert mine.fileno() > 1023
            mine.settimeout(5)
            assert _hung_up(mine) is False
            theirs.close()
            assert _hung_up(mine) is True
        # the command, started with those fds taken, talks to the agent on a higher one
        done = subprocess.run(
            [str(LIVEPATCH), "status", "--pid", str(target.pid)], env=lp.env,
            capture_output=True, text=True, timeout=60, pass_fds=held,
        )
        assert done.returncode == 0 and f"pid {target.pid}" in done.stdout, done.stderr
    finally:
        for fd in held:
            os.close(fd)


def test_a_tree_with_a_python_process_without_agent_is_refused_naming_it(lp, target) -> None:
    child = int(target.ask("child"))
    fix = write_patch(lp.tmp, "fix", GREET_FIX)
    for extra in (["--dry-run"], []):
        done = cli(lp, "apply", str(fix), "--pid", str(target.pid), "--tree", *extra)
        assert done.returncode == 1, done.stdout + done.stderr
        named = f"pid {child} in the tree of pid {target.pid} runs Python without a livepatch agent"
        assert named in done.stderr and "livepatch attach PID" in done.stderr, done.stderr
    assert target.ask("greet x") == "hello x"  # nothing changed
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert status["patches"] == [] and status["pending"] == [], status
