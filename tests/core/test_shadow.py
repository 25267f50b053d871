"""livepatch.shadow: per-object data for objects that already exist (kernel shadow vars)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from livepatch import shadow


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    for sid in ("a", "b", "lock", "count", "x", "fail", "race"):
        shadow.free_all(sid)


class Plain:
    pass


class Slotted:
    __slots__ = ("v",)


class SlottedWeak:
    __slots__ = ("v", "__weakref__")


class EqRaises:
    """Unhashable, comparisons raise: shadow must key by identity only."""

    __slots__ = ("__weakref__",)

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparisons")

    __hash__ = None  # type: ignore[assignment]


def test_get_alloc_free() -> None:
    obj = Plain()
    assert shadow.get(obj, "a") is None
    value = shadow.alloc(obj, "a", [1])
    assert shadow.get(obj, "a") is value
    assert shadow.get(Plain(), "a") is None  # per object
    assert shadow.get(obj, "b") is None  # per id
    with pytest.raises(ValueError, match="already exists"):
        shadow.alloc(obj, "a", [2])
    assert shadow.get(obj, "a") == [1]
    freed: list[Any] = []
    shadow.free(obj, "a", destructor=freed.append)
    assert freed == [[1]]
    assert shadow.get(obj, "a") is None
    shadow.free(obj, "a")  # absent: no error
    assert vars(obj) == {}  # nothing was written on the object


def test_get_or_alloc_runs_factory_once() -> None:
    obj = Plain()
    calls: list[int] = []

    def factory() -> dict[str, int]:
        calls.append(1)
        return {"n": 0}

    first = shadow.get_or_alloc(obj, "count", factory)
    second = shadow.get_or_alloc(obj, "count", factory)
    assert first is second and calls == [1]
    assert shadow.get(obj, "count") is first


def test_free_all() -> None:
    objs = [Plain() for _ in range(5)]
    for i, o in enumerate(objs):
        shadow.alloc(o, "x", i)
        shadow.alloc(o, "b", -i)
    seen: list[int] = []
    assert shadow.free_all("x", destructor=seen.append) == 5
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert all(shadow.get(o, "x") is None for o in objs)
    assert [shadow.get(o, "b") for o in objs] == [0, -1, -2, -3, -4]
    assert shadow.free_all("x") == 0


@pytest.mark.parametrize(
    "make",
    [Slotted, SlottedWeak, object, lambda: 12345678901234567890, lambda: (1, "t"),
     lambda: frozenset({1}), lambda: "some string", lambda: b"bytes", lambda: [1],
     lambda: {"k": 1}, lambda: EqRaises()],
    ids=["slotted", "slotted-weakref", "object", "int", "tuple", "frozenset", "str", "bytes",
         "list", "dict", "eq-raises"],
)
def test_any_object(make: Any) -> None:
    obj = make()
    with pytest.raises((AttributeError, TypeError)):
        obj.lpcore_field = 1  # these objects cannot take new attributes
    shadow.alloc(obj, "a", "value")
    assert shadow.get(obj, "a") == "value"
    assert shadow.get_or_alloc(obj, "b", lambda: "made") == "made"
    shadow.free(obj, "a")
    assert shadow.get(obj, "a") is None
    assert shadow.get(obj, "b") == "made"


def test_entries_die_with_their_object() -> None:
    before = shadow.count()
    obj = Plain()
    payload = Plain()
    ref = weakref.ref(payload)
    shadow.alloc(obj, "a", payload)
    del payload
    assert shadow.count() == before + 1
    del obj
    gc.collect()
    assert ref() is None  # the value went with the object
    assert shadow.count() == before


def test_entries_die_with_object_in_a_cycle() -> None:
    before = shadow.count()
    obj = SlottedWeak()
    obj.v = obj  # a reference cycle: only the cyclic gc frees it
    shadow.alloc(obj, "a", 1)
    del obj
    gc.collect()
    assert shadow.count() == before


def test_new_object_at_reused_address_sees_no_stale_entry() -> None:
    for _ in range(200):
        obj = Plain()
        shadow.alloc(obj, "a", id(obj))
        del obj
        fresh = Plain()
        assert shadow.get(fresh, "a") is None
        del fresh


def test_non_weakrefable_objects_are_kept_alive_until_freed() -> None:
    """Documented: an object without weak references is held by its entries."""
    deleted: list[str] = []

    class Tracked:
        __slots__ = ("name",)

        def __del__(self) -> None:
            deleted.append(self.name)

    obj = Tracked()
    obj.name = "t"
    with pytest.raises(TypeError):
        weakref.ref(obj)
    before = shadow.count()
    shadow.alloc(obj, "a", 1)
    del obj
    gc.collect()
    assert deleted == []  # kept alive: its id() cannot be reused while entries exist
    assert shadow.count() == before + 1
    assert shadow.free_all("a") == 1
    gc.collect()
    assert deleted == ["t"]
    assert shadow.count() == before


def test_failing_factory_leaves_no_entry_and_can_retry() -> None:
    obj = Plain()
    before = shadow.count()

    def broken() -> int:
        raise KeyError("no")

    with pytest.raises(KeyError):
        shadow.get_or_alloc(obj, "fail", broken)
    assert shadow.get(obj, "fail") is None
    assert shadow.get_or_alloc(obj, "fail", lambda: 7) == 7
    shadow.free(obj, "fail")
    assert shadow.count() == before


def test_failing_factory_does_not_pin_non_weakrefable_object() -> None:
    deleted: list[int] = []

    class Tracked:
        __slots__ = ()

        def __del__(self) -> None:
            deleted.append(1)

    before = shadow.count()
    obj = Tracked()
    with pytest.raises(KeyError):
        shadow.get_or_alloc(obj, "fail", lambda: {}["missing"])
    del obj
    gc.collect()
    assert deleted == [1]
    assert shadow.count() == before


def race_round() -> None:
    obj = Slotted()  # not weakly referenceable: the strong-anchor path
    other = Plain()
    calls: list[int] = []
    barrier = threading.Barrier(16)
    results: list[Any] = [None] * 16
    gate = threading.Event()

    def factory() -> object:
        calls.append(1)
        gate.wait(0.01)  # widen the window for the other threads
        return object()

    def worker(i: int) -> None:
        barrier.wait()
        target = obj if i % 2 else other
        results[i] = shadow.get_or_alloc(target, "race", factory)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(calls) == 2  # once per object
    assert len({id(r) for r in results[1::2]}) == 1
    assert len({id(r) for r in results[0::2]}) == 1
    assert results[0] is not results[1]
    shadow.free_all("race")


def test_sixteen_threads_race_get_or_alloc() -> None:
    for _round in range(20):
        race_round()


def test_racing_get_waits_for_the_factory() -> None:
    obj = Plain()
    started, release = threading.Event(), threading.Event()
    got: list[Any] = []

    def factory() -> str:
        started.set()
        release.wait(5)
        return "ready"

    maker = threading.Thread(target=lambda: shadow.get_or_alloc(obj, "x", factory))
    maker.start()
    assert started.wait(5)
    reader = threading.Thread(target=lambda: got.append(shadow.get(obj, "x")))
    reader.start()
    reader.join(0.1)
    assert reader.is_alive()  # waiting for the factory, not returning None or a placeholder
    release.set()
    maker.join(5)
    reader.join(5)
    assert got == ["ready"]


def test_factory_may_use_shadow_variables() -> None:
    obj = Plain()
    value = shadow.get_or_alloc(obj, "a", lambda: shadow.get_or_alloc(obj, "b", lambda: 2) + 1)
    assert (value, shadow.get(obj, "b")) == (3, 2)


# -- deadlocks: run in a subprocess so a hang cannot take the test run down ------------


def run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60,
    )


def test_freeing_a_strong_anchor_that_owns_a_shadowed_object() -> None:
    """free_all drops the last reference to a non-weakrefable object; its attribute was
    the last reference to another object with shadow entries (whose weakref callback
    then runs)."""
    proc = run_isolated(
        """
        import threading
        from livepatch import shadow

        class Sock:
            pass

        class Conn:
            __slots__ = ("sock",)

        def work():
            conn = Conn()
            conn.sock = Sock()
            shadow.alloc(conn, "x", 2)
            shadow.alloc(conn.sock, "lock", 1)
            bystander = Sock()
            shadow.alloc(bystander, "x", 3)
            del conn
            shadow.free_all("x")
            print("freed", shadow.count())
            del bystander

        t = threading.Thread(target=work, daemon=True)
        t.start()
        t.join(4)
        print("hung" if t.is_alive() else "ok")
        """
    )
    assert proc.stdout.split()[-1:] == ["ok"], proc.stdout + proc.stderr
    assert "freed 0" in proc.stdout  # conn, its sock and the bystander are all gone


def test_garbage_collection_during_a_shadow_call() -> None:
    """The cyclic gc may run inside any shadow call and collect other shadowed objects."""
    proc = run_isolated(
        """
        import gc
        import threading
        from livepatch import shadow

        class Node:
            pass

        def work():
            gc.set_threshold(1, 1, 1)
            keep = []
            for i in range(3000):
                n = Node()
                n.me = n  # a cycle: freed by the gc, at a moment of its choosing
                shadow.alloc(n, "a", i)
                del n
                o = Node()
                keep.append(o)
                shadow.get_or_alloc(o, "b", dict)
            print("done")

        t = threading.Thread(target=work, daemon=True)
        t.start()
        t.join(6)
        print("hung" if t.is_alive() else "ok")
        """
    )
    assert proc.stdout.split()[-1:] == ["ok"], proc.stdout + proc.stderr


def test_free_all_runs_every_destructor_even_if_one_fails() -> None:
    objs = [Plain() for _ in range(4)]
    for i, o in enumerate(objs):
        shadow.alloc(o, "x", i)
    closed: list[int] = []

    def close(value: int) -> None:
        closed.append(value)
        if value == 1:
            raise OSError("close failed")

    try:
        shadow.free_all("x", destructor=close)
    except OSError:
        pass  # reporting the failure is fine; skipping the other destructors is not
    assert sorted(closed) == [0, 1, 2, 3]
    assert all(shadow.get(o, "x") is None for o in objs)


def test_alloc_race_exactly_one_wins() -> None:
    obj = Slotted()
    barrier = threading.Barrier(16)
    wins: list[int] = []
    losses: list[int] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            shadow.alloc(obj, "race", i)
            wins.append(i)
        except ValueError:
            losses.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(wins) == 1 and len(losses) == 15
    assert shadow.get(obj, "race") == wins[0]


def test_recursive_get_or_alloc_on_the_same_key_does_not_hang() -> None:
    """A factory that (by mistake) asks for its own key: an error, not a silent hang.
    (In a subprocess: a hung thread must not stay behind in the test process.)"""
    proc = run_isolated(
        """
        import threading
        from livepatch import shadow

        class Plain:
            pass

        obj = Plain()
        outcome = []

        def factory():
            return shadow.get_or_alloc(obj, "x", factory) + 1

        def run():
            try:
                shadow.get_or_alloc(obj, "x", factory)
                outcome.append("returned")
            except Exception as exc:
                outcome.append(type(exc).__name__)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(2)
        print("hung" if t.is_alive() else outcome[0])
        """
    )
    assert proc.stdout.split()[-1:] not in (["hung"], ["returned"], []), proc.stdout + proc.stderr
