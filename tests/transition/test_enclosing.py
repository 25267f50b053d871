"""A running frame of an enclosing function holds the version of its closures (FINDINGS 29).

``serve()`` loops and defines ``handle`` on every round; the patch replaces
``serve.<locals>.handle``. The running ``serve`` frame executes the code it started with,
so every handler it makes runs the body that code's constant holds, whatever is installed
later. The consistency models must treat that frame like a frame of ``handle`` itself: it
blocks its task (and the transition, naming it) until it returns; on revert, a frame making
the patch's closures blocks the way back. An enclosing function that is not running blocks
nothing.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import livepatch
from livepatch import TransitionTimeout

from .conftest import patch_for

TARGET = """
import asyncio, threading, time

RESULTS = []
LEAVES = []
IN_SERVE = threading.Event()
IN_MIDDLE = threading.Event()
GO = threading.Event()
IN_BUSY = threading.Event()


def serve(stop, rounds=-1):
    n = 0
    IN_SERVE.set()
    while not stop.is_set() and n != rounds:
        n += 1

        def handle(req):
            return ("old", req)

        RESULTS.append(handle(n))
        stop.wait(0.001)
    return n


def busy():
    IN_BUSY.set()
    while not GO.is_set():
        time.sleep(0.001)
    return 1


def outer():
    def middle(stop, rounds=-1):
        n = 0
        IN_MIDDLE.set()
        while not stop.is_set() and n != rounds:
            n += 1

            def leaf(x):
                return ("old", x)

            LEAVES.append(leaf(n))
            stop.wait(0.001)

    return middle


async def aserve(stop):
    n = 0
    IN_SERVE.set()
    while not stop.is_set():
        n += 1

        def handle(req):
            return ("old", req)

        RESULTS.append(handle(n))
        await asyncio.sleep(0.001)
"""

HANDLE = """
@patch.function("M:serve.<locals>.handle")
def handle(req):
    return ("new", req)
"""

BUSY = """
@patch.function("M:busy")
def busy():
    while not GO.is_set():
        time.sleep(0.001)
    return 2
"""

LEAF = """
@patch.function("M:outer.<locals>.middle.<locals>.leaf")
def leaf(x):
    return ("new", x)
"""

AHANDLE = """
@patch.function("M:aserve.<locals>.handle")
def handle(req):
    return ("new", req)
"""

FRAME = re.compile(r"\.py:\d+ in (?P<name>\S+)$")


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _frames_named(blockers: list[Any], name: str) -> list[str]:
    """The blockers' frames (``file:line in name``) that are in function `name`."""
    frames = [f for b in blockers for f in b.frames]
    return [f for f in frames if (found := FRAME.search(f)) and found["name"] == name]


def _kinds(results: list[tuple[str, int]], start: int) -> set[str]:
    return {kind for kind, _ in results[start:]}


class _Serving:
    """A thread running `target(stop)` until the block ends; afterwards it stays alive
    (clean stack) until released, so a test can see the transition end *because the frame
    returned*, not because the thread did."""

    def __init__(self, target: Callable[[threading.Event], object], name: str = "lptest-serve",
                 *, after: Callable[[], None] | None = None) -> None:
        self.stop = threading.Event()
        self.returned = threading.Event()
        self.release = threading.Event()
        self.after = after

        def run() -> None:
            target(self.stop)
            self.returned.set()
            if self.after is not None:
                self.after()
            self.release.wait(10)

        self.thread = threading.Thread(target=run, name=name)

    def __enter__(self) -> _Serving:
        self.thread.start()
        return self

    def finish(self) -> float:
        """Make the frame return; the time it did."""
        self.stop.set()
        assert self.returned.wait(5)
        return time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.release.set()
        self.thread.join(10)


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_running_enclosing_frame_is_named_and_holds_the_transition(tmp_module, model):
    m = tmp_module(TARGET)
    patch = patch_for(m, f"enc-{model}", HANDLE)
    # two_universe switches a live thread only at a safe point
    after = livepatch.safepoint if model == "two_universe" else None
    with _Serving(m.serve, after=after) as serving:
        assert m.IN_SERVE.wait(5)
        t = livepatch.apply(patch, model=model, timeout=10, wait=False)
        time.sleep(0.2)
        assert livepatch.transition() is t and not t.done
        serve_frames = _frames_named(t.blockers, "serve")
        assert serve_frames, t.blockers
        holder = next(b for b in t.blockers if _frames_named([b], "serve"))
        assert "lptest-serve" in holder.task, t.blockers
        assert t.tasks_switched < t.tasks_total
        mark = len(m.RESULTS)
        _wait_for(lambda: len(m.RESULTS) > mark + 3)
        assert _kinds(m.RESULTS, mark) == {"old"}  # the frame keeps its version meanwhile
        returned = serving.finish()
        t.wait(5)
        ended = time.monotonic()
    assert t.state.value == "complete", t
    assert ended - returned < 2.0, ended - returned
    mark = len(m.RESULTS)
    m.serve(threading.Event(), rounds=3)
    assert _kinds(m.RESULTS, mark) == {"new"}


def test_timeout_names_the_running_enclosing_frame(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "enc-timeout", HANDLE)
    with _Serving(m.serve):
        assert m.IN_SERVE.wait(5)
        with pytest.raises(TransitionTimeout) as info:
            livepatch.apply(patch, model="hybrid", timeout=0.5)
        assert "lptest-serve" in str(info.value) and " in serve" in str(info.value)
        assert "let serve return" in str(info.value)  # a safe point would not help
        assert livepatch.patches() == [] and livepatch.transition() is None
        mark = len(m.RESULTS)
        _wait_for(lambda: len(m.RESULTS) > mark + 3)
        assert _kinds(m.RESULTS, mark) == {"old"}


def test_stop_model_reports_the_running_enclosing_frame(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "enc-stop", HANDLE)
    with _Serving(m.serve):
        assert m.IN_SERVE.wait(5)
        with pytest.raises(TransitionTimeout) as info:
            livepatch.apply(patch, model="stop", timeout=0.5)
        message = str(info.value)
        assert "activeness safety check failed" in message, message
        assert "lptest-serve" in message and " in serve" in message, message
        assert livepatch.patches() == []
    # once nothing runs serve, the same patch goes through
    livepatch.apply(patch, model="stop", timeout=5)
    mark = len(m.RESULTS)
    m.serve(threading.Event(), rounds=2)
    assert _kinds(m.RESULTS, mark) == {"new"}


def test_stop_model_completes_once_the_enclosing_frame_returns(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "enc-stop-wait", HANDLE)
    with _Serving(m.serve) as serving:
        assert m.IN_SERVE.wait(5)
        t = livepatch.apply(patch, model="stop", timeout=10, wait=False)
        time.sleep(0.2)
        assert not t.done and _frames_named(t.blockers, "serve"), t.blockers
        serving.finish()
        t.wait(5)
    assert t.state.value == "complete"


def test_revert_mid_way_reverses_past_the_running_frame(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "enc-rev", HANDLE)
    with _Serving(m.serve):
        assert m.IN_SERVE.wait(5)
        t = livepatch.apply(patch, model="hybrid", timeout=10, wait=False)
        time.sleep(0.1)
        assert not t.done
        assert livepatch.revert("enc-rev", wait=False) is t
        t.wait(5)  # the frame makes old closures: it is where the way back goes
        assert t.state.value == "reversed" and t.error is None
        assert livepatch.patches() == []
        mark = len(m.RESULTS)
        _wait_for(lambda: len(m.RESULTS) > mark + 3)
        assert _kinds(m.RESULTS, mark) == {"old"}
    mark = len(m.RESULTS)
    m.serve(threading.Event(), rounds=2)
    assert _kinds(m.RESULTS, mark) == {"old"}


def test_frame_making_the_patched_closures_blocks_the_revert(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "enc-back", HANDLE)
    livepatch.apply(patch, model="hybrid", timeout=5)
    with _Serving(m.serve) as serving:
        assert m.IN_SERVE.wait(5)
        with pytest.raises(TransitionTimeout) as info:
            livepatch.revert("enc-back", model="hybrid", timeout=0.5)
        assert "lptest-serve" in str(info.value) and " in serve" in str(info.value)
        assert [p.name for p in livepatch.patches()] == ["enc-back"]
        mark = len(m.RESULTS)
        _wait_for(lambda: len(m.RESULTS) > mark + 3)
        assert _kinds(m.RESULTS, mark) == {"new"}
        t = livepatch.revert("enc-back", model="hybrid", timeout=10, wait=False)
        time.sleep(0.1)
        assert not t.done and _frames_named(t.blockers, "serve"), t.blockers
        serving.finish()
        t.wait(5)
    assert t.state.value == "complete" and livepatch.patches() == []
    mark = len(m.RESULTS)
    m.serve(threading.Event(), rounds=2)
    assert _kinds(m.RESULTS, mark) == {"old"}


@pytest.mark.parametrize("model", ["hybrid", "stop"])
def test_enclosing_function_not_running_blocks_nothing(tmp_module, model):
    m = tmp_module(TARGET)
    patch = patch_for(m, f"enc-idle-{model}", HANDLE)
    m.serve(threading.Event(), rounds=2)  # it ran, and returned
    idle = threading.Event()
    other = threading.Thread(target=lambda: idle.wait(10), name="lptest-idle")
    other.start()
    try:
        t0 = time.monotonic()
        t = livepatch.apply(patch, model=model, timeout=5)
        took = time.monotonic() - t0
    finally:
        idle.set()
        other.join(5)
    assert t.state.value == "complete" and t.blockers == []
    assert took < 2.0, took
    mark = len(m.RESULTS)
    m.serve(threading.Event(), rounds=2)
    assert _kinds(m.RESULTS, mark) == {"new"}


def test_running_middle_function_holds_the_transition(tmp_module):
    """a.<locals>.b.<locals>.c: a running frame of b makes c closures from its own code."""
    m = tmp_module(TARGET)
    middle = m.outer()
    patch = patch_for(m, "enc-middle", LEAF)
    with _Serving(middle, name="lptest-middle") as serving:
        assert m.IN_MIDDLE.wait(5)
        t = livepatch.apply(patch, model="hybrid", timeout=10, wait=False)
        time.sleep(0.2)
        assert not t.done
        assert _frames_named(t.blockers, "outer.<locals>.middle"), t.blockers
        mark = len(m.LEAVES)
        _wait_for(lambda: len(m.LEAVES) > mark + 3)
        assert _kinds(m.LEAVES, mark) == {"old"}
        serving.finish()
        t.wait(5)
    assert t.state.value == "complete"
    mark = len(m.LEAVES)
    middle(threading.Event(), rounds=2)  # the instance made before the patch
    m.outer()(threading.Event(), rounds=2)
    assert _kinds(m.LEAVES, mark) == {"new"}


def test_enclosing_frame_entered_by_a_switched_task_holds_finalization(tmp_module):
    """Enclosing functions get no trampoline: a task already in the new universe that calls
    one during the transition runs its old code. The transition must not end under it."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "enc-late", HANDLE + BUSY)
    busy = threading.Thread(target=m.busy, name="lptest-busy")
    busy.start()
    try:
        assert m.IN_BUSY.wait(5)
        t = livepatch.apply(patch, model="hybrid", timeout=10, wait=False)
        assert not t.done
        # born during the transition: in the new universe, yet it runs serve's old code
        with _Serving(m.serve, name="lptest-late") as serving:
            assert m.IN_SERVE.wait(5)
            m.GO.set()
            busy.join(5)
            time.sleep(0.2)
            assert not t.done, t.to_dict()
            holder = [b for b in t.blockers if _frames_named([b], "serve")]
            assert holder and "lptest-late" in holder[0].task, t.blockers
            serving.finish()
            t.wait(5)
    finally:
        m.GO.set()
        busy.join(5)
    assert t.state.value == "complete"
    mark = len(m.RESULTS)
    m.serve(threading.Event(), rounds=2)
    assert _kinds(m.RESULTS, mark) == {"new"}


def test_running_enclosing_coroutine_holds_its_task(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "enc-async", AHANDLE)
    stop = threading.Event()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=lambda: loop.run_until_complete(m.aserve(stop)),
                              name="lptest-loop")
    runner.start()
    try:
        assert m.IN_SERVE.wait(5)
        t = livepatch.apply(patch, model="hybrid", timeout=10, wait=False)
        time.sleep(0.2)
        assert not t.done
        assert _frames_named(t.blockers, "aserve"), t.blockers
        stop.set()
        runner.join(5)
        t.wait(5)
    finally:
        stop.set()
        runner.join(5)
        loop.close()
    assert t.state.value == "complete"
