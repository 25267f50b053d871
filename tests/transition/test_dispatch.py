"""Dispatch trampolines: every function shape calls the right version during a transition,
and nothing of the trampoline is left once the transition ends."""

from __future__ import annotations

import _thread
import asyncio
import builtins
import gc
import sys
import threading
import time
import types

import pytest

import livepatch
from livepatch import dispatch

from .conftest import patch_for

TARGET = """
import threading
HOLD = threading.Event()
HELD = threading.Event()

def hold():
    HELD.set()
    HOLD.wait(10)

def plain(a, b=10, *rest, c=5, **kw):
    return ("v1", a, b, rest, c, kw)

def posonly(a, /, b):
    return ("v1", a, b)

def make_counter():
    n = [0]
    def counter(step=1):
        n[0] += step
        return ("v1", n[0])
    return counter

COUNTER = make_counter()

class Base:
    def who(self):
        return "base"

class Child(Base):
    def who(self):
        return ("v1", super().who())

def gen(n):
    for i in range(n):
        yield ("v1", i)

async def coro(x):
    return ("v1", x)

def defaults_change(a, b=1):
    return ("v1", a, b)
"""

PATCH = """
@patch.function("M:hold")
def hold():
    HELD.set()
    HOLD.wait(10)

@patch.function("M:plain")
def plain(a, b=10, *rest, c=5, **kw):
    return ("v2", a, b, rest, c, kw)

@patch.function("M:posonly")
def posonly(a, /, b):
    return ("v2", a, b)

@patch.function("M:make_counter.<locals>.counter")
def counter(step=1):
    n[0] += step
    return ("v2", n[0])

@patch.function("M:Child.who")
def who(self):
    return ("v2", super().who())

@patch.function("M:gen")
def gen(n):
    for i in range(n):
        yield ("v2", i)

@patch.function("M:coro")
async def coro(x):
    return ("v2", x)

@patch.function("M:defaults_change")
def defaults_change(a, b=2):
    return ("v2", a, b)
"""


def _in_transition(m, patch, model="hybrid"):
    """Apply with a thread parked in the old `hold`, so the transition stays in flight."""
    holder = threading.Thread(target=m.hold, name="lptest-hold")
    holder.start()
    assert m.HELD.wait(5)
    t = livepatch.apply(patch, model=model, wait=False)
    assert not t.done
    return t, holder


BARE_TARGET = """
import threading
HOLD = threading.Event()
HELD = threading.Event()
SEEN = []

def hold():
    HELD.set()
    HOLD.wait(10)

def record(a):
    SEEN.append(("v1", a))
"""

BARE_PATCH = """
@patch.function("M:hold")
def hold():
    HELD.set()
    HOLD.wait(10)

@patch.function("M:record")
def record(a):
    SEEN.append(("v2", a))
"""


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_a_patched_function_first_on_a_new_stack_dispatches(tmp_module, model, monkeypatch):
    """C may call a patched function with no Python frame under it: a thread started
    with ``_thread.start_new_thread`` (and a greenlet's first function). The trampoline
    found no caller frame and raised ValueError."""
    m = tmp_module(BARE_TARGET)
    t, holder = _in_transition(m, patch_for(m, f"bare-{model}", BARE_PATCH), model)
    errors: list[BaseException | None] = []
    # what such a thread raises goes nowhere else
    monkeypatch.setattr(sys, "unraisablehook", lambda u: errors.append(u.exc_value))
    try:
        _thread.start_new_thread(m.record, (1,))  # the trampoline first on its stack
        deadline = time.monotonic() + 5
        while not (m.SEEN or errors) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert errors == [] and m.SEEN == [("v2", 1)]  # a new task: the new universe
    finally:
        m.HOLD.set()
        holder.join(5)
    t.wait(10)


def test_every_shape_dispatches_during_the_transition(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "shapes", PATCH)
    counter = m.COUNTER
    assert counter() == ("v1", 1)
    t, holder = _in_transition(m, patch)
    try:
        assert m.plain.__code__.co_filename == "<livepatch dispatch>"
        # this thread's stack is clean: it is in the new universe
        assert m.plain(1) == ("v2", 1, 10, (), 5, {})
        assert m.plain(1, 2, 3, 4, c=6, d=7) == ("v2", 1, 2, (3, 4), 6, {"d": 7})
        assert m.posonly(1, b=2) == ("v2", 1, 2)
        with pytest.raises(TypeError):
            m.posonly(a=1, b=2)
        assert counter() == ("v2", 2)  # same closure cell, new code
        assert counter(5) == ("v2", 7)
        assert m.Child().who() == ("v2", "base")
        assert list(m.gen(2)) == [("v2", 0), ("v2", 1)]
        assert asyncio.run(m.coro(3)) == ("v2", 3)
        assert m.defaults_change(0) == ("v2", 0, 2)  # new defaults although they differ
        assert m.plain.__name__ == "plain"
    finally:
        m.HOLD.set()
        holder.join(5)
    t.wait(10)
    # finalized: the new code is installed directly, nothing of the trampoline is left
    for fn in (m.plain, m.posonly, counter, m.Child.who, m.gen, m.coro, m.defaults_change):
        assert fn.__code__.co_filename != "<livepatch dispatch>"
        assert dispatch.STATE_NAME not in (fn.__kwdefaults__ or {})
    assert m.plain.__defaults__ == (10,) and m.plain.__kwdefaults__ == {"c": 5}
    assert m.defaults_change.__defaults__ == (2,)
    assert counter() == ("v2", 8)


def test_exact_trampolines_where_signatures_match(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "exact", PATCH)
    t, holder = _in_transition(m, patch)
    try:
        universe = t._universe
        exact = {e.func.__name__: e.exact for e in universe.entries}
        assert exact["plain"] and exact["posonly"] and exact["who"]
        assert not exact["defaults_change"]  # defaults differ: generic (*args, **kwargs)
    finally:
        m.HOLD.set()
        holder.join(5)
    t.wait(10)


def test_old_universe_thread_gets_old_versions(tmp_module):
    """two_universe: a thread that existed before stays old until its safe point."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "old-thread", PATCH)
    go, went = threading.Event(), threading.Event()
    seen: list[object] = []

    def behind() -> None:
        went.set()
        go.wait(10)
        seen.append(m.plain(1))
        seen.append(list(m.gen(1)))
        livepatch.safepoint()
        seen.append(m.plain(1))

    thread = threading.Thread(target=behind, name="lptest-behind")
    thread.start()
    went.wait(5)
    time.sleep(0.01)
    t, holder = _in_transition(m, patch, model="two_universe")
    try:
        go.set()
        thread.join(5)
    finally:
        m.HOLD.set()
        holder.join(5)
    t.wait(10)
    assert seen == [("v1", 1, 10, (), 5, {}), [("v1", 0)], ("v2", 1, 10, (), 5, {})]


def test_trampoline_matches_free_variables():
    for freevars in [(), ("a",), ("__class__",), ("args", "kwargs", "x")]:
        code = dispatch._template(freevars, None, 0)
        assert code.co_freevars == freevars


def test_a_default_changed_after_the_trampolines_were_built_is_kept(tmp_module, monkeypatch):
    """Trampolines are built before the transition starts (Universe.prepare); a program
    thread may change a function's defaults in between. install must build that entry
    again: a nested function keeps its own defaults through the patch, and the stale ones
    must not come back when dispatch ends."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "late-default", PATCH)
    prepare = dispatch.Universe.prepare

    def prepare_then_change(universe: dispatch.Universe) -> None:
        prepare(universe)
        m.COUNTER.__defaults__ = (5,)  # what another thread could do right now

    monkeypatch.setattr(dispatch.Universe, "prepare", prepare_then_change)
    livepatch.apply(patch, model="hybrid", timeout=10)
    monkeypatch.undo()
    assert m.COUNTER.__code__.co_consts.count("v2") == 1  # the new code, installed
    assert m.COUNTER.__defaults__ == (5,)
    assert m.COUNTER() == ("v2", 5)


def test_a_trampoline_entered_before_dispatch_ended_calls_the_live_function(tmp_module):
    """A thread can enter a trampoline and lose the GIL before it reads its state; by the
    time it reads it, dispatch may have ended. It then finds the state remove() left
    behind, which must send the call wherever calls go now: the new code once the patch
    is finalized, the old one again once it is reverted."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "late-reader", PATCH)
    t, holder = _in_transition(m, patch)
    try:
        # what a thread inside each trampoline's frame, before its first line, would run
        late = {}
        for name in ("plain", "gen", "coro", "defaults_change"):
            fn = getattr(m, name)
            late[name] = types.FunctionType(fn.__code__, fn.__globals__, name,
                                            fn.__defaults__, fn.__closure__)
            late[name].__kwdefaults__ = fn.__kwdefaults__
        assert all(f.__code__.co_filename == "<livepatch dispatch>" for f in late.values())
    finally:
        m.HOLD.set()
        holder.join(5)
    t.wait(10)

    def run_all() -> list[object]:
        return [late["plain"](1), list(late["gen"](1)), asyncio.run(late["coro"](3)),
                late["defaults_change"](0)]

    assert run_all() == [("v2", 1, 10, (), 5, {}), [("v2", 0)], ("v2", 3), ("v2", 0, 2)]
    livepatch.revert(patch.name, model="immediate")
    assert run_all() == [("v1", 1, 10, (), 5, {}), [("v1", 0)], ("v1", 3), ("v1", 0, 1)]


def test_a_generator_made_in_a_transition_runs_whenever_it_is_first_resumed(tmp_module):
    """A generator or coroutine made from a trampoline reads the trampoline's state only
    when it first runs, which may be long after its transition ended and others swept
    their leftovers: the state stays while anything holds the trampoline's code, and
    goes after that."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "late-generator", PATCH)
    t, holder = _in_transition(m, patch)
    try:
        made_then = (m.gen(2), m.coro(5))
    finally:
        m.HOLD.set()
        holder.join(5)
    t.wait(10)
    # by value: a name swept out of the builtins is used again by a later transition
    states = {name: value for name, value in vars(builtins).items()
              if name.startswith("__livepatch_")}
    assert states
    for _ in range(2):  # later transitions sweep what nothing can read any more
        livepatch.revert(patch.name, model="hybrid", timeout=10)
        livepatch.apply(patch, model="hybrid", timeout=10)
    gen, coro = made_then
    assert list(gen) == [("v2", 0), ("v2", 1)]
    assert asyncio.run(coro) == ("v2", 5)
    del gen, coro, made_then
    gc.collect()  # asyncio.run can leave the finished coroutine in a cycle (seen on 3.13)
    livepatch.revert(patch.name, model="hybrid", timeout=10)
    left = {name for name in vars(builtins) if name.startswith("__livepatch_")}
    stayed = [name for name, value in states.items() if vars(builtins).get(name) is value]
    assert not stayed, "a finished transition's states stay once nothing reads them"
    # only the last transition's (swept by the next one): bounded, not one per transition
    assert len(left) <= 8
