"""`livepatch attach` refuses, before touching anything, every process it must not inject
into; the refused process carries on as if nothing happened."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from attach_targets import OURS, VERSIONS, Target

from livepatch.agent.attach import AttachRefused, attach
from livepatch.agent.inject_stub import inject, stub_library

pytestmark = pytest.mark.timeout(60)

LIVEPATCH = Path(sys.executable).with_name("livepatch")


def _untouched(pid: int) -> None:
    """Still running, not traced, and no stub mapped."""
    status = Path(f"/proc/{pid}/status").read_text()
    assert "\nTracerPid:\t0\n" in status
    assert "State:\tZ" not in status
    assert "stub-" not in Path(f"/proc/{pid}/maps").read_text()


def test_non_python_process_is_refused_and_survives(isolated_env):
    sleeper = subprocess.Popen(["sleep", "100"])
    try:
        time.sleep(0.05)  # let it exec, so /proc shows sleep and not our fork
        with pytest.raises(AttachRefused, match="is not a Python process"):
            attach(sleeper.pid, timeout=5)
        done = subprocess.run(
            [str(LIVEPATCH), "attach", str(sleeper.pid), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=isolated_env,
        )
        assert done.returncode == 1
        out = json.loads(done.stdout)
        assert out["ok"] is False and out["code"] == "attach-refused"
        assert "not a Python process" in out["message"] and "\n" not in out["message"]
        _untouched(sleeper.pid)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    assert sleeper.returncode == -9  # it died of our kill, not of the attach


def test_dead_pid_is_refused():
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    with pytest.raises(AttachRefused, match=f"no process with pid {gone.pid}"):
        attach(gone.pid)


def test_zombie_is_refused():
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while "State:\tZ" not in Path(f"/proc/{zombie.pid}/status").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(AttachRefused, match="has exited"):
            attach(zombie.pid)
    finally:
        zombie.wait(timeout=10)


def test_this_process_and_its_threads_are_refused():
    with pytest.raises(AttachRefused, match=r"livepatch\.agent\.start\(\)"):
        attach(os.getpid())
    ready, leave = threading.Event(), threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        leave.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        ready.wait(10)
        with pytest.raises(AttachRefused, match=f"thread of process {os.getpid()}"):
            attach(tid[0])
    finally:
        leave.set()
        thread.join()


def test_stopped_process_is_refused_and_resumes(spawn):
    target = spawn(OURS, "sleep")
    target.expect("tick")
    os.kill(target.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while "State:\tT" not in Path(f"/proc/{target.pid}/status").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(AttachRefused, match=f"is stopped.*kill -CONT {target.pid}"):
            attach(target.pid, timeout=5)
        _untouched(target.pid)
    finally:
        os.kill(target.pid, signal.SIGCONT)
    target.expect("tick")
    assert target.alive()


def test_remote_debugging_disabled_by_environment_is_refused(spawn):
    target = spawn(OURS, "sleep", env={"PYTHON_DISABLE_REMOTE_DEBUG": "1"})
    with pytest.raises(AttachRefused, match="PYTHON_DISABLE_REMOTE_DEBUG"):
        attach(target.pid, timeout=5)
    _untouched(target.pid)
    first = int(target.expect("tick").split()[1])
    assert int(target.expect("tick").split()[1]) > first


def test_remote_debugging_disabled_by_x_option_is_refused(spawn):
    target = spawn(OURS, "sleep", options=("-W", "ignore", "-X", "disable_remote_debug"))
    with pytest.raises(AttachRefused, match="disable_remote_debug"):
        attach(target.pid, timeout=5)
    _untouched(target.pid)


def test_unsupported_python_is_refused(spawn):
    target = spawn("3.10", "sleep")
    with pytest.raises(AttachRefused, match=r"older than 3\.11; livepatch supports 3\.11 to 3\.13"):
        attach(target.pid, timeout=5)
    _untouched(target.pid)
    target.expect("tick")


@pytest.mark.parametrize("other", [v for v in VERSIONS if v != OURS])
def test_other_python_version_is_refused(spawn, other):
    target = spawn(other, "sleep")
    with pytest.raises(AttachRefused, match=f"runs Python {other}.*this livepatch runs on Python"):
        attach(target.pid, timeout=5)
    _untouched(target.pid)


NOBODY = 65534
SYSTEM_PYTHON = Path(f"/usr/bin/python{OURS}")


def _attach_as(uid: int, pid: int, action: Callable[[int], object] = attach) -> tuple[str, str]:
    """Run action(pid) in a forked child that dropped to `uid`; its error code and message."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # the child only probes and exits: the threads it does not inherit do not matter
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        message = "none|no refusal"
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            action(pid)
        except BaseException as exc:
            message = f"{getattr(exc, 'code', type(exc).__name__)}|{exc}"
        os.write(write_end, message.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    try:
        assert select.select([read_end], [], [], 30)[0], "the unprivileged attach hung"
        code, _, message = os.read(read_end, 4096).decode().partition("|")
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    return code, message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_process_of_another_user_is_refused_without_privilege(spawn):
    target = spawn(OURS, "sleep")
    code, message = _attach_as(NOBODY, target.pid)
    assert code == "attach-refused", message
    assert "ptrace is not permitted" in message and "uid 0" in message
    _untouched(target.pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run processes as another user")
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason=f"needs {SYSTEM_PYTHON} for uid 65534")
def test_same_user_is_refused_when_the_kernel_says_no(isolated_env):
    # a process that made itself non-dumpable cannot be ptraced even by its own user:
    # the kernel hides its /proc details and attach must report that, not crash or inject
    program = (
        "import ctypes, os, time\n"
        "ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0\n"
        "print('ready', os.getpid(), flush=True)\n"
        "while True:\n"
        "    time.sleep(0.05); print('tick', flush=True)\n"
    )
    argv = [str(SYSTEM_PYTHON), "-c", program]
    target = Target(argv, isolated_env, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
    shared = Path(tempfile.mkdtemp(prefix="livepatch-stub-"))
    try:
        code, message = _attach_as(NOBODY, target.pid)
        assert code == "attach-refused", message
        assert "ptrace is not permitted" in message
        # and had the probe let it through, the injector's own EPERM is a refusal too
        shared.chmod(0o755)
        stub = shared / "stub.so"
        shutil.copy(stub_library(), stub)
        stub.chmod(0o644)
        code, message = _attach_as(NOBODY, target.pid, lambda pid: inject(pid, stub))
        assert code == "attach-refused", message
        assert f"ptrace is not permitted on process {target.pid}" in message
        target.expect("tick")
        assert target.alive()
        assert "stub" not in Path(f"/proc/{target.pid}/maps").read_text()
    finally:
        target.stop()
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to hold a tracer")
def test_process_already_traced_is_refused(spawn):
    target = spawn(OURS, "sleep")
    tracer = subprocess.Popen(
        ["strace", "-qq", "-o", "/dev/null", "-p", str(target.pid)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while "\nTracerPid:\t0\n" in Path(f"/proc/{target.pid}/status").read_text():
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)
        with pytest.raises(AttachRefused, match=f"already being traced by process {tracer.pid}"):
            attach(target.pid, timeout=5)
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    target.expect("tick")
    assert target.alive()
