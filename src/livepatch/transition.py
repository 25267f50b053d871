"""Transitions: moving every task from the old code to the new (the consistency model).

A transition takes a list of :class:`Change` (a function's slot, the version that runs now,
the version that will run) and gets every task — OS thread or asyncio Task — from ``old``
to ``new`` under a *model* (DESIGN.md section 4), keeping the guarantee that no Python
stack ever runs old and new versions of functions of the same patch at once. When it is
done it calls ``hooks.finalize`` (the engine pushes the versions on their stacks and
installs them: zero overhead from then on), then ``hooks.complete`` (post callbacks,
audit). If it cannot finish it calls ``hooks.unwind`` and every function is as it was.

Models:

* ``immediate`` (livepatch as merged in 4.0): finalize at once, no checks.
* ``stop`` (kpatch): park every other thread (:mod:`livepatch.stopworld`), look at every
  stack and every suspended generator/coroutine (and greenlet, :mod:`livepatch.greenlets`)
  for a frame of an old version; if there
  is none, install everything while the world is parked; if there is one, resume and retry
  with backoff until the timeout, then fail naming each blocking frame. Nothing dispatches.
* ``two_universe`` (kGraft): trampolines dispatch per task (:mod:`livepatch.dispatch`);
  every task existing at the start is in the old universe and moves to the new one at a
  safe point — :func:`safepoint`, a request boundary (``livepatch.integrations``), its own
  start (tasks and threads started during the transition are born new) — or when it ends.
  Event loops get kGraft's "fake signal": a callback that switches, between two callbacks,
  the loop thread and every Task suspended at an ``await`` outside the patch.
* ``hybrid`` (Linux 4.12+, the default): as ``two_universe``, but at the start every task
  whose stack holds no old frame is switched at once, a task behind switches itself at its
  next call into the patch made from a clean stack, and a worker thread re-checks the rest
  with backoff (the kernel's ``klp_try_complete_transition``).

Both dispatching models finalize when every task has switched and no generator,
coroutine or suspended greenlet of an old version is left holding a frame (Erlang's
"lingering process"). A process that forks mid-transition gives the child's copy a
worker of its own (:func:`_after_fork_in_child`).

**Why switching a task from the worker cannot race with that task.** The worker switches
a task only after seeing its stack hold no old frame; the task runs concurrently (the GIL
can hand over between any two of the worker's bytecodes), so what the worker saw may be
stale by the time it switches. It does not matter: a task whose stack is clean can only
acquire an old frame again by (a) calling a patched function — but a call from a clean
stack made while the task is behind goes through the slow path, and ``hybrid`` answers it
by switching the task itself, never by running old code — or (b) resuming a suspended
generator/coroutine of an old version — but every such object is registered while it
exists and keeps the whole process on the slow path, where the dispatch follows the
nearest patched frame on the stack. So the switch decision only has to be right about
*plain* frames, and those are read from ``sys._current_frames()``, which copies every
thread's stack in one C call under the GIL (for a running asyncio Task, its loop thread's
stack). The fast path itself reads only objects whose updates are single, GIL-atomic
dict/set operations. On 3.13 with the GIL (the default build) the same holds: the eval
breaker still only hands the GIL over at calls, backward jumps and function entries, never
between the decision and the frame push in the trampoline. The free-threaded build
(3.13t, no GIL) is not supported by the dispatching models: use ``stop`` there.

Timeouts reverse a stalled transition (kernel: ``klp_reverse_transition``, as kpatch does
on timeout) and raise :class:`TransitionTimeout` naming the blockers; ``force`` completes
at once and marks the patch forced; :func:`reverse` flips a transition in flight (the
engine calls it when a patch is reverted mid-transition). One transition at a time.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from types import CodeType, FrameType
from typing import Any, Protocol

from livepatch import dispatch, greenlets, heap, pace, stopworld, tasks
from livepatch.errors import PatchError, TransitionBusy, TransitionTimeout
from livepatch.redirect import Slot, Version

log = logging.getLogger("livepatch.transition")


class Model(str, Enum):
    IMMEDIATE = "immediate"
    STOP = "stop"
    TWO_UNIVERSE = "two_universe"
    HYBRID = "hybrid"

    @classmethod
    def parse(cls, value: str | Model) -> Model:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise PatchError(f"unknown model {value!r}: use one of {names}") from None


class Direction(str, Enum):
    PATCH = "patch"
    UNPATCH = "unpatch"


class State(str, Enum):
    RUNNING = "running"
    COMPLETE = "complete"
    REVERSED = "reversed"
    FAILED = "failed"


@dataclass(eq=False)
class Change:
    """One function moving from `old` to `new` in a transition."""

    slot: Slot
    old: Version
    new: Version
    #: code of the enclosing functions of a nested target, by the side (OLD, NEW) of the
    #: closures their frames create. They get no trampoline, yet a frame running one goes
    #: on making closures of its side, so it holds that side like a frame of the function.
    enclosing: tuple[tuple[CodeType, ...], tuple[CodeType, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.enclosing = self.slot.enclosing_sides(self.new.code)


class Hooks(Protocol):
    """What the engine does at the ends of a transition."""

    def finalize(self, transition: Transition) -> None:
        """Install the final versions. Fast, runs no user code (may run with the world stopped)."""

    def complete(self, transition: Transition) -> None:
        """After finalize, with every thread running: post callbacks, audit."""

    def unwind(self, transition: Transition, error: PatchError | None) -> None:
        """The transition was reversed or failed: restore everything as it was."""


@dataclass
class Blocker:
    """A task (or lingering generator) that holds a frame of a version being replaced."""

    task: str
    frames: list[str] = field(default_factory=list)
    #: the patched function where the task's own work starts, if the task is held there:
    #: it returns only when the task ends (see tasks.outermost)
    outermost: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "frames": list(self.frames)}
        if self.outermost:
            out["outermost"] = self.outermost
        return out

    def __str__(self) -> str:
        where = "; ".join(self.frames) if self.frames else "no frame seen"
        return f"{self.task} at {where}"


def _engine_lock() -> Any:
    """The engine's lock (``core.LOCK``), taken before the world is parked."""
    try:
        from livepatch import core
    except ImportError:  # pragma: no cover - the engine is always there in a release
        return _fallback_lock
    return core.LOCK


_fallback_lock = threading.RLock()


class Transition:
    """A transition in flight or finished; returned by ``apply`` and ``revert``."""

    def __init__(
        self,
        *,
        patch: str,
        model: Model,
        direction: Direction,
        changes: list[Change],
        hooks: Hooks,
        timeout: float,
        force: bool,
    ) -> None:
        self.patch = patch
        self.model = model
        self.direction = direction
        self.changes = changes
        self.hooks = hooks
        self.timeout = timeout
        self.force = force
        self.forced = False
        #: when forced: the tasks (and suspended generators) that held old code then, and
        #: so may run old and new versions together
        self.forced_past: list[Blocker] = []
        #: True once the transition has been turned around (timeout or revert)
        self.reversed = False
        self.state = State.RUNNING
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._t1: float | None = None
        #: when the worker gives up (reset when the transition is turned around)
        self._deadline = self._t0 + timeout
        #: (blockers, tasks in all, tasks switched), replaced as one: another thread
        #: (``livepatch status``) reads them while the worker moves on
        self._progress: tuple[list[Blocker], int, int] = ([], 0, 0)
        self.error: PatchError | None = None
        #: longest time the world was stopped (stop model), seconds
        self.paused: float = 0.0
        #: how many times the stop model parked the world
        self.attempts = 0
        self._done = threading.Event()
        self._wake = threading.Event()
        self._requests: set[str] = set()  # "reverse", "force": handled by the worker
        self._universe: dispatch.Universe | None = None
        #: the last walk for greenlets that hold finalization, when it found some:
        #: (the goal then, when to walk again, what it found); see _greenlets_behind
        self._greenlets: tuple[int, float, list[Blocker]] | None = None
        self._worker: threading.Thread | None = None

    @property
    def blockers(self) -> list[Blocker]:
        """The tasks (and lingering generators) the transition waits for, with where."""
        return self._progress[0]

    @property
    def tasks_total(self) -> int:
        return self._progress[1]

    @property
    def tasks_switched(self) -> int:
        return self._progress[2]

    def _report(self, blockers: list[Blocker], total: int, switched: int) -> None:
        self._progress = (blockers, total, switched)

    @property
    def elapsed(self) -> float:
        """Seconds from the start (before the first trampoline is stored, or the world is
        first stopped) to the end, or until now. Planning and building the trampolines
        come before the start."""
        end = self._t1 if self._t1 is not None else time.monotonic()
        return end - self._t0

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def leaves_patched(self) -> bool:
        """Whether the patch is in place when this transition ends, as it stands now: an
        apply going forward, or a revert that was turned around."""
        return (self.direction is Direction.PATCH) != self.reversed

    def wait(self, timeout: float | None = None) -> Transition:
        """Block until the transition ends; raise its error if it failed or timed out.

        One turned around by a revert ends :attr:`State.REVERSED` with no error: an apply
        that a revert undid returns normally, so look at `state` or `leaves_patched`.
        """
        if not self._done.wait(timeout):
            raise TransitionTimeout(
                f"transition of {self.patch} still running after {timeout:.1f}s; "
                "call wait() again or revert it",
                [b.to_dict() for b in self.blockers],
            )
        if self.error is not None:
            raise self.error
        return self

    def reverse(self) -> Transition:
        """Turn this transition around (see :func:`reverse`)."""
        return reverse(self)

    def force_complete(self) -> Transition:
        """Complete now, whatever the tasks hold; the patch is marked forced."""
        if self.done:
            return self
        self._requests.add("force")
        self._wake.set()
        return self

    def _finish(self, state: State, error: PatchError | None = None) -> None:
        self.state = state
        self.error = error
        self._t1 = time.monotonic()
        self._done.set()

    def to_dict(self) -> dict[str, Any]:
        blockers, total, switched = self._progress
        return {
            "patch": self.patch,
            "model": self.model.value,
            "direction": self.direction.value,
            "state": self.state.value,
            "elapsed": round(self.elapsed, 6),
            "tasks_total": total,
            "tasks_switched": switched,
            "blockers": [b.to_dict() for b in blockers],
            "forced": self.forced,
            "forced_past": [b.to_dict() for b in self.forced_past],
            "reversed": self.reversed,
            "paused": self.paused,
            "functions": [c.slot.key for c in self.changes],
            "error": str(self.error) if self.error else None,
        }

    def __repr__(self) -> str:
        return (
            f"<Transition {self.direction.value} {self.patch} model={self.model.value} "
            f"state={self.state.value} {self.tasks_switched}/{self.tasks_total}>"
        )


#: The one transition in flight (kernel: klp_transition_patch). Set and cleared under
#: ``_current_lock``; read lock-free by :func:`transition` (a plain attribute load).
_current: Transition | None = None
_current_lock = threading.Lock()


def transition() -> Transition | None:
    """The transition in flight, if any."""
    return _current


def current_reverse(name: str) -> Transition | None:
    """Reverse the transition of patch `name` if one is in flight; else None."""
    t = _current
    if t is None or t.done or t.patch != name:
        return None
    return reverse(t)


def safepoint() -> None:
    """Declare that the calling task holds no patched frame right now.

    Under ``two_universe`` and ``hybrid`` a task behind the goal switches here (if its
    stack really holds no frame of a version being replaced; otherwise this is a no-op).
    Cheap when no transition is in flight: one attribute load.
    """
    t = _current
    if t is None:
        return
    universe = t._universe
    if universe is not None and universe.installed:
        if universe.safepoint(sys._getframe().f_back):  # None when C called us first
            t._wake.set()


def reverse(t: Transition) -> Transition:
    """Flip the transition in flight: every task goes back to the version it came from.

    Returns `t`, which ends as :attr:`State.REVERSED` once every task is back (its error
    stays None for a revert asked by the user). A transition that already finished is
    returned as it is.
    """
    if t.done:
        return t
    if t._universe is not None:
        # dispatching models: turn the universes around right here (the caller may
        # hold core.LOCK; the worker does not need it to keep going)
        with t._universe.lock:
            if not t._universe.installed:
                raise TransitionBusy(
                    f"transition of {t.patch} is completing right now; revert it again"
                )
            if not t.reversed and not t.done:
                _turn_around(t, None, sys._getframe(1))
        t._wake.set()
        return t
    t._requests.add("reverse")
    t._wake.set()
    return t


def begin(
    changes: list[Change],
    *,
    patch: str,
    model: Model,
    direction: Direction,
    hooks: Hooks,
    timeout: float,
    force: bool,
) -> Transition:
    """Start a transition; raise TransitionBusy if another one is in flight."""
    global _current
    model = Model.parse(model)
    universe = None
    if not force and model in (Model.TWO_UNIVERSE, Model.HYBRID):
        if not _gil_enabled():
            raise PatchError(
                f"{patch}: model {model.value!r} needs the GIL and this interpreter runs "
                "without it (free-threaded build); use model='stop'"
            )
        # building the trampolines is preparation, like planning: nothing changes for
        # any task yet, so it happens before the transition starts (and is not timed)
        universe = dispatch.Universe(changes, hybrid=model is Model.HYBRID)
        universe.prepare()
    t = Transition(
        patch=patch,
        model=model,
        direction=direction,
        changes=changes,
        hooks=hooks,
        timeout=timeout,
        force=force,
    )
    with _current_lock:
        if _current is not None and not _current.done:
            raise TransitionBusy(
                f"transition of {_current.patch} is in flight; wait for it or revert it first"
            )
        _current = t
    try:
        if force or model is Model.IMMEDIATE:
            _run_immediate(t)
        elif model is Model.STOP:
            _start_worker(t, _run_stop)
        else:
            assert universe is not None
            _start_dispatch(t, universe, sys._getframe(1))
    except BaseException:
        _clear(t)
        raise
    return t


def _gil_enabled() -> bool:
    check = getattr(sys, "_is_gil_enabled", None)  # 3.13+
    return True if check is None else bool(check())


def _clear(t: Transition) -> None:
    global _current
    with _current_lock:
        if _current is t:
            _current = None


def _label(t: Transition) -> str:
    return f"livepatch: {t.patch}: {t.direction.value}"


def _complete(t: Transition) -> None:
    """After finalize: clear the slot, run post callbacks, then report done."""
    t._report([], t.tasks_total, t.tasks_switched)
    _clear(t)
    log.info("%s transition completed (%s, %.1f ms)", _label(t), t.model.value,
             t.elapsed * 1e3)
    try:
        t.hooks.complete(t)
    finally:
        t._finish(State.COMPLETE)


def _fail(t: Transition, error: PatchError | None, state: State = State.FAILED) -> None:
    _clear(t)
    t._finish(state, error)


def _run_immediate(t: Transition) -> None:
    if t.force and t.model is not Model.IMMEDIATE:
        t.forced = True
        # no check to wait for, but the engineer who forced it should know who may now
        # mix versions: one look at every stack (and suspended generator)
        olds = [code for c in t.changes for code in (c.old.code, *c.enclosing[0])]
        t.forced_past = _holders(olds, threading.get_ident())
        log.warning("%s transition forced (%s): no consistency check%s", _label(t),
                    t.model.value, _forced_past(t))
    try:
        t.hooks.finalize(t)
    except PatchError as exc:
        t.hooks.unwind(t, exc)
        _fail(t, exc)
        return
    everyone = len(tasks.all_tasks())  # all moved at once (a forced one once said 0/0)
    t._report([], everyone, everyone)
    _complete(t)


def _forced_past(t: Transition) -> str:
    """The tail of a forced transition's log line: what ran old code when it was forced."""
    if not t.forced_past:
        return "; no task ran the old code"
    shown = "; ".join(f"{b.task} at {', '.join(b.frames[:2])}" for b in t.forced_past[:3])
    more = f" and {len(t.forced_past) - 3} more" if len(t.forced_past) > 3 else ""
    return f"; forced past {len(t.forced_past)} task(s) in old code: {shown}{more}"


def _start_worker(t: Transition, target: Any) -> None:
    worker = threading.Thread(
        target=_guarded, args=(t, target), name=f"livepatch-transition-{t.patch}", daemon=True
    )
    t._worker = worker
    worker.start()


def _after_fork_in_child() -> None:
    """A child has only the thread that forked (a gunicorn master starting a worker). A
    transition in flight at the fork would stay in flight there for good: its worker
    thread is not in the child. Give it a new one, with new locks and events in place of
    any a vanished thread held; the tasks it waited for are gone too, and the worker
    counts them as ended."""
    global _current_lock
    _current_lock = threading.Lock()
    # first, before any new thread can take it: the engine's lock, held by a thread that
    # is not in the child (the forking thread's own hold, from a callback, stays)
    engine = _engine_lock()
    owned = getattr(engine, "_is_owned", None)
    reinit = getattr(engine, "_at_fork_reinit", None)
    if callable(owned) and callable(reinit) and not owned():
        reinit()
    t = _current
    if t is None or t.done or t.model is Model.IMMEDIATE or t._worker is None:
        return
    if t._worker is threading.current_thread():  # the worker forked (a callback): it goes on
        return
    t._done, t._wake = threading.Event(), threading.Event()
    u = t._universe
    if u is not None:
        u.lock = threading.RLock()
    _start_worker(t, _run_stop if t.model is Model.STOP else _run_dispatch)
    t._wake.set()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _guarded(t: Transition, target: Any) -> None:
    try:
        target(t)
    except BaseException as exc:  # never leave a transition hanging
        log.exception("%s transition worker crashed", _label(t))
        if not t.done:
            error = exc if isinstance(exc, PatchError) else PatchError(
                f"{t.patch}: transition failed: {type(exc).__name__}: {exc}"
            )
            _fail(t, error)


# -- stop (kpatch) ----------------------------------------------------------------------


def _report_stop(t: Transition, blockers: list[Blocker]) -> None:
    """Progress as the other models count it (threads and asyncio Tasks, not livepatch's
    own): those not held count as switched. Lingering generators are no task, and the
    threads parked in the pause included the worker, so stop once showed 4 tasks in a
    server with 11, and -4/4 switched when coroutines held it."""
    total = len(tasks.all_tasks())
    held = {b.task for b in blockers if b.task.startswith(("thread ", "task "))}
    t._report(blockers, total, max(0, total - len(held)))


def _stop_check(t: Transition, me: int) -> list[Blocker]:
    """With the world parked: which task holds a frame of an old version?"""
    olds = [c.old.code for c in t.changes]
    olds += [code for c in t.changes for code in c.enclosing[dispatch.OLD]]
    return _holders(olds, me)


def _holders(
    codes: list[CodeType], me: int | None, *, gens: bool = True, with_greenlets: bool = True
) -> list[Blocker]:
    """Every thread (but `me`) whose stack runs one of `codes`, and with `gens`, every
    suspended generator/coroutine, and greenlet unless told not to, that does."""
    blockers = _thread_holders(codes, me)
    if gens:
        blockers += _generator_holders(codes)
        if with_greenlets:
            blockers += _greenlet_holders(codes)
    return blockers


def _thread_holders(codes: list[CodeType], me: int | None) -> list[Blocker]:
    wanted = {id(code) for code in codes}
    names = tasks.thread_names()
    blockers = []
    for ident, top in sys._current_frames().items():
        if ident == me:
            continue
        stack = list(tasks.walk(top))
        held = [f for f in stack if id(f.f_code) in wanted]
        if held:
            root = held[-1].f_code.co_qualname if tasks.outermost(stack, held[-1], True) else None
            blockers.append(Blocker(f"thread {names.get(ident, '?')} ({ident})",
                                    [tasks.describe(f) for f in held], root))
    return blockers


def _generator_holders(codes: list[CodeType]) -> list[Blocker]:
    """Suspended generators/coroutines running one of `codes` (a heap scan, so only for
    codes of those kinds), named by the asyncio Task that drives each, if any."""
    gen_codes = [code for code in codes if code.co_flags & dispatch._KIND_FLAGS]
    if not gen_codes:
        return []
    found = tasks.suspended_with(gen_codes)
    owners = tasks.owner_of(found, tasks.all_tasks()) if found else {}
    blockers = []
    for obj in found:
        owner = owners.get(id(obj))
        who = owner.name if owner else "no task (lingering)"
        blockers.append(Blocker(who, [tasks.describe_gen(obj)]))
    return blockers


def _greenlet_holders(codes: list[CodeType]) -> list[Blocker]:
    """Suspended greenlets whose stack runs one of `codes` (see :mod:`livepatch.greenlets`)."""
    return [Blocker(who, [tasks.describe(f) for f in frames])
            for who, frames in greenlets.holding(codes)]


def _run_stop(t: Transition) -> None:
    delay = 0.001
    me = threading.get_ident()
    lock = _engine_lock()
    log.info("%s transition started (stop, %s)", _label(t), stopworld.mechanism())
    while True:
        if "reverse" in t._requests:
            t.reversed = True
            t.hooks.unwind(t, None)
            log.info("%s transition reversed (stop: nothing was installed)", _label(t))
            _fail(t, None, State.REVERSED)
            return
        forced = "force" in t._requests
        finalized = False
        error: PatchError | None = None
        blockers: list[Blocker] = []
        with lock:  # before parking: a parked thread must not be holding it
            t.attempts += 1
            with heap.logs_held(), stopworld.parked(
                avoid=[c.old.code for c in t.changes]
            ) as pause, pace.held():
                blockers = [] if forced else _stop_check(t, me)
                if not blockers:
                    try:
                        t.hooks.finalize(t)
                        finalized = True
                    except PatchError as exc:
                        error = exc
            t.paused = max(t.paused, pause.duration)
        # logging only now: a parked thread may have held a handler's lock
        log.info(
            "%s world stopped for %.3f ms (attempt %d, %d/%d threads parked, %s)",
            _label(t), pause.duration * 1e3, t.attempts, pause.parked, pause.others,
            "clean" if not blockers else f"{len(blockers)} blocker(s)",
        )
        if error is not None:
            t.hooks.unwind(t, error)
            _fail(t, error)
            return
        if finalized:
            t.forced = forced
            if forced:  # what the last check found: who may mix versions now
                t.forced_past = list(t.blockers)
                log.warning("%s transition forced (stop)%s", _label(t), _forced_past(t))
            _report_stop(t, [])
            _complete(t)
            return
        _report_stop(t, blockers)
        if time.monotonic() + delay > t._deadline:
            error = _timed_out(t, "activeness safety check failed")
            log.warning("%s", error)
            t.reversed = True
            t.hooks.unwind(t, error)
            _fail(t, error, State.REVERSED)
            return
        t._wake.wait(delay)
        t._wake.clear()
        delay = min(delay * 2, 0.1)


def _timed_out(t: Transition, what: str) -> TransitionTimeout:
    return TransitionTimeout(_timeout_message(t, what), [b.to_dict() for b in t.blockers])


def _timeout_message(t: Transition, what: str) -> str:
    shown = "; ".join(str(b) for b in t.blockers[:5])
    more = f" (+{len(t.blockers) - 5} more)" if len(t.blockers) > 5 else ""
    if t.model is Model.STOP:
        advice = "retry when they are idle, use model='hybrid', or force=True"
    elif t.model is Model.TWO_UNIVERSE:
        advice = ("give those tasks a safe point (livepatch.safepoint() or the WSGI/ASGI "
                  "middleware), use model='hybrid', or force=True")
    else:
        advice = ("let the named generators/coroutines finish or give the tasks a safe "
                  "point, retry with a longer timeout, or force=True")
    frames = [f for b in t.blockers for f in b.frames]
    enclosing = sorted({
        code.co_qualname for c in t.changes for side in c.enclosing for code in side
        if any(f.endswith(f" in {code.co_qualname}") for f in frames)
    })
    if enclosing:  # no safe point helps there: only the frame's return does
        advice = (f"let {', '.join(enclosing)} return first (a running enclosing function "
                  f"makes closures of the code it started with); or {advice}")
    roots = sorted({b.outermost for b in t.blockers if b.outermost})
    if roots:  # nor here: neither waiting nor a safe point helps
        names = ", ".join(roots)
        held = (f"{names} {'is' if len(roots) == 1 else 'are'} where a task's work starts "
                "(its loop) and returns only when the task ends: patch the functions it "
                f"calls instead, or force=True (the task then runs the old {names} until it "
                "returns)")
        others = any(not b.outermost for b in t.blockers)
        advice = f"{held}; for the others: {advice}" if others else held
    return (
        f"{t.patch}: {what} after {t.timeout:g}s, {len(t.blockers)} blocker(s): "
        f"{shown}{more}; nothing changed — {advice}"
    )


# -- two_universe and hybrid (kGraft, Linux 4.12+) ------------------------------------


def _start_dispatch(t: Transition, universe: dispatch.Universe, caller: FrameType | None) -> None:
    t._universe = universe
    universe.install(caller)
    if t.model is Model.HYBRID:
        universe.check_all(switch=True)
    universe.scan()
    _update(t)
    log.info("%s transition started (%s): switched %d/%d tasks", _label(t), t.model.value,
             t.tasks_switched, t.tasks_total)
    if universe.done() and _end_dispatch(t):
        return
    _start_worker(t, _run_dispatch)


def _update(t: Transition) -> None:
    u = t._universe
    assert u is not None
    pending = u.behind()
    blockers = [Blocker(r.info.name, list(r.blocking), r.outermost) for r in pending]
    lingering = u.lingering()
    if lingering:
        owners = tasks.owner_of(lingering, [r.info for r in list(u.records.values())])
        behind = {id(r.info.key) for r in u.behind()}
        for obj in lingering:
            owner = owners.get(id(obj))
            if owner is None:
                blockers.append(Blocker("no task (lingering)", [tasks.describe_gen(obj)]))
            elif id(owner.key) not in behind:  # switched, but still drives an old one
                blockers.append(Blocker(owner.name, [tasks.describe_gen(obj)]))
    named = {r.info.name for r in pending}
    # the heap walk for suspended ones only once no task is behind: until then the
    # transition cannot end anyway, and behind tasks' own frames are checked already
    blockers += [b for b in _enclosing_holders(t, gens=not pending) if b.task not in named]
    if not pending and t._greenlets is not None:  # what the last finalization check found
        blockers += t._greenlets[2]
    t._report(blockers, u.total, u.switched())


def _enclosing_holders(t: Transition, *, gens: bool) -> list[Blocker]:
    """Frames of any task running enclosing code of the side being left. Enclosing
    functions have no trampoline: a task at the goal may have called one since it
    switched, and that frame makes closures of the other side for as long as it runs."""
    u = t._universe
    assert u is not None
    codes = [code for c in t.changes for code in c.enclosing[1 - u.goal]]
    return _holders(codes, None, gens=gens, with_greenlets=False) if codes else []


def _greenlets_behind(t: Transition) -> list[Blocker]:
    """Suspended greenlets in code of the side being left: enclosing code or a version.
    Once the new code is installed directly no trampoline decides for them, so they hold
    finalization (see :mod:`livepatch.greenlets`).

    A heap walk where greenlets were started (about 90 ms per million objects), so while
    some greenlet holds the transition it is walked again only after ten times as long as
    the last walk took. Only a walk that finds some is reused: finalization always
    follows a fresh one that found none.
    """
    u = t._universe
    assert u is not None
    if not greenlets.loaded():  # the usual case: not even a list of codes to build
        return []
    cached = t._greenlets
    now = time.monotonic()
    if cached is not None and cached[0] == u.goal and now < cached[1]:
        return cached[2]
    side = 1 - u.goal
    codes = [code for c in t.changes for code in c.enclosing[side]]
    codes += [(c.old if side == dispatch.OLD else c.new).code for c in t.changes]
    found = _greenlet_holders(codes)
    spent = time.monotonic() - now
    t._greenlets = (u.goal, time.monotonic() + 10 * spent, found) if found else None
    return found


def _run_dispatch(t: Transition) -> None:
    u = t._universe
    assert u is not None
    delay = 0.001
    last = -1
    while True:
        if "force" in t._requests:
            t.forced = True
            t.forced_past = list(t.blockers)
            log.warning("%s transition forced (%s): %d task(s) had not switched%s",
                        _label(t), t.model.value, len(u.behind()), _forced_past(t))
            _end_dispatch(t, forced=True)
            return
        u.check_all(switch=u.hybrid)
        if not u.hybrid:
            u.signal_loops()
        u.scan()
        _update(t)
        if t.tasks_switched != last:
            last = t.tasks_switched
            log.info("%s switched %d/%d tasks", _label(t), t.tasks_switched, t.tasks_total)
        if u.done() and _end_dispatch(t):
            return
        if time.monotonic() > t._deadline:
            if not t.reversed:
                error = _timed_out(t, "transition timed out")
                log.warning("%s", error)
                with u.lock:
                    _turn_around(t, error, None)
                delay = 0.001
                continue
            # the way back stalls too: put the old code back regardless
            log.warning("%s reversal stalled too; forcing the old code back", _label(t))
            t.forced = True
            _end_dispatch(t, forced=True)
            return
        t._wake.wait(delay)
        t._wake.clear()
        delay = min(delay * 2, 0.05)


def _turn_around(t: Transition, error: PatchError | None, caller: FrameType | None) -> None:
    u = t._universe
    assert u is not None
    t.reversed = True
    t.error = error
    t._deadline = time.monotonic() + t.timeout  # the way back gets its own timeout
    u.reverse(caller)
    if u.hybrid:
        u.check_all(switch=True)
    log.info("%s reversing transition (%s)", _label(t),
             "timeout" if error is not None else "revert requested")


def _end_dispatch(t: Transition, *, forced: bool = False) -> bool:
    """Every task is at the goal: install it directly and end the dispatch.

    Re-checks under both locks (a revert may have turned the transition around since the
    worker looked); returns False if it is not done after all.
    """
    u = t._universe
    assert u is not None
    with heap.logs_held(), _engine_lock(), u.lock, pace.paced(when=len(u.entries) >= pace.BULK):
        if not forced and (not u.done() or _enclosing_holders(t, gens=True)
                           or _greenlets_behind(t)):
            return False
        # before finalize, though finalize stores the same code again: remove also puts
        # back the defaults a generic trampoline replaced, which finalize leaves as they
        # are for a nested function (its versions KEEP each instance's defaults)
        u.remove(u.goal)
        if u.goal == dispatch.NEW:
            try:
                t.hooks.finalize(t)
            except PatchError as exc:
                t.hooks.unwind(t, exc)
                _fail(t, exc)
                return True
    if u.goal == dispatch.NEW:
        _complete(t)
        return True
    error = t.error
    t.hooks.unwind(t, error)
    if error is None:
        t._report([], t.tasks_total, t.tasks_switched)
    log.info("%s transition reversed", _label(t))
    _clear(t)
    t._finish(State.REVERSED, error)
    return True
