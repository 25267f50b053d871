"""Stopping the world: park every other thread so stacks can be checked and code swapped.

``sys.setswitchinterval`` does not do it (threads already waiting for the GIL keep their
timeout and still force a hand-off; a huge interval starves the patching thread). What
does: make every other thread call back into us at its next *event* and block there.

* Python 3.12+: ``sys.monitoring`` with a free tool id and the events ``CALL``, ``JUMP``
  (loops), ``PY_START`` and ``PY_RESUME`` (frames entered from C: callbacks, generators,
  asyncio steps). ``set_events`` instruments the code every thread is executing right
  away, so a thread spinning in a loop parks at its next backward jump.
* Python 3.11: a C-level trace function installed in every other thread's state with
  ``_PyEval_SetTrace`` (through ctypes; it is what debuggers use to attach), so each
  thread parks at its next ``call``/``line``/``return`` event.

A parked thread blocks on a gate lock without the GIL. A thread blocked in a C call
(I/O, a lock, ``sleep``) cannot park until it returns; when it does, it finishes at most
the line it was on (3.12+ gives the code it returns into ``LINE`` events for the pause;
3.11's trace function sees lines anyway) — it cannot enter a function without parking
first — so the stack the checker saw holds no frame it could start running old code in.
A thread that is merely waiting for the GIL or a CPU would run a few bytecodes too, so
settling waits for it (it stands between two bytecodes; see :func:`_waiting_to_run`).
A thread inside one of the patch's functions is let run until it is out of it
(``avoid``): stopping it there would only fail the attempt.

While the world is parked the patching thread must not take any lock another thread might
hold (logging's included) nor run user code, so :func:`parked` disables the garbage
collector (finalizers are user code) for the duration, and callers log after it returns.

Nor may a parked thread run any: but a blocking wait in the main thread runs Python's
signal handlers when a signal interrupts it (PEP 475: the lock's ``acquire`` retries after
running them), so a SIGCHLD to a gunicorn master, or any signal a program handles, would
run its handler inside the pause, perhaps between two code swaps. The main thread
therefore parks with signals blocked: the kernel hands them to another thread, whose C
handler only notes them, and the main thread runs the Python handlers once the pause is
over and its mask is back.
"""

from __future__ import annotations

import _thread
import ctypes
import dis
import gc
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from livepatch.errors import PatchError

_TOOL_NAME = "livepatch-stop"
#: settling ends once no more threads have parked for this long
QUIET = 0.001
_monitoring: Any = getattr(sys, "monitoring", None)

#: held by the patching thread for the length of a pause; parked threads block on it.
#: A fresh lock per pause: threads woken by the end of one pause never queue on the next.
_gate = _thread.allocate_lock()
#: serialises pauses (one stopper at a time)
_pause_lock = threading.Lock()
_active = False
_patcher = 0
#: ident → pause generation, for the threads parked right now (dict: atomic under the GIL)
_parked: dict[int, int] = {}
_generation = 0
_get_ident = _thread.get_ident


#: what the main thread blocks while parked (see the module doc); SIGKILL and SIGSTOP
#: cannot be blocked, and asking for them is an error on some systems
_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def _park() -> None:
    ident = _get_ident()
    # (blocking runs the handlers of signals already pending: before this thread counts
    # as parked, so they run outside the pause)
    # (looked up each time: after a fork from another thread, that thread is the main one)
    main = ident == threading.main_thread().ident
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if main else None
    try:
        while True:
            gate = _gate
            _parked[ident] = _generation
            gate.acquire()
            gate.release()
            # woken by the end of a pause; if the next one has already begun, this
            # thread has not run a bytecode since: stay parked for it too
            if not _active:
                break
    finally:
        _parked.pop(ident, None)
        if mask is not None:  # runs the handlers of what came meanwhile: after the pause
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _parked_now() -> int:
    generation = _generation
    return sum(1 for g in list(_parked.values()) if g == generation)


#: where a thread that gave the GIL up between two bytecodes (CPython's eval breaker)
#: stands: at a loop's backward jump (3.11 also has conditional ones), or at the start of
#: a frame. Such a thread is waiting only for the GIL or a CPU, not blocked in a C call.
_BETWEEN = frozenset(
    op
    for name, op in dis.opmap.items()
    if name == "RESUME" or ("JUMP_BACKWARD" in name and not name.endswith("NO_INTERRUPT"))
)


def _waiting_to_run() -> bool:
    """Whether a thread not parked yet stands between two bytecodes (:data:`_BETWEEN`).

    It parks at its next event once it runs, but it runs the bytecodes up to that event
    first: a spinning loop one more iteration. So settling waits for it, where a thread
    blocked in a C call is not waited for (it may block for ever), nor one inside a
    function of the patch (it is let run until it is out, however long that takes).
    """
    return any(
        f.f_lasti >= 0 and f.f_code.co_code[f.f_lasti] in _BETWEEN for f in _unparked()
    )


def _unparked() -> list[Any]:
    """The top frame of every other thread not parked yet, except threads inside one of
    the patch's functions (let run until they are out)."""
    generation, me = _generation, _get_ident()
    return [
        frame
        for ident, frame in sys._current_frames().items()
        if ident != me and _parked.get(ident) != generation and id(frame.f_code) not in _avoid
    ]


#: id() of code objects a thread should leave before it parks (the patch's functions)
_avoid: frozenset[int] = frozenset()


def _on_start(code: Any, *args: Any) -> Any:
    # PY_START / PY_RESUME: a frame was just pushed (often by C code: a callback, a
    # generator driven by a for loop, an asyncio step). Park even inside the patch: the
    # frame is on the stack, so the check sees it and this attempt fails, safely.
    if _active and _get_ident() != _patcher:
        _park()
    return None


def _on_step(code: Any, *args: Any) -> Any:
    # CALL / JUMP: park only outside the patch; a thread inside it runs on until it is
    # out (its callers' next call or loop), so one busy caller does not fail every attempt.
    if _active and _get_ident() != _patcher and id(code) not in _avoid:
        _park()
    return None


def _on_line(code: Any, line: int) -> Any:
    # LINE, set only on the code a thread blocked in a C call will return into (see
    # _Monitoring.catch_returns): it parks at the start of the next line
    if _active and _get_ident() != _patcher:
        _park()
    return None


@dataclass
class Pause:
    """What one pause measured."""

    #: seconds from arming to resuming (what other threads saw, at least)
    duration: float = 0.0
    #: seconds spent waiting for runnable threads to reach a parking event
    settle: float = 0.0
    #: threads parked when the check started / threads other than the patcher
    parked: int = 0
    others: int = 0
    mechanism: str = ""


class _Monitoring:
    """3.12+: sys.monitoring events with one free tool id."""

    name = "sys.monitoring"

    def __init__(self) -> None:
        self.tool: int | None = None
        #: code objects given LINE events by catch_returns, to take them off again
        self.lines: list[Any] = []

    def arm(self) -> None:
        mon = _monitoring
        for tool in (3, 4, 2, 1, 0, 5):
            try:
                mon.use_tool_id(tool, _TOOL_NAME)
            except ValueError:
                continue
            self.tool = tool
            break
        else:
            raise PatchError("every sys.monitoring tool id is taken; use model='hybrid'")
        ev = mon.events
        mask = 0
        for event, callback in ((ev.PY_START, _on_start), (ev.PY_RESUME, _on_start),
                                (ev.CALL, _on_step), (ev.JUMP, _on_step)):
            mon.register_callback(self.tool, event, callback)
            mask |= event
        mon.set_events(self.tool, mask)
        mon.register_callback(self.tool, ev.LINE, _on_line)

    def catch_returns(self, frames: Iterable[Any]) -> None:
        """LINE events on the code of `frames` (the top frames of threads blocked in C
        calls): returning inside the pause, such a thread parks at its next line instead
        of running on to its next call or loop jump."""
        mon = _monitoring
        assert self.tool is not None
        for code in {f.f_code for f in frames}:
            mon.set_local_events(self.tool, code, mon.events.LINE)
            self.lines.append(code)

    def disarm(self) -> None:
        mon = _monitoring
        if self.tool is None:
            return
        for code in self.lines:
            mon.set_local_events(self.tool, code, 0)
        self.lines = []
        mon.set_events(self.tool, 0)
        ev = mon.events
        for event in (ev.PY_START, ev.PY_RESUME, ev.CALL, ev.JUMP, ev.LINE):
            mon.register_callback(self.tool, event, None)
        mon.free_tool_id(self.tool)
        self.tool = None


_TRACEFUNC = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p
)


_PYTRACE_CALL, _PYTRACE_LINE = 0, 2


def _trace_cb(obj: Any, frame: Any, what: int, arg: Any) -> int:
    # 3.11: "call" as PY_START above; "line" as CALL/JUMP (outside the patch only);
    # never on "return"/"exception": the caller's next line parks it.
    if not _active or _get_ident() == _patcher:
        return 0
    if what == _PYTRACE_CALL:
        _park()
    elif what == _PYTRACE_LINE:
        code = ctypes.cast(frame, ctypes.py_object).value.f_code
        if id(code) not in _avoid:
            _park()
    return 0


_c_trace = _TRACEFUNC(_trace_cb)


class _TraceHooks:
    """3.11: a C trace function set in every other thread's state."""

    name = "per-thread trace hooks"

    def __init__(self) -> None:
        api = ctypes.pythonapi
        api.PyInterpreterState_Main.restype = ctypes.c_void_p
        api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
        api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
        api.PyThreadState_Next.restype = ctypes.c_void_p
        api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
        api.PyThreadState_Get.restype = ctypes.c_void_p
        api._PyEval_SetTrace.restype = ctypes.c_int
        api._PyEval_SetTrace.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.api = api
        #: thread state → the trace function and object it had before we armed it
        self.armed: dict[int, tuple[int | None, Any]] = {}

    def _others(self) -> list[int]:
        api = self.api
        me = api.PyThreadState_Get()
        out = []
        ts = api.PyInterpreterState_ThreadHead(api.PyInterpreterState_Main())
        while ts:
            if ts != me:
                out.append(ts)
            ts = api.PyThreadState_Next(ts)
        return out

    def arm(self) -> None:
        func = ctypes.cast(_c_trace, ctypes.c_void_p).value
        for ts in self._others():
            previous = _read_tracer(ts)  # a debugger's or coverage's: put back on disarm
            if self.api._PyEval_SetTrace(ts, func, id(None)) == 0:
                self.armed[ts] = previous

    def catch_returns(self, frames: Iterable[Any]) -> None:
        """Nothing to do: the trace function already parks a thread at its next line."""

    def disarm(self) -> None:
        # only thread states that still exist: a thread may have ended meanwhile
        alive = set(self._others())
        for ts, (func, obj) in self.armed.items():
            if ts in alive:
                self.api._PyEval_SetTrace(ts, func, id(obj) if func else None)
        self.armed = {}


# 3.11's PyThreadState keeps the trace hook as two fields, ``c_tracefunc`` and
# ``c_traceobj``, with no API to read another thread's. Their offsets are found once, by
# installing a known tracer in this thread and looking for it; if that fails, tracers of
# other threads are not restored.
_TRACE_OFFSETS: tuple[int, int] | None = None
_TRACE_OFFSETS_KNOWN = False


def _probe_trace_offsets() -> tuple[int, int] | None:
    api = ctypes.pythonapi
    ts = api.PyThreadState_Get()

    def probe(*args: Any) -> None:
        return None

    old = sys.gettrace()
    sys.settrace(probe)
    try:
        words = (ctypes.c_void_p * 40).from_address(ts)
        obj_at = [i for i, w in enumerate(words) if w == id(probe)]
        if len(obj_at) != 1 or obj_at[0] < 2 or not words[obj_at[0] - 2]:
            return None
        # layout: c_profilefunc, c_tracefunc, c_profileobj, c_traceobj
        return (obj_at[0] - 2) * 8, obj_at[0] * 8
    finally:
        sys.settrace(old)


def _read_tracer(ts: int) -> tuple[int | None, Any]:
    global _TRACE_OFFSETS, _TRACE_OFFSETS_KNOWN
    if not _TRACE_OFFSETS_KNOWN:
        _TRACE_OFFSETS = _probe_trace_offsets()
        _TRACE_OFFSETS_KNOWN = True
    if _TRACE_OFFSETS is None:
        return None, None
    func_off, obj_off = _TRACE_OFFSETS
    func = ctypes.c_void_p.from_address(ts + func_off).value
    obj_ptr = ctypes.c_void_p.from_address(ts + obj_off).value
    if not func:
        return None, None
    obj = ctypes.cast(obj_ptr, ctypes.py_object).value if obj_ptr else None
    return func, obj


def mechanism() -> str:
    return _Monitoring.name if _monitoring is not None else _TraceHooks.name


@contextmanager
def parked(settle: float = 0.02, avoid: Iterable[Any] = ()) -> Iterator[Pause]:
    """Park every other thread for the body of the ``with`` block.

    Waits up to `settle` seconds for the threads that can run to reach a parking event
    (it stops early once every other thread is parked, or once no more park for a while:
    the rest are blocked in C calls and cannot change their stacks). Threads executing
    one of the `avoid` code objects park only once they are out of it (or at the start of
    a frame), so they are not caught inside the patch when they are about to leave it.
    """
    global _active, _patcher, _avoid, _generation, _gate
    pause = Pause(mechanism=mechanism())
    hooks: _Monitoring | _TraceHooks = _Monitoring() if _monitoring is not None else _TraceHooks()
    with _pause_lock:
        gc_enabled = gc.isenabled()
        gc.disable()
        gate = _thread.allocate_lock()
        gate.acquire()
        _gate = gate
        t0 = time.perf_counter()
        _patcher = _get_ident()
        _avoid = frozenset(id(c) for c in avoid)
        _generation += 1
        _active = True
        try:
            hooks.arm()
            pause.others = max(len(sys._current_frames()) - 1, 0)
            last, changed, deadline = -1, t0, t0 + settle
            while _parked_now() < pause.others:
                time.sleep(0.0001)  # hand the GIL over: runnable threads reach an event
                now, count = time.perf_counter(), _parked_now()
                if count != last:
                    last, changed = count, now
                # no thread parked for QUIET seconds: the rest are blocked in C calls,
                # unless one stands between two bytecodes, waiting for a CPU (a busy
                # machine): it would run a little before parking, so wait for it too
                if now >= deadline or (now - changed >= QUIET and not _waiting_to_run()):
                    break
            pause.settle = time.perf_counter() - t0
            pause.parked = _parked_now()
            hooks.catch_returns(_unparked())
            yield pause
        finally:
            _active = False
            gate.release()
            try:
                hooks.disarm()
            finally:
                pause.duration = time.perf_counter() - t0
                if gc_enabled:
                    gc.enable()


def parked_threads() -> int:
    return _parked_now()


def other_threads() -> list[threading.Thread]:
    me = threading.get_ident()
    return [t for t in threading.enumerate() if t.ident != me]
