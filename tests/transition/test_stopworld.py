"""Stopping the world really parks every other thread, and the stop model measures it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import livepatch
from livepatch import stopworld

from .conftest import patch_for


class _Spinners:
    """Threads running pure Python (a counter loop, no calls) and sleep/compute loops."""

    def __init__(self, spinning: int = 4, sleeping: int = 4) -> None:
        self.counts = [0] * (spinning + sleeping)
        self.stop = False
        self.threads = [
            threading.Thread(target=self._spin, args=(i,), name=f"lptest-spin-{i}")
            for i in range(spinning)
        ] + [
            threading.Thread(target=self._sleep, args=(spinning + i,), name=f"lptest-sleep-{i}")
            for i in range(sleeping)
        ]

    def _spin(self, i: int) -> None:
        counts = self.counts
        while not self.stop:
            counts[i] += 1

    def _sleep(self, i: int) -> None:
        while not self.stop:
            time.sleep(0.0002)
            self.counts[i] += 1

    def __enter__(self) -> _Spinners:
        for t in self.threads:
            t.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        for t in self.threads:
            t.join(10)


def test_no_other_thread_runs_python_while_parked():
    with _Spinners() as s:
        for _ in range(3):
            with stopworld.parked() as pause:
                before = list(s.counts)
                time.sleep(0.03)  # the GIL is free: a thread that was not parked would run
                after = list(s.counts)
            assert before == after, "a thread ran Python code inside the pause"
            # on a loaded machine a sleeper may still be inside its sleep (a C call, not
            # waited for) when settling ends; it parks at its next line
            assert pause.others >= 8 and pause.parked >= 1
            assert 0.03 <= pause.duration < 1.0
        moved = list(s.counts)
        deadline = time.monotonic() + 10
        while not all(b > a for a, b in zip(moved, s.counts, strict=True)):
            assert time.monotonic() < deadline, "threads did not resume"
            time.sleep(0.01)


def test_a_thread_waiting_for_the_gil_is_waited_for_and_one_blocked_in_c_is_not():
    """Settling tells a thread that gave the GIL up between two bytecodes (it runs, then
    parks) from one blocked in a C call (it may never return)."""
    gate = threading.Event()
    blocked = threading.Thread(target=gate.wait, args=(10,), name="lptest-blocked")
    blocked.start()
    try:
        time.sleep(0.05)
        assert not stopworld._waiting_to_run()
        with _Spinners(spinning=1, sleeping=0):
            # this thread holds the GIL: the spinner waits for it after a backward jump
            assert stopworld._waiting_to_run()
    finally:
        gate.set()
        blocked.join(5)


def test_no_thread_runs_python_while_parked_on_a_busy_machine():
    """Two processes keep both CPUs busy, so a spinner is often still waiting for a CPU
    when no thread has parked for a while. Before settling waited for such threads, 5 to
    7% of pauses on 3.12 and 3.13 saw a spinner run one more iteration (scratch runs of
    30 s each); with spinners only, this test failed 4 of 4 runs on 3.12. A sleeper
    whose sleep returned inside the pause ran its next line until the code it returns
    into got LINE events (2 of about 3,000 pauses in scratch runs; 0 of 2,041 since)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        ran = []
        with _Spinners() as s:
            for _ in range(40):
                with stopworld.parked() as pause:
                    before = list(s.counts)
                    time.sleep(0.03)
                    after = list(s.counts)
                if before != after:
                    ran.append(f"{pause.parked} of {pause.others} parked")
                time.sleep(0.01)  # the threads run again
        assert ran == []
    finally:
        for p in busy:
            p.kill()
            p.wait(5)


def test_a_thread_returning_from_a_c_call_inside_the_pause_stops_at_its_next_line():
    """Settling does not wait for a thread blocked in a C call; if the call returns inside
    the pause, the thread parks at its next line, before running it (here: before the
    count, which calls nothing, so no call or jump event would catch it first)."""
    r, w = os.pipe()
    count = [0]

    def read_then_count() -> None:
        os.read(r, 1)
        count[0] += 1

    reader = threading.Thread(target=read_then_count, name="lptest-reader")
    reader.start()
    try:
        time.sleep(0.05)
        with stopworld.parked() as pause:
            os.write(w, b"x")
            time.sleep(0.05)  # the GIL is free: os.read returns now
            inside = count[0]
        reader.join(5)
        assert pause.parked == pause.others - 1  # the reader was blocked in os.read
        assert inside == 0, "the reader ran its next line inside the pause"
        assert count[0] == 1
    finally:
        os.write(w, b"x")
        reader.join(5)
        os.close(r)
        os.close(w)


def test_parking_survives_threads_blocked_in_c():
    """Threads blocked in a C call cannot park; the pause still ends and they resume."""
    gate = threading.Event()
    waiter = threading.Thread(target=gate.wait, args=(10,), name="lptest-blocked")
    waiter.start()
    try:
        with stopworld.parked(settle=0.05) as pause:
            pass
        assert pause.others >= 1 and pause.parked < pause.others
        assert pause.settle < 0.05 + 0.05
    finally:
        gate.set()
        waiter.join(5)


TARGET = """
def f():
    return 1
"""

PATCH = """
@patch.function("M:f")
def f():
    return 2
"""


def test_stop_model_reports_the_pause(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "stop-pause", PATCH)
    with _Spinners():
        t = livepatch.apply(patch, model="stop")
    assert m.f() == 2 and m.f.__code__.co_filename != "<livepatch dispatch>"
    assert t.state.value == "complete" and t.attempts == 1
    assert 0 < t.paused < 0.5
    assert t.to_dict()["paused"] == t.paused


_LOCK_HOLDERS = r"""
import logging, sys, tempfile, threading, pathlib
sys.path.insert(0, tempfile.mkdtemp())
(pathlib.Path(sys.path[0]) / "lp_locks.py").write_text("def f():\n    return 1\n")
import lp_locks, livepatch
logging.basicConfig(stream=open("/dev/null", "w"), level=logging.INFO)
done = False

def enumerating():
    while not done:
        threading.enumerate()

def counting():
    while not done:
        threading.active_count()

def starting():
    while not done:
        t = threading.Thread(target=int)
        t.start()
        t.join()

def logging_():
    log = logging.getLogger("app")
    while not done:
        log.info("request served")

for target in (enumerating, counting, starting, logging_):
    threading.Thread(target=target, daemon=True).start()
patch = livepatch.loads(
    "import livepatch\npatch = livepatch.Patch('locks')\n"
    "@patch.function('lp_locks:f')\ndef f():\n    return 2\n")
for _ in range(25):
    livepatch.apply(patch, model="stop", timeout=10)
    livepatch.revert("locks", model="stop", timeout=10)
done = True
print("ok")
"""


def test_stop_takes_no_lock_a_parked_thread_may_hold():
    """Threads parked inside ``threading.enumerate``, ``active_count``, ``Thread.start``
    or a logging call hold a lock there. The stopped world listed threads with
    ``threading.enumerate`` and counted them with ``active_count``, both taking the same
    lock: the target hung for good, every thread parked (3.11 to 3.13, within a few
    cycles). In a child process, so that a hang fails the test instead of hanging it."""
    done = subprocess.run([sys.executable, "-c", _LOCK_HOLDERS], capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


CORO_TARGET = """
import asyncio

async def serve(gate):
    await gate.wait()
    return 1
"""

CORO_PATCH = """
@patch.function("M:serve")
async def serve(gate):
    await gate.wait()
    return 2
"""


def test_stop_counts_tasks_as_the_other_models_do(tmp_module):
    """Threads and asyncio Tasks, not the threads parked: 5 Tasks suspended in the old
    coroutine once showed as '-4/4 tasks switched'."""
    m = tmp_module(CORO_TARGET)
    patch = patch_for(m, "stop-count", CORO_PATCH)
    loop = asyncio.new_event_loop()
    gate = asyncio.Event()
    serving = [loop.create_task(m.serve(gate)) for _ in range(5)]
    runner = threading.Thread(target=loop.run_forever, name="lptest-loop")
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not all(s._coro.cr_await is not None for s in serving):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t = livepatch.apply(patch, model="stop", wait=False, timeout=10)
        while t.attempts < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        # this thread, the loop's, and the 5 Tasks (at least: the suite may run others)
        held = [b for b in t.blockers if b.task.startswith("task ")]
        assert len(held) == 5, t.blockers
        assert t.tasks_total >= 7 and 0 <= t.tasks_switched == t.tasks_total - 5, t
        loop.call_soon_threadsafe(gate.set)
        t.wait(10)
        assert t.state.value == "complete" and t.tasks_switched == t.tasks_total
    finally:
        loop.call_soon_threadsafe(gate.set)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()
    assert [s.result() for s in serving] == [1] * 5


_SIGNALLED = r"""
import os, signal, subprocess, sys, tempfile, threading, pathlib
sys.path.insert(0, tempfile.mkdtemp())
(pathlib.Path(sys.path[0]) / "lp_signalled.py").write_text("def f():\n    return 1\n")
import lp_signalled, livepatch
from livepatch import stopworld
runs, inside = [0], [0]

def handler(signum, frame):
    runs[0] += 1
    # the main thread counts as parked in the pause in force: it must not run this now
    if stopworld._active and stopworld._parked.get(threading.get_ident()) == stopworld._generation:
        inside[0] += 1

signal.signal(signal.SIGUSR1, handler)
# signals from outside, as a gunicorn master gets SIGCHLD: a thread of ours would park too
kicker = subprocess.Popen([sys.executable, "-c",
    f"import os, signal, time\nwhile True:\n    os.kill({os.getpid()}, signal.SIGUSR1)\n"
    "    time.sleep(0.0003)"])
patch = livepatch.loads(
    "import livepatch\npatch = livepatch.Patch('sig')\n"
    "@patch.function('lp_signalled:f')\ndef f():\n    return 2\n")

def cycles():
    for _ in range(60):
        livepatch.apply(patch, model="stop", timeout=10)
        livepatch.revert("sig", model="stop", timeout=10)

patcher = threading.Thread(target=cycles)
patcher.start()
while patcher.is_alive():
    lp_signalled.f()
kicker.kill()
print(runs[0], inside[0])
"""


def test_a_parked_main_thread_runs_no_signal_handler():
    """A blocking wait in the main thread runs Python signal handlers when a signal
    interrupts it: a parked main thread ran them inside the pause (about 900 times in
    200 cycles, 3.11 to 3.13), Python code in a stopped world, perhaps between two code
    swaps. It now parks with signals blocked and runs them after the pause."""
    done = subprocess.run([sys.executable, "-c", _SIGNALLED], capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    runs, inside = map(int, done.stdout.split())
    assert runs > 100, "too few signals arrived for the test to mean anything"
    assert inside == 0, f"{inside} of {runs} handler runs inside a pause"
