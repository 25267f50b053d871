"""Patching while other threads call the function: every call runs one whole version (old
code with old defaults, or new code with new defaults) — never a mixture, never an error.
Also: applies and reverts from many threads at once keep the version stacks consistent."""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest

import livepatch

from .conftest import Env

TARGET = """
def f(a, *, b=1):
    return a + b


def g(a, b=10):
    return a + b
"""

PATCH = """
import livepatch
patch = livepatch.Patch("NAME")


@patch.function("TARGET_MODULE:f")
def f(a, *, b=1, c=2):
    return a + b + c


@patch.function("TARGET_MODULE:g")
def g(a, b=10, c=20):
    return a + b + c
"""


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    logging.disable(logging.WARNING)  # the engine's INFO lines would dominate the loop
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        sys.setswitchinterval(old)


@pytest.fixture
def m(env: Env) -> types.ModuleType:
    return env.source_module(TARGET, "conc")


def hammer(m: types.ModuleType, stop: threading.Event,
           seen: collections.Counter[object]) -> None:
    while not stop.is_set():
        for fn in (m.f, m.f, m.f, m.g):
            try:
                seen[fn(0)] += 1
            except Exception as exc:  # noqa: BLE001 - counted and asserted on
                seen[f"{type(exc).__name__}: {exc}"] += 1


@pytest.mark.parametrize(
    "model",
    ["immediate", "hybrid"],
)
def test_callers_never_see_a_half_installed_function(
    env: Env, m: types.ModuleType, model: str, fast_switching: None
) -> None:
    patch = livepatch.load(env.patch_text(PATCH.replace("NAME", f"conc-{model}"), m))
    stop = threading.Event()
    seen: collections.Counter[object] = collections.Counter()
    threads = [threading.Thread(target=hammer, args=(m, stop, seen)) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 3.0  # FINDINGS #14: failures showed within seconds
        while time.monotonic() < deadline:  # with the bug, a failure shows within seconds
            livepatch.apply(patch, model=model, timeout=10)
            livepatch.revert(patch.name, model=model, timeout=10)
            if any(isinstance(k, str) for k in list(seen)):
                break  # a failure was seen: no need to go on
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert set(seen) <= {1, 3, 10, 30}, {k: v for k, v in seen.items() if isinstance(k, str)}
    assert (m.f(0), m.g(0)) == (1, 10)


def test_concurrent_applies_and_reverts_keep_stacks_consistent(env: Env,
                                                               m: types.ModuleType) -> None:
    patches = [
        livepatch.load(env.patch_text(PATCH.replace("NAME", f"thread-{i}"), m))
        for i in range(8)
    ]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(patches))

    def churn(p: livepatch.Patch) -> None:
        try:
            barrier.wait()
            for _ in range(15):
                livepatch.apply(p, model="immediate")
                assert p.name in [a.name for a in livepatch.patches()]
                livepatch.revert(p.name, model="immediate")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(p,)) for p in patches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert livepatch.patches() == []
    assert (m.f(0), m.g(0)) == (1, 10)
    assert m.f.__kwdefaults__ == {"b": 1} and m.g.__defaults__ == (10,)


NESTED = """
def outer(k):
    def inner(x):
        return x * k

    return inner


def plain(x):
    return x


made = outer(2)
"""


def test_stop_the_world_pause_does_not_scan_the_heap(env: Env) -> None:
    """finalize may run with every thread parked (the stop model): it must be fast, so it
    cannot walk every object of a big process to find closure instances."""
    m = env.source_module(NESTED, "pause")
    text = """
        import livepatch
        patch = livepatch.Patch("NAME")

        @patch.function("TARGET_MODULE:WHERE")
        def DEF(x):
            return x + 1
    """
    heap = [[i] for i in range(2_500_000)]  # a modest heap of gc-tracked objects
    pauses = {}
    for target, name in (("plain", "plain"), ("outer.<locals>.inner", "inner")):
        patch = livepatch.load(env.patch_text(
            text.replace("NAME", f"pause-{name}").replace("WHERE", target)
            .replace("DEF", name), m))
        t = livepatch.apply(patch, model="stop", timeout=10)
        pauses[name] = t.paused
        livepatch.revert(patch.name, model="immediate")
    del heap
    assert m.made(3) == 6
    assert pauses["inner"] < pauses["plain"] + 0.03, pauses


SERVER = """
import threading

RESULTS = []
STOP = threading.Event()


def serve():
    n = 0
    while not STOP.is_set():
        n += 1

        def handle(req):
            return ("old", req)

        RESULTS.append(handle(n))
        STOP.wait(0.001)
"""


@pytest.mark.parametrize(
    "model",
    ["immediate", "hybrid"],
)
def test_closures_made_by_a_running_enclosing_frame(env: Env, model: str) -> None:
    """A long-running function keeps defining a nested function (a server loop making a
    handler per request). immediate (no checks) must at least warn in the plan, naming the
    running frame; a consistency model must not complete while that frame keeps making
    old-code closures: either they run the new code, or the transition waits for the frame
    and names it when it times out."""
    m = env.source_module(SERVER, "server")
    text = """
        import livepatch
        patch = livepatch.Patch("handler-fix")

        @patch.function("TARGET_MODULE:serve.<locals>.handle")
        def handle(req):
            return ("new", req)
    """
    patch = livepatch.load(env.patch_text(text, m))
    loop = threading.Thread(target=m.serve, daemon=True)
    loop.start()
    try:
        time.sleep(0.05)
        plan = livepatch.plan(patch)
        if model == "immediate":
            said = plan.changes[0].note + " ".join(plan.notes)
            assert "serve" in said and "old code" in said, said
            return
        try:
            livepatch.apply(patch, model=model, timeout=2)
        except livepatch.PatchError as exc:
            assert "serve" in str(exc), str(exc)
            return
        mark = len(m.RESULTS)
        time.sleep(0.1)
        later = [kind for kind, _ in m.RESULTS[mark + 5:]]
    finally:
        m.STOP.set()
        loop.join(5)
    assert later and set(later) == {"new"}, later[:5]


TRACED = """
def f():
    return 1
"""


@pytest.mark.parametrize(
    "model",
    ["immediate", "hybrid",
     "stop"],
)
def test_trace_functions_survive_a_patch(env: Env, model: str) -> None:
    """Coverage tools and debuggers use sys.settrace: a patch must leave the trace
    functions of every thread as they were."""
    m = env.source_module(TRACED, "traced")
    text = """
        import livepatch
        patch = livepatch.Patch("NAME")

        @patch.function("TARGET_MODULE:f")
        def f():
            return 2
    """
    patch = livepatch.load(env.patch_text(text.replace("NAME", f"traced-{model}"), m))

    def tracer(frame: types.FrameType, event: str, arg: object) -> None:
        return None

    stop = threading.Event()
    kept: dict[str, bool] = {}

    def worker() -> None:
        sys.settrace(tracer)
        while not stop.is_set():
            m.f()
            time.sleep(0.001)
        kept["worker"] = sys.gettrace() is tracer
        sys.settrace(None)

    thread = threading.Thread(target=worker)
    thread.start()
    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        time.sleep(0.02)
        livepatch.apply(patch, model=model, timeout=5)
        kept["main after apply"] = sys.gettrace() is tracer
        livepatch.revert(patch.name, model=model, timeout=5)
        kept["main after revert"] = sys.gettrace() is tracer
    finally:
        sys.settrace(old)
        stop.set()
        thread.join(5)
    assert kept == dict.fromkeys(("main after apply", "main after revert", "worker"), True)
