"""Shadow variables: new per-object data for objects that already exist.

A fix often needs a field the live objects do not have — a lock per connection, a counter
per cart. Changing the class (``__slots__``, a dataclass field) is not possible live, and
``setattr`` fails on slotted objects and objects without ``__dict__``. The kernel's answer
is the *shadow variable*: data attached to an object from outside, keyed by
``(object, id)``::

    lock = livepatch.shadow.get_or_alloc(conn, "send-lock", threading.Lock)

Lifetime: an entry dies with its object when the object can be weakly referenced. An
object that cannot be (an ``int``, a ``tuple``, a slotted class without ``__weakref__``)
is kept alive by its shadow entries until :func:`free` or :func:`free_all` — otherwise its
``id()`` could be reused by a new object that would then see stale data. Free what you
allocate on such objects (a ``post_unpatch`` callback calling ``free_all`` is the pattern).

All functions are thread-safe. ``get_or_alloc`` runs the factory at most once per object
and id, outside the lock (the factory may itself use shadow variables); concurrent callers
wait for that one result.

Locking: one re-entrant lock guards the table. The lock-free path is the weak-reference
callback that runs when a shadowed object dies: it may run at any moment — inside the
cyclic garbage collector, or when another object is dropped while this thread already
holds the lock — so it only appends to ``_dead`` (an atomic ``deque.append``), and the next
call drains that queue under the lock. Until then a dead entry is invisible: every lookup
checks that its anchor still refers to the very object asked about. Objects released by
``free``/``free_all`` are dropped after the lock is released, so their finalizers may use
shadow variables too.
"""

from __future__ import annotations

import builtins
import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["alloc", "free", "free_all", "get", "get_or_alloc"]


@dataclass(eq=False)
class _Entry:
    value: Any = None
    #: set while a factory runs; waiters block on it
    pending: threading.Event | None = field(default_factory=lambda: None)
    #: the thread running the factory (a re-entrant request from it would wait forever)
    owner: int | None = None


@dataclass(eq=False)
class _Anchor:
    """Ties entries to one live object: a weak reference, or the object itself."""

    ref: Any  # weakref.ref, or the object (strong) when it cannot be weakly referenced
    weak: bool
    entries: dict[Hashable, _Entry] = field(default_factory=dict)

    def holds(self, obj: Any) -> bool:
        return (self.ref() if self.weak else self.ref) is obj


_lock = threading.RLock()
_anchors: dict[int, _Anchor] = {}  # id(obj) → anchor; guarded by _lock
_dead: deque[tuple[int, weakref.ref[Any]]] = deque()  # appended lock-free by _forget


def _drain() -> None:
    """Forget anchors of objects that died since the last call (caller holds _lock)."""
    while _dead:
        key, ref = _dead.popleft()
        anchor = _anchors.get(key)
        if anchor is not None and anchor.ref is ref:
            del _anchors[key]


def _anchor(obj: Any, create: bool) -> _Anchor | None:
    _drain()
    key = id(obj)
    anchor = _anchors.get(key)
    if anchor is not None and anchor.holds(obj):
        return anchor
    if not create:
        return None
    try:
        entries: dict[Hashable, _Entry] = {}
        ref: Any = weakref.ref(obj, _forgetter(key, entries))
        anchor = _Anchor(ref, weak=True, entries=entries)
    except TypeError:
        anchor = _Anchor(obj, weak=False)
    _anchors[key] = anchor
    return anchor


def _forgetter(
    key: int, entries: dict[Hashable, _Entry]
) -> Callable[[weakref.ref[Any]], None]:
    return lambda ref: _forget(key, ref, entries)


def _forget(key: int, ref: weakref.ref[Any], entries: dict[Hashable, _Entry]) -> None:
    # The lock-free path (see the module docstring): never take _lock here. The values go
    # at once (nobody can reach them: asking needs the dead object); the anchor is
    # unlinked at the next drain.
    entries.clear()
    _dead.append((key, ref))


def get(obj: Any, id: Hashable) -> Any:
    """The shadow value of `obj` for `id`, or None."""
    with _lock:
        anchor = _anchor(obj, create=False)
        entry = anchor.entries.get(id) if anchor else None
        if entry is None:
            return None
        pending = entry.pending
    if pending is not None:
        pending.wait()
    return entry.value


def alloc(obj: Any, id: Hashable, value: T) -> T:
    """Attach `value` to `obj` under `id`; ValueError if one is attached already."""
    with _lock:
        anchor = _anchor(obj, create=True)
        assert anchor is not None
        if id in anchor.entries:
            raise ValueError(
                f"shadow variable {id!r} already exists for this object; use get() or "
                "get_or_alloc()"
            )
        anchor.entries[id] = _Entry(value)
    return value


def get_or_alloc(obj: Any, id: Hashable, factory: Callable[[], T]) -> T:
    """The shadow value of `obj` for `id`, created by `factory()` (once) if missing."""
    while True:
        with _lock:
            anchor = _anchor(obj, create=True)
            assert anchor is not None
            entry = anchor.entries.get(id)
            if entry is None:
                entry = _Entry(pending=threading.Event(), owner=threading.get_ident())
                anchor.entries[id] = entry
                mine = True
            else:
                mine = False
                if entry.pending is not None and entry.owner == threading.get_ident():
                    raise RuntimeError(
                        f"shadow variable {id!r} requested again by its own factory; "
                        "the factory must not ask for the value it is creating"
                    )
            pending = entry.pending
        if not mine:
            if pending is not None:
                pending.wait()
                if entry.pending is not None or not _still(obj, id, entry):
                    continue  # the factory failed or the entry was freed: try again
            return entry.value  # type: ignore[no-any-return]
        try:
            value = factory()
        except BaseException:
            with _lock:
                if anchor.entries.get(id) is entry:
                    del anchor.entries[id]
                if not anchor.entries and _anchors.get(builtins.id(obj)) is anchor:
                    del _anchors[builtins.id(obj)]  # don't pin a non-weakrefable object
            assert pending is not None
            pending.set()
            raise
        entry.value = value
        entry.pending = None
        assert pending is not None
        pending.set()
        return value


def _still(obj: Any, id: Hashable, entry: _Entry) -> bool:
    with _lock:
        anchor = _anchor(obj, create=False)
        return anchor is not None and anchor.entries.get(id) is entry


def free(obj: Any, id: Hashable, destructor: Callable[[Any], Any] | None = None) -> None:
    """Detach `id` from `obj` (no error if absent); `destructor(value)` runs after."""
    with _lock:
        anchor = _anchor(obj, create=False)
        entry = anchor.entries.pop(id, None) if anchor else None
        if anchor is not None and not anchor.entries:
            del _anchors[builtins.id(obj)]  # `id` is the shadow id here
    # `anchor` and `entry` are dropped here, outside the lock
    if entry is not None and destructor is not None:
        destructor(entry.value)


def free_all(id: Hashable, destructor: Callable[[Any], Any] | None = None) -> int:
    """Detach `id` from every object; returns how many were freed."""
    freed: list[_Entry] = []
    released: list[_Anchor] = []  # dropped after the lock is released
    with _lock:
        _drain()
        for key, anchor in list(_anchors.items()):
            entry = anchor.entries.pop(id, None)
            if entry is not None:
                freed.append(entry)
            if not anchor.entries:
                released.append(_anchors.pop(key))
    del released
    if destructor is not None:
        # every detached value gets its destructor, even if one fails (the others would
        # be unreachable, and leak); the first failure is raised at the end
        failure: BaseException | None = None
        for entry in freed:
            try:
                destructor(entry.value)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
    return len(freed)


def count() -> int:
    """How many objects carry shadow variables (for status and tests)."""
    with _lock:
        _drain()
        return len(_anchors)

