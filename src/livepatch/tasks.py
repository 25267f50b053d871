"""Tasks: who runs Python in this process, and what is on their stacks.

The kernel's unit of patch state is the task. Ours is either an OS thread running Python
or an asyncio ``Task``: many asyncio tasks share one loop thread, yet each one is a
separate logical stack (its coroutine chain) that must switch from old to new code on its
own. This module answers three questions for the consistency models:

* *who am I?* — :func:`current_key`: the asyncio Task running on this thread, else the
  thread ident. Two C calls and a dict lookup, so the dispatch path can afford it.
* *who is there?* — :func:`all_tasks`: every live thread (``sys._current_frames``) and every
  pending asyncio Task, with the thread that hosts it (a Task's loop thread).
* *what does each hold?* — :func:`thread_frames`, :func:`task_frames`,
  :func:`suspended_with` (generators and coroutines whose frame runs given code, found
  through the garbage collector: a suspended frame lives inside its generator object).

Frames are described as ``file:line in function`` (:func:`describe`) for reports.
"""

from __future__ import annotations

import asyncio
import runpy
import sys
import threading
import types
from asyncio import tasks as _atasks
from collections.abc import Callable, Iterable, Iterator
from types import CodeType, FrameType
from typing import Any

from livepatch import heap

# asyncio keeps "the task running on each loop" in a dict (C-accelerated on all of
# 3.11 to 3.13); reading it is how we tell tasks on one loop thread apart without a call.
_current_tasks: dict[Any, Any] = getattr(_atasks, "_current_tasks", {})
_get_running_loop = asyncio._get_running_loop
get_ident = threading.get_ident

#: Key of a task: an ``asyncio.Task`` object or a thread ident (int).
TaskKey = Any


def current_key() -> TaskKey:
    """The calling task: the running asyncio Task, else the thread ident."""
    loop = _get_running_loop()
    if loop is not None:
        task = _current_tasks.get(loop)
        if task is not None:
            return task
    return get_ident()


class TaskInfo:
    """One task as seen from outside: its key, its hosting thread, a readable name.

    A plain class with slots: a transition makes one per task, a thousand at a time, while
    the program waits for the GIL. A Task's name is made only when asked for (a report of
    what blocks a transition); checking tasks never needs it.
    """

    __slots__ = ("_name", "is_thread", "key", "thread")

    def __init__(self, key: TaskKey, thread: int | None, name: str | None = None) -> None:
        self.key = key
        #: ident of the thread that runs it (a Task: its loop's thread; None if that loop
        #: is not running right now)
        self.thread = thread
        #: an OS thread (its key is the ident), not an asyncio Task; an attribute, not a
        #: property: checking a thousand tasks reads it several times each
        self.is_thread = isinstance(key, int)
        self._name = name

    @property
    def name(self) -> str:
        if self._name is None:
            self._name = f"task {self.key.get_name()}"  # type: ignore[union-attr]
        return self._name

    def __repr__(self) -> str:
        return f"<TaskInfo {self.name}>"


def _asyncio_tasks() -> list[asyncio.Task[Any]]:
    # 3.11 registers every Task in ``_all_tasks``; 3.12+ split them into
    # ``_scheduled_tasks`` (a WeakSet) and ``_eager_tasks`` (a set). Copy with list():
    # another thread may add tasks while we iterate.
    found: list[asyncio.Task[Any]] = []
    for name in ("_all_tasks", "_scheduled_tasks", "_eager_tasks"):
        bucket = getattr(_atasks, name, None)
        if bucket is None:
            continue
        for _ in range(3):
            try:
                found.extend(list(bucket))
                break
            except RuntimeError:  # "set changed size during iteration": try again
                continue
    return [t for t in found if not t.done()]


def loop_thread(loop: Any) -> int | None:
    """The ident of the thread running `loop`, None if it is not running."""
    ident = getattr(loop, "_thread_id", None)  # BaseEventLoop sets it while running
    return ident if isinstance(ident, int) else None


def loop_threads() -> Callable[[Any], int | None]:
    """:func:`loop_thread` that looks each loop up once: a few loops host many tasks."""
    seen: dict[int, int | None] = {}

    def thread_of(loop: Any) -> int | None:
        ident = seen.get(id(loop), -1)
        if ident == -1:
            ident = seen[id(loop)] = loop_thread(loop)
        return ident

    return thread_of


def thread_names() -> dict[int, str]:
    """ident → name of every thread threading knows. Lock-free: the stop model asks with
    every other thread parked, and one may be parked holding the lock that
    ``threading.enumerate`` takes (inside ``enumerate``, ``active_count`` or
    ``Thread.start``), which would keep the world stopped for good."""
    active = getattr(threading, "_active", None)
    if not isinstance(active, dict):  # pragma: no cover - CPython 3.11 to 3.13 have it
        return {t.ident: t.name for t in threading.enumerate() if t.ident is not None}
    return {ident: thread.name for ident, thread in list(active.items())}


#: livepatch's own threads (agent, transition workers) are named so; they run no patched
#: code, like the kernel's own threads, and are not tasks to switch
OWN_THREAD_PREFIX = "livepatch-"


def all_tasks() -> list[TaskInfo]:
    """Every live thread (but livepatch's own) and every pending asyncio Task."""
    names = thread_names()
    out = [
        TaskInfo(ident, ident, f"thread {names.get(ident, '?')} ({ident})")
        for ident in sys._current_frames()
        if not names.get(ident, "").startswith(OWN_THREAD_PREFIX)
    ]
    thread_of = loop_threads()
    out += [TaskInfo(task, thread_of(task.get_loop())) for task in _asyncio_tasks()]
    return out


def is_alive(info: TaskInfo, threads: Iterable[int]) -> bool:
    if info.is_thread:
        return info.key in threads
    return not info.key.done()


def walk(frame: FrameType | None) -> Iterator[FrameType]:
    """`frame` and every frame below it (callers), innermost first."""
    while frame is not None:
        yield frame
        frame = frame.f_back


def thread_frames(ident: int, snapshot: dict[int, FrameType]) -> list[FrameType]:
    return list(walk(snapshot.get(ident)))


def chain(obj: Any) -> Iterator[Any]:
    """A coroutine/generator and everything it awaits or delegates to, outermost first."""
    seen = 0
    while obj is not None and seen < 10_000:
        yield obj
        seen += 1
        obj = _next_in_chain(obj)


def _next_in_chain(obj: Any) -> Any:
    nxt = getattr(obj, "cr_await", None)
    if nxt is None:
        nxt = getattr(obj, "gi_yieldfrom", None)
    if nxt is None:
        nxt = getattr(obj, "ag_await", None)
    return nxt


def frame_of(obj: Any) -> FrameType | None:
    for attr in ("cr_frame", "gi_frame", "ag_frame"):
        frame = getattr(obj, attr, None)
        if frame is not None:
            return frame  # type: ignore[no-any-return]
    return None


_FUTURES = (asyncio.Future, getattr(asyncio.futures, "_PyFuture", asyncio.Future))
#: type → whether it ends a chain: futures and the C future's ``__await__`` iterator,
#: what a suspended Task's chain mostly ends in, hold no frame and await nothing (a Task
#: awaited is a task of its own, checked on its own). Filled as types are met.
_ENDS: dict[type, bool] = {}


def _ends_chain(kind: type) -> bool:
    ends = _ENDS.get(kind)
    if ends is None:
        ends = _ENDS[kind] = issubclass(kind, _FUTURES) or (
            kind.__module__ == "_asyncio" and kind.__qualname__ == "FutureIter")
    return ends


def task_frames(
    info: TaskInfo, snapshot: dict[int, FrameType]
) -> list[FrameType]:
    """Every frame an asyncio Task holds: its coroutine chain, and when it is the task
    running on its loop thread right now, that thread's whole stack too."""
    task = info.key
    frames = []
    obj = task.get_coro()
    for _ in range(10_000):  # the same walk as chain() and frame_of(), unrolled for speed
        kind = type(obj)
        if kind is types.CoroutineType:
            frame, obj = obj.cr_frame, obj.cr_await
        elif kind is types.GeneratorType:
            frame, obj = obj.gi_frame, obj.gi_yieldfrom
        elif obj is None or _ends_chain(kind):
            break
        else:  # async generators, other awaitables
            frame, obj = frame_of(obj), _next_in_chain(obj)
        if frame is not None:
            frames.append(frame)
    loop = task.get_loop()
    if _current_tasks.get(loop) is task and info.thread is not None:
        frames.extend(walk(snapshot.get(info.thread)))
    return frames


def frames_of(info: TaskInfo, snapshot: dict[int, FrameType]) -> list[FrameType]:
    if info.is_thread:
        return thread_frames(info.key, snapshot)
    return task_frames(info, snapshot)


_GEN_TYPES = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)


def suspended_with(codes: Iterable[CodeType]) -> list[Any]:
    """Generators, coroutines and async generators whose frame runs one of `codes`.

    A suspended (or not yet started) generator keeps its frame inside the generator
    object, and the garbage collector sees it refer to its code: ``gc.get_referrers`` on
    the code objects finds them all, wherever they are stored (frozen ones too: see
    :mod:`livepatch.heap`). Cost: one pass over the
    objects the collector tracks, so callers only ask for codes of generator kinds.
    """
    wanted = set(codes)
    if not wanted:
        return []
    found = []
    for obj in heap.referrers(list(wanted), "generators and coroutines of the old code"):
        if isinstance(obj, _GEN_TYPES):
            frame = frame_of(obj)
            if frame is not None and frame.f_code in wanted:
                found.append(obj)
    return found


#: files whose frames start a thread or a program rather than do its work
_STARTERS = frozenset(f for f in (threading.__file__, getattr(runpy, "__file__", None)) if f)


def outermost(frames: list[FrameType], frame: FrameType, thread: bool) -> bool:
    """Whether `frame` is where its task's own work starts, so that it returns only when
    the task ends: a thread's target (nothing but threading's bootstrap, a module's
    top level or runpy outside it), or an asyncio Task's coroutine. `frames` as
    :func:`frames_of` gives them (a thread's innermost first, a Task's chain first)."""
    if not thread:
        return bool(frames) and frames[0] is frame
    try:
        outside = frames[frames.index(frame) + 1:]
    except ValueError:
        return False
    return all(f.f_code.co_filename in _STARTERS or f.f_code.co_name == "<module>"
               for f in outside)


def describe(frame: FrameType) -> str:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    return f"{code.co_filename}:{frame.f_lineno} in {name}"


def describe_gen(obj: Any) -> str:
    frame = frame_of(obj)
    kind = type(obj).__name__
    where = describe(frame) if frame is not None else "finished"
    return f"{kind} {getattr(obj, '__qualname__', '?')} suspended at {where}"


def owner_of(gens: list[Any], tasks: list[TaskInfo]) -> dict[int, TaskInfo]:
    """Which asyncio Task drives each of `gens` (by id), when one does."""
    wanted = {id(g) for g in gens}
    owners: dict[int, TaskInfo] = {}
    for info in tasks:
        if info.is_thread:
            continue
        for obj in chain(info.key.get_coro()):
            if id(obj) in wanted:
                owners[id(obj)] = info
    return owners
