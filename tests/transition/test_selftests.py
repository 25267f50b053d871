"""The shapes of the kernel's livepatch selftests, on threads and asyncio tasks.

Busy target stalls the transition and ``transition()`` names it; revert mid-transition
reverses; a thread started mid-transition starts in the new universe; a thread blocked in
I/O inside a patched function holds the transition until it returns; a lingering
generator blocks finalization until exhausted or the timeout fires; ``force`` completes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest

import livepatch
from livepatch import TransitionBusy, TransitionTimeout

from .conftest import patch_for, tr

TARGET = """
import asyncio, threading, time
GO = threading.Event()
ENTERED = threading.Event()

def version():
    return 1

def busy():
    ENTERED.set()
    while not GO.is_set():
        time.sleep(0.001)
    return version()

def blocked_read(sock):
    ENTERED.set()
    return (version(), sock.recv(16))

def gen():
    yield version()
    yield version()

async def coro_version():
    return version()

async def coro_wait(flag):
    while not flag.is_set():
        await asyncio.sleep(0.001)
    return version()
"""

PATCH = """
@patch.function("M:version")
def version():
    return 2

@patch.function("M:busy")
def busy():
    ENTERED.set()
    while not GO.is_set():
        time.sleep(0.001)
    return version()

@patch.function("M:blocked_read")
def blocked_read(sock):
    ENTERED.set()
    return (version(), sock.recv(16))

@patch.function("M:gen")
def gen():
    yield version()
    yield version()

@patch.function("M:coro_version")
async def coro_version():
    return version()

@patch.function("M:coro_wait")
async def coro_wait(flag):
    while not flag.is_set():
        await asyncio.sleep(0.001)
    return version()
"""


def _wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


class _Busy:
    """A thread running the old `busy` until released; records what it returned."""

    def __init__(self, module) -> None:
        self.module = module
        self.result: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(module.busy()), name="lptest-busy"
        )

    def __enter__(self) -> _Busy:
        self.thread.start()
        assert self.module.ENTERED.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.GO.set()
        self.thread.join(10)


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_busy_target_stalls_and_transition_names_it(tmp_module, model, caplog):
    m = tmp_module(TARGET)
    patch = patch_for(m, "busy", PATCH)
    caplog.set_level(logging.INFO, logger="livepatch.transition")
    with _Busy(m) as busy:
        t = livepatch.apply(patch, model=model, wait=False)
        time.sleep(0.1)
        current = livepatch.transition()
        assert current is t and not t.done
        info = t.to_dict()
        assert info["state"] == "running" and info["tasks_switched"] < info["tasks_total"]
        names = [b["task"] for b in info["blockers"]]
        assert any("lptest-busy" in n for n in names), info["blockers"]
        frames = [f for b in info["blockers"] for f in b["frames"]]
        assert any(f.endswith(" in busy") for f in frames), frames
        # the caller (clean stack) is already in the new universe; the busy thread is not
        assert m.version() == 2
    assert busy.result == [1]  # the old busy() called the old version() to the end
    t.wait(10)
    assert t.state.value == "complete" and livepatch.transition() is None
    assert m.version() == 2
    assert "completed" in caplog.text


def test_revert_mid_transition_reverses(tmp_module, caplog):
    m = tmp_module(TARGET)
    patch = patch_for(m, "rev", PATCH)
    caplog.set_level(logging.INFO, logger="livepatch.transition")
    with _Busy(m) as busy:
        t = livepatch.apply(patch, wait=False)
        time.sleep(0.05)
        assert not t.done
        r = livepatch.revert("rev", wait=False)
        assert r is t
        assert t.reversed
    t.wait(10)
    assert t.state.value == "reversed" and t.error is None
    assert busy.result == [1]
    assert m.version() == 1 and m.version.__kwdefaults__ is None
    assert livepatch.patches() == []
    assert "reversing transition (revert requested)" in caplog.text


def test_revert_again_mid_revert_keeps_reverting(tmp_module, caplog):
    """A second revert while the first is in flight (an engineer running the command
    again) follows that revert: it must not turn it around and put the patch back."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "rev2", PATCH)
    livepatch.apply(patch)
    caplog.set_level(logging.INFO, logger="livepatch")
    with _Busy(m) as busy:  # runs the new busy(): the revert waits for it
        first = livepatch.revert("rev2", wait=False)
        time.sleep(0.05)
        assert not first.done and first.leaves_patched is False
        again = livepatch.revert("rev2", wait=False)
        assert again is first and not first.reversed
    first.wait(10)
    assert first.state.value == "complete" and busy.result == [2]
    assert livepatch.patches() == [] and m.version() == 1
    assert "already being reverted" in caplog.text


def test_revert_of_a_reverted_revert_is_refused_until_it_settles(tmp_module):
    """A revert that was turned around puts the patch back; a transition turns once, so
    reverting now would be ignored: it is refused with what to do instead."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "rev3", PATCH)
    livepatch.apply(patch)
    with _Busy(m):
        t = livepatch.revert("rev3", wait=False)
        time.sleep(0.05)
        assert t.reverse() is t and t.reversed and t.leaves_patched
        with pytest.raises(TransitionBusy, match="wait for it, then revert again"):
            livepatch.revert("rev3", wait=False)
    t.wait(10)
    assert t.state.value == "reversed" and [v.name for v in livepatch.patches()] == ["rev3"]
    assert m.version() == 2
    livepatch.revert("rev3")
    assert m.version() == 1


def test_thread_started_mid_transition_starts_in_new_universe(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "newthread", PATCH)
    seen: list[int] = []
    old_behind = threading.Event()
    release = threading.Event()
    olds: list[int] = []

    def old_thread() -> None:  # existing before: stays old until its safe point
        old_behind.set()
        release.wait(10)
        olds.append(m.version())

    with _Busy(m):
        t0 = threading.Thread(target=old_thread, name="lptest-old")
        t0.start()
        old_behind.wait(5)
        t = livepatch.apply(patch, model="two_universe", wait=False)
        assert not t.done
        t1 = threading.Thread(target=lambda: seen.append(m.version()), name="lptest-new")
        t1.start()
        t1.join(5)
        release.set()
        t0.join(5)
    t.wait(10)
    assert seen == [2]
    assert olds == [1]


def test_thread_blocked_in_io_holds_the_transition(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "io", PATCH)
    a, b = socket.socketpair()
    out: list[object] = []
    reader = threading.Thread(target=lambda: out.append(m.blocked_read(a)), name="lptest-io")
    try:
        reader.start()
        assert m.ENTERED.wait(5)
        t = livepatch.apply(patch, model="hybrid", wait=False)
        time.sleep(0.2)
        assert not t.done
        frames = [f for blk in t.blockers for f in blk.frames]
        assert any(f.endswith(" in blocked_read") for f in frames), t.blockers
        b.sendall(b"x")
        reader.join(5)
        t.wait(10)
    finally:
        a.close()
        b.close()
    assert out == [(1, b"x")]
    assert t.state.value == "complete"


def test_lingering_generator_blocks_finalization_until_exhausted(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "gen", PATCH)
    g = m.gen()
    assert next(g) == 1
    t = livepatch.apply(patch, wait=False)
    time.sleep(0.1)
    assert not t.done
    assert any("lingering" in b.task and "gen" in b.frames[0] for b in t.blockers), t.blockers
    assert m.version() == 2  # the caller is new...
    assert next(g) == 1  # ...but the old generator still sees the old world
    assert list(m.gen()) == [2, 2]
    with pytest.raises(StopIteration):
        next(g)
    t.wait(10)
    assert t.state.value == "complete"


def test_lingering_generator_times_out_and_reverses(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "gen-timeout", PATCH)
    g = m.gen()
    next(g)
    with pytest.raises(TransitionTimeout) as info:
        livepatch.apply(patch, timeout=0.3)
    assert "gen" in str(info.value) and "lingering" in str(info.value)
    # the same, for programs: each blocker with its frames
    (blocker,) = info.value.details["blockers"]
    assert "lingering" in blocker["task"] and blocker["frames"][0].endswith(" in gen"), blocker
    assert m.version() == 1
    assert livepatch.patches() == []
    assert next(g) == 1


def _forced_past_busy(t: livepatch.Transition) -> None:
    """The forced transition names the task it forced past, and where it was."""
    assert [b.task for b in t.forced_past if "lptest-busy" in b.task], t.forced_past
    frames = [f for b in t.forced_past for f in b.frames]
    assert any(f.endswith(" in busy") for f in frames), frames
    assert t.to_dict()["forced_past"][0]["frames"], t.to_dict()


def test_force_completes_at_once(tmp_module, caplog):
    m = tmp_module(TARGET)
    patch = patch_for(m, "force", PATCH)
    caplog.set_level(logging.INFO, logger="livepatch.transition")
    with _Busy(m):
        t = livepatch.apply(patch, force=True)
        assert t.done and t.forced and t.state.value == "complete"
        assert m.version() == 2
        _forced_past_busy(t)
    assert [p.forced for p in livepatch.patches()] == [True]
    assert "forced past 1 task(s) in old code: thread lptest-busy" in caplog.text


def test_force_with_no_task_in_old_code_says_so(tmp_module, caplog):
    m = tmp_module(TARGET)
    patch = patch_for(m, "force-idle", PATCH)
    caplog.set_level(logging.INFO, logger="livepatch.transition")
    t = livepatch.apply(patch, force=True)
    assert t.forced and t.forced_past == []
    assert "no task ran the old code" in caplog.text


@pytest.mark.parametrize("model", ["hybrid", "stop"])
def test_force_complete_in_flight(tmp_module, model):
    m = tmp_module(TARGET)
    patch = patch_for(m, "force-later", PATCH)
    with _Busy(m):
        t = livepatch.apply(patch, model=model, wait=False)
        time.sleep(0.05)
        assert not t.done
        t.force_complete().wait(10)
        assert t.forced and m.version() == 2
        assert m.version.__code__.co_filename != "<livepatch dispatch>"
        _forced_past_busy(t)


def test_one_transition_at_a_time(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "first", PATCH)
    other = tmp_module(TARGET)
    second = patch_for(other, "second", PATCH)
    with _Busy(m):
        livepatch.apply(patch, wait=False)
        with pytest.raises(TransitionBusy):
            livepatch.apply(second)


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_asyncio_tasks_on_one_loop_switch_separately(tmp_module, model):
    """Each Task has its own universe, even on one loop thread: one suspended inside an
    old coroutine stays old while its sibling moves to the new code."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "tasks", PATCH)
    results: dict[str, list[int]] = {"a": [], "b": []}
    started = threading.Event()
    ready = threading.Event()  # the transition is in flight
    done = threading.Event()

    async def task_a() -> None:
        await asyncio.sleep(0)
        while not ready.is_set():
            await asyncio.sleep(0.001)
        livepatch.safepoint()
        results["a"].append(await m.coro_version())

    async def task_b() -> None:
        results["b"].append(await m.coro_wait(ready))  # suspended in the old coroutine
        while not done.is_set():
            await asyncio.sleep(0.001)

    async def main() -> None:
        started.set()
        await asyncio.gather(task_a(), task_b())

    loop_thread = threading.Thread(target=lambda: asyncio.run(main()), name="lptest-loop")
    with _Busy(m):
        loop_thread.start()
        started.wait(5)
        time.sleep(0.02)
        t = livepatch.apply(patch, model=model, wait=False)
        time.sleep(0.05)
        assert any("coro_wait" in f for b in t.blockers for f in b.frames), t.blockers
        ready.set()
        _wait_for(lambda: results["a"] and results["b"])
        done.set()
        loop_thread.join(5)
    t.wait(10)
    assert results == {"a": [2], "b": [1]}


def test_transition_reports_and_logs(tmp_module, caplog):
    m = tmp_module(TARGET)
    patch = patch_for(m, "report", PATCH)
    caplog.set_level(logging.INFO, logger="livepatch.transition")
    with _Busy(m):
        t = livepatch.apply(patch, wait=False)
        time.sleep(0.05)
        d = t.to_dict()
        assert d["model"] == "hybrid" and d["direction"] == "patch"
        assert d["elapsed"] > 0 and set(d["functions"]) == {
            f"{m.__name__}:{n}"
            for n in ("version", "busy", "blocked_read", "gen", "coro_version", "coro_wait")
        }
        assert tr.transition() is t
    t.wait(10)
    text = caplog.text
    assert "livepatch: report: patch transition started (hybrid): switched" in text
    assert "livepatch: report: patch transition completed (hybrid" in text


@pytest.mark.parametrize("model", ["hybrid", "stop"])
def test_a_timeout_on_a_tasks_outermost_function_says_no_wait_will_help(tmp_module, model):
    m = tmp_module(TARGET)
    patch = patch_for(m, "outermost", PATCH)
    # `busy` is where one thread's work starts; the other calls it from a function of its own
    direct = threading.Thread(target=m.busy, name="lptest-direct")
    wrapped = threading.Thread(target=lambda: m.busy(), name="lptest-wrapped")
    try:
        for thread in (direct, wrapped):
            m.ENTERED.clear()
            thread.start()
            assert m.ENTERED.wait(5)
        with pytest.raises(TransitionTimeout) as info:
            livepatch.apply(patch, model=model, timeout=0.3)
    finally:
        m.GO.set()
        direct.join(10)
        wrapped.join(10)
    by_task = {b["task"].split()[1]: b for b in info.value.details["blockers"]}
    assert by_task["lptest-direct"].get("outermost") == "busy", by_task
    assert "outermost" not in by_task["lptest-wrapped"], by_task
    message = str(info.value)
    assert "busy is where a task's work starts" in message, message
    assert "patch the functions it calls instead" in message and "for the others" in message


def test_an_asyncio_tasks_own_coroutine_is_named_as_its_outermost(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "outermost-task", PATCH)
    flag = threading.Event()
    caught: list[TransitionTimeout] = []

    async def main() -> None:
        task = asyncio.ensure_future(m.coro_wait(flag))
        await asyncio.sleep(0.01)
        try:
            await asyncio.to_thread(livepatch.apply, patch, model="hybrid", timeout=0.3)
        except TransitionTimeout as exc:
            caught.append(exc)
        flag.set()
        await task

    asyncio.run(main())
    assert caught, "the apply should have timed out on the task"
    blockers = caught[0].details["blockers"]
    assert [b.get("outermost") for b in blockers] == ["coro_wait"], blockers
    assert "for the others" not in str(caught[0])
