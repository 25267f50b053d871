"""Greenlets (gevent, eventlet and greenlet itself) are tasks whose frames no thread shows.

A greenlet suspended in a function (it switched to another greenlet) keeps its frames off
every thread's stack: ``sys._current_frames()`` shows the greenlet running now, not the
others. Each greenlet has its own ``contextvars`` context, so during a dispatching
transition its calls take the trampoline's slow path, which walks its own stack and sends
a greenlet inside an old version to the old code. What no stack walk saw was the end:
finalization installed the new code while a greenlet was still suspended inside an old
version, and `stop` installed it at once. The greenlet then resumed the old function and
called the new versions of the others, which the guarantee forbids. The tests here run
the invariant's shape on real greenlets: `work` calls `encode`, switches away, and calls
`decode`, which checks that the tag `encode` put on the value is its own.
"""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

import livepatch
from livepatch import TransitionTimeout

from .conftest import patch_for
from .test_frozen_heap import frozen_heap

greenlet = pytest.importorskip("greenlet")


def in_a_thread(test: Callable[..., None]) -> Callable[..., None]:
    """Run the test in a thread of its own. A thread that uses greenlets gets a main
    greenlet, and while any is alive every transition walks the heap for suspended
    greenlets (see livepatch.greenlets): the main thread's would stay for the rest of
    the suite and slow every later transition test."""

    @functools.wraps(test)
    def run(*args: object, **kwargs: object) -> None:
        failed: list[BaseException] = []

        def body() -> None:
            try:
                test(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                failed.append(exc)

        thread = threading.Thread(target=body, name="lptest-greenlets")
        thread.start()
        deadline = time.monotonic() + 60
        while thread.is_alive() and time.monotonic() < deadline:
            livepatch.safepoint()  # this thread waits, as a worker between requests
            thread.join(0.005)
        assert not thread.is_alive(), "the test's thread did not finish"
        if failed:
            raise failed[0]

    return run

TARGET = """
import greenlet

def encode(x):
    return (1, x)

def decode(value):
    tag, x = value
    if tag != 1:
        raise AssertionError(f"decode v1 got a value tagged {tag}")
    return x

def work(x):
    value = encode(x)
    greenlet.getcurrent().parent.switch("between")
    return decode(value)
"""

PATCH = """
@patch.function("M:encode")
def encode(x):
    return (2, x)

@patch.function("M:decode")
def decode(value):
    tag, x = value
    if tag != 2:
        raise AssertionError(f"decode v2 got a value tagged {tag}")
    return x

@patch.function("M:work")
def work(x):
    value = encode(x)
    greenlet.getcurrent().parent.switch("between")
    return decode(value)
"""


def suspended_in_work(m, count: int) -> list:
    """`count` greenlets, each suspended inside `work` between its two calls."""
    gs = [greenlet.greenlet(m.work) for _ in range(count)]
    assert [g.switch(i) for i, g in enumerate(gs)] == ["between"] * count
    return gs


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
@in_a_thread
def test_a_greenlet_suspended_in_an_old_version_holds_finalization(tmp_module, model):
    m = tmp_module(TARGET)
    gs = suspended_in_work(m, 3)
    t = livepatch.apply(patch_for(m, f"greenlets-{model}", PATCH), model=model,
                        timeout=10, wait=False)
    time.sleep(0.1)
    assert not t.done, "finalized with greenlets suspended in the old work"
    names = [b.task for b in t.blockers]
    assert len([n for n in names if n.startswith("greenlet ")]) == 3, t.blockers
    assert all(f.endswith(" in work") for b in t.blockers for f in b.frames), t.blockers
    # resumed, each finishes the old work with the old decode; new greenlets run new code
    assert [g.switch() for g in gs] == [0, 1, 2]
    fresh = greenlet.greenlet(m.work)
    assert fresh.switch(7) == "between" and fresh.switch() == 7
    t.wait(10)
    assert t.state.value == "complete"
    assert m.decode(m.encode(5)) == 5 and m.encode(5) == (2, 5)


@in_a_thread
def test_stop_checks_suspended_greenlets(tmp_module):
    m = tmp_module(TARGET)
    gs = suspended_in_work(m, 2)
    patch = patch_for(m, "greenlets-stop", PATCH)
    with pytest.raises(TransitionTimeout, match="greenlet"):
        livepatch.apply(patch, model="stop", timeout=0.3)
    assert m.encode(1) == (1, 1)  # nothing installed
    assert [g.switch() for g in gs] == [0, 1]
    livepatch.apply(patch, model="stop", timeout=10)
    assert m.encode(1) == (2, 1)


@in_a_thread
def test_a_timeout_names_the_greenlet_and_where_it_waits(tmp_module):
    m = tmp_module(TARGET)
    gs = suspended_in_work(m, 1)
    with pytest.raises(TransitionTimeout) as raised:
        livepatch.apply(patch_for(m, "greenlets-timeout", PATCH), timeout=0.3)
    message = str(raised.value)
    assert "greenlet work" in message and " in work" in message, message
    assert m.encode(1) == (1, 1)
    assert gs[0].switch() == 0


@in_a_thread
def test_greenlets_frozen_by_gc_freeze_are_seen(tmp_module):
    """A pre-fork gevent server freezes its heap: the greenlets in it must still count."""
    m = tmp_module(TARGET)
    gs = suspended_in_work(m, 1)
    with frozen_heap():
        t = livepatch.apply(patch_for(m, "greenlets-frozen", PATCH), timeout=10, wait=False)
        time.sleep(0.1)
        assert not t.done and any(b.task.startswith("greenlet ") for b in t.blockers)
        assert gs[0].switch() == 0
        t.wait(10)
    assert m.encode(1) == (2, 1)


@in_a_thread
def test_the_dry_run_lists_suspended_greenlets_and_changes_nothing(tmp_module):
    from livepatch.agent.operations import running_targets

    m = tmp_module(TARGET)
    gs = suspended_in_work(m, 2)
    patch = patch_for(m, "greenlets-dry", PATCH)
    with frozen_heap():
        frozen = gc.get_freeze_count()
        running = running_targets(patch)
        assert gc.get_freeze_count() > frozen // 2  # left frozen (unfreezing makes it 0)
    # frozen, so not seen by the dry run; seen once the heap is not frozen
    assert running == []
    running = running_targets(patch)
    assert [r["task"].split(" (")[0] for r in running] == ["greenlet work"] * 2, running
    assert all(f"{m.__name__}:work" in r["frames"][0] for r in running), running
    assert [g.switch() for g in gs] == [0, 1]


def test_no_walk_where_greenlet_is_only_imported():
    """SQLAlchemy imports greenlet in processes that never start one: they must not pay
    for the walk (about 90 ms per million objects). Seen through a frozen heap, which
    the walk unfreezes. In a fresh process: this one has started greenlets."""
    script = (
        "import gc, greenlet\n"
        "from livepatch import greenlets\n"
        "gc.freeze()\n"
        "assert greenlets.suspended() == [] and gc.get_freeze_count() > 0, 'walked'\n"
        "g = greenlet.greenlet(lambda: greenlet.getcurrent().parent.switch())\n"
        "g.switch()\n"
        "found = greenlets.suspended()\n"
        "assert found == [g] and gc.get_freeze_count() == 0, found\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
