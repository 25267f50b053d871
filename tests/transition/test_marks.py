"""The dispatch fast path trusts a per-context mark (``dispatch.SWITCHED``): a task seen at
the goal with a clean stack skips the stack walk. These tests pin down where the mark must
not be trusted — a context copied onto a stack that holds an old version — and that a
reversal unmarks everyone."""

from __future__ import annotations

import asyncio
import threading

import livepatch
from livepatch import dispatch

from .conftest import patch_for

TARGET = """
import asyncio, threading
LOOP = None
READY = threading.Event()

def helper():
    return "v1"

def runner():
    global LOOP
    LOOP = asyncio.new_event_loop()
    READY.set()
    LOOP.run_forever()
    LOOP.close()
    return "v1"

async def job():
    return helper()

HOLD = threading.Event()
HELD = threading.Event()

def hold():
    HELD.set()
    HOLD.wait(10)
"""

PATCH = """
@patch.function("M:helper")
def helper():
    return "v2"

@patch.function("M:runner")
def runner():
    global LOOP
    LOOP = asyncio.new_event_loop()
    READY.set()
    LOOP.run_forever()
    LOOP.close()
    return "v2"

@patch.function("M:hold")
def hold():
    HELD.set()
    HOLD.wait(10)
"""


def test_marked_context_sent_to_a_loop_running_inside_an_old_version(tmp_module):
    """A loop runs inside the old `runner`: a task sent there from a switched thread
    carries that thread's mark, yet sits on top of old code — it must get the old
    version, and the transition names the running `runner` frame."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "loop-in-old", PATCH)
    loop_thread = threading.Thread(target=m.runner, name="lptest-runner")
    loop_thread.start()
    assert m.READY.wait(5)
    t = livepatch.apply(patch, wait=False, timeout=20)
    try:
        assert not t.done
        assert m.helper() == "v2"  # this thread: clean stack, at the goal — and now marked
        assert dispatch.SWITCHED.get(None) is t._universe.mark
        assert t._universe.slow.get("foreign"), t._universe.slow
        future = asyncio.run_coroutine_threadsafe(m.job(), m.LOOP)
        assert future.result(5) == "v1"
        blocking = [line for b in t.blockers for line in b.frames]
        assert any("in runner" in line for line in blocking), t.blockers
    finally:
        m.LOOP.call_soon_threadsafe(m.LOOP.stop)
        loop_thread.join(5)
    t.wait(10)
    assert t.state.value == "complete"
    assert m.helper() == "v2"


def test_a_reversal_unmarks_every_context(tmp_module):
    """Marks of the forward epoch do not survive a turn-around: a thread marked while
    going forward takes the slow path again, and gets the old version once reversed."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "unmark", PATCH)
    holder = threading.Thread(target=m.hold, name="lptest-hold")
    holder.start()
    assert m.HELD.wait(5)
    t = livepatch.apply(patch, wait=False, timeout=20)
    try:
        assert m.helper() == "v2"
        forward = t._universe.mark
        assert dispatch.SWITCHED.get(None) is forward
        back = livepatch.revert(patch.name, wait=False)
        assert t._universe.mark is not forward
        assert m.helper() == "v1"  # the fast path would have said "v2"
        assert dispatch.SWITCHED.get(None) is t._universe.mark
    finally:
        m.HOLD.set()
        holder.join(5)
    back.wait(10)
    assert m.helper() == "v1"
