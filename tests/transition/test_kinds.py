"""Generators, coroutines and async generators under dispatch: the trampoline is of the
same kind as the function it stands in for (3.13 deprecates anything else), and it passes
the whole protocol through — send, throw, close, asend, athrow, aclose — to the version it
picks."""

from __future__ import annotations

import asyncio
import inspect
import threading
import types
import warnings

import pytest

import livepatch

from .conftest import patch_for

TARGET = """
import threading, types
HOLD = threading.Event()
HELD = threading.Event()

def hold():
    HELD.set()
    HOLD.wait(10)

def echo(tag="v1"):
    got = None
    try:
        while True:
            got = yield (tag, got)
    except KeyError as exc:
        yield (tag, "caught", exc.args[0])
    finally:
        CLOSED.append(tag)

CLOSED = []

async def coro(x):
    return ("v1", x)

async def aecho():
    got = None
    try:
        while True:
            got = yield ("v1", got)
    except KeyError as exc:
        yield ("v1", "caught", exc.args[0])
    finally:
        CLOSED.append("async v1")

@types.coroutine
def legacy():
    yield
    return "v1"
"""

PATCH = """
@patch.function("M:hold")
def hold():
    HELD.set()
    HOLD.wait(10)

@patch.function("M:echo")
def echo(tag="v1"):
    got = None
    try:
        while True:
            got = yield ("v2", got)
    except KeyError as exc:
        yield ("v2", "caught", exc.args[0])
    finally:
        CLOSED.append("v2")

@patch.function("M:coro")
async def coro(x):
    return ("v2", x)

@patch.function("M:aecho")
async def aecho():
    got = None
    try:
        while True:
            got = yield ("v2", got)
    except KeyError as exc:
        yield ("v2", "caught", exc.args[0])
    finally:
        CLOSED.append("async v2")

@patch.function("M:legacy")
def legacy():  # the live function's @types.coroutine stays
    yield
    return "v2"
"""


def _in_transition(m, patch):  # type: ignore[no-untyped-def]
    holder = threading.Thread(target=m.hold, name="lptest-hold")
    holder.start()
    assert m.HELD.wait(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as a program run with -W error
        t = livepatch.apply(patch, wait=False)
    assert not t.done
    return t, holder


async def _drive_async(m):  # type: ignore[no-untyped-def]
    agen = m.aecho()
    seen = [await agen.asend(None), await agen.asend("a")]
    seen.append(await agen.athrow(KeyError("k")))
    await agen.aclose()
    async def run_legacy():  # type: ignore[no-untyped-def]
        return await m.legacy()
    seen.append(await run_legacy())
    seen.append(await m.coro(1))
    return seen


def test_trampolines_keep_the_kind_and_pass_the_protocol_through(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "kinds", PATCH)
    t, holder = _in_transition(m, patch)
    try:
        assert inspect.isgeneratorfunction(m.echo)
        assert inspect.iscoroutinefunction(m.coro)
        assert inspect.isasyncgenfunction(m.aecho)
        assert m.legacy.__code__.co_flags & inspect.CO_ITERABLE_COROUTINE
        assert m.echo.__code__.co_filename == "<livepatch dispatch>"  # really dispatching
        gen = m.echo()
        assert next(gen) == ("v2", None)
        assert gen.send("x") == ("v2", "x")
        assert gen.throw(KeyError("k")) == ("v2", "caught", "k")
        gen.close()
        assert m.CLOSED == ["v2"]
        assert asyncio.run(_drive_async(m)) == [
            ("v2", None), ("v2", "a"), ("v2", "caught", "k"), "v2", ("v2", 1)
        ]
        assert m.CLOSED == ["v2", "async v2"]
    finally:
        m.HOLD.set()
        holder.join(5)
    t.wait(10)
    assert m.echo.__code__.co_filename != "<livepatch dispatch>"


def test_a_generator_runs_the_version_of_the_task_that_first_resumes_it(tmp_module):
    """two_universe: a thread still in the old universe and this thread (new universe)
    swap freshly made generators; each runs the version of the stack that starts it."""
    m = tmp_module(TARGET)
    patch = patch_for(m, "first-resume", PATCH)
    go, made = threading.Event(), threading.Event()
    box: dict[str, object] = {}

    def old_universe() -> None:
        go.wait(10)
        box["theirs"] = m.echo()  # made here, started by the other thread
        made.set()
        box["ran_here"] = next(box.pop("mine"))  # type: ignore[call-overload]

    thread = threading.Thread(target=old_universe, name="lptest-old")
    thread.start()
    holder = threading.Thread(target=m.hold, name="lptest-hold")
    holder.start()
    assert m.HELD.wait(5)
    t = livepatch.apply(patch, model="two_universe", wait=False)
    try:
        box["mine"] = m.echo()
        go.set()
        assert made.wait(5)
        assert next(box["theirs"]) == ("v2", None)  # type: ignore[call-overload]
        thread.join(5)
        assert box["ran_here"] == ("v1", None)
    finally:
        go.set()
        m.HOLD.set()
        holder.join(5)
        thread.join(5)
    t.wait(10)


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_apply_and_revert_under_warnings_as_errors(tmp_module, model):
    m = tmp_module(TARGET)
    patch = patch_for(m, f"strict-{model}", PATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        livepatch.apply(patch, model=model, timeout=10)
        assert next(m.echo()) == ("v2", None)
        livepatch.revert(patch.name, model=model, timeout=10)
    assert next(m.echo()) == ("v1", None)
    assert isinstance(m.legacy(), types.GeneratorType)
