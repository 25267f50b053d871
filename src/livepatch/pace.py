"""Pacing: the patching thread hands the GIL over while it does bulk work.

Applying a patch is tens of milliseconds of pure-Python work in the patching thread
(compiling and verifying every function, installing trampolines, checking every task's
stack). Holding the GIL all that time would pause every other thread of the program,
which is exactly what the dispatching models exist to avoid.

CPython does not hand the GIL over by itself soon enough. A thread that wants the GIL
waits ``sys.getswitchinterval()`` (5 ms by default) before it asks the holder to drop it;
only then does the holder drop it at its next bytecode boundary *and wait until the
waiter has taken it* (forced switching). ``time.sleep(0)`` releases the GIL and takes it
straight back: the waiter, woken but not yet running, often loses that race, and since
the GIL did change hands its 5 ms start over. A loop that calls ``sleep(0)`` every
millisecond left a sleeping thread waking over 1 ms late in 1% and 27% of its
wake-ups (two runs of 400 on a 2-core VM with other processes busy).

Two things do hand over, and both are used here:

* :class:`Yielder` paces a long loop: once per :data:`EVERY` of the patching thread's CPU
  time it sleeps for real (:func:`hand_over`), long enough for a woken waiter to take the
  GIL and run. A 1 µs sleep (the shortest real one) was not: a waiter that the kernel
  took longer to wake than that found the patching thread back on the GIL, and waited for
  its next hand-over. ``benchmarks/bench_pace.py`` compares them: a ticker woke over 1 ms
  late 112 and 174 times a second with 1 µs sleeps, 26 and 93 with 50 µs ones (two runs).
  See :class:`Yielder` for how its period adapts.
* :func:`paced` lowers the process-wide switch interval to :data:`INTERVAL` while the
  engine plans (compiles and verifies every function), so that a thread that starts
  waiting for the GIL meanwhile forces a hand-over after that long wherever the patching
  thread is (except inside one long C call: a heap walk, a garbage collection). Uses nest
  and overlap across threads (the caller of ``apply`` and the transition worker); the
  last one out restores the saved interval exactly — unless someone set another interval
  meanwhile, which then stays. A child forked meanwhile keeps only the forking thread's
  uses.

The price is the patching thread's own speed. Under ``paced`` it shares the GIL in slices
of :data:`INTERVAL` instead of 5 ms, so with many busy threads it queues for the GIL after
every slice: measured with ``benchmarks/bench_transition.py`` (64 request-like threads and
1,000 asyncio tasks), pacing the whole transition made hybrid transitions 1.5 to 3 times
slower and two_universe ones 2 to 5 times. So planning runs inside :func:`paced`, and so
does building the trampolines of a patch of :data:`BULK` functions or more
(``dispatch.Universe.prepare``, before the transition starts); of the transition only
removing them and finalizing (for 100 functions, pacing the per-function work took the
longest time a ticker was kept off the GIL inside the transition from 2.08 to 1.47 ms,
medians of four alternating runs each of ``bench_transition.py --models hybrid
--sections 2``; building ahead took it below 1 ms in about half the runs). The check of
every task, whose length grows with the program and not the patch, hands over through
:class:`Yielder` alone.

What is left on a 2-core VM: a thread woken by a hand-over may still lose the GIL to
another waiter (CPython's GIL is not first come, first served), and the host may stop a
virtual CPU for a while, or a garbage collection run in one piece. ``bench_transition``
section 2 measures the result; ``benchmarks/trace_pauses.py`` shows where it comes from.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: the switch interval while the engine plans, and while it builds or removes the
#: trampolines of a large patch (seconds): a waiting thread forces a hand-over after this
#: long, well inside the 1 ms pause budget — in principle. On the development VM that
#: timed wait fires late, and planning without naps (forced hand-overs alone) paused a
#: ticker 1.4 to 2x as long (benchmarks/pair_pace.py): the naps do most of the work
INTERVAL = 0.0002
#: how long a hand-over sleeps (the kernel adds its timer slack, about 50 µs): long
#: enough for a woken waiter to get a CPU and the GIL before the patching thread is back
SLEEP = 50e-6
#: how much CPU time a Yielder lets its thread use between two hand-overs, at least.
#: 0.5 ms until the transition itself got down to about that much CPU time; now 0.2 ms
#: pauses a ticker less inside the transition: in paired runs of benchmarks/pair_pace.py
#: (four, 30 to 40 cycles each) its longest gap per transition was shorter in 186 of 300
#: paired windows (medians 0.61, 0.51, 0.73, 0.76 ms against 0.68, 0.68, 0.71, 0.81 ms);
#: over the whole apply call, 162 of 300, within the noise
EVERY = 0.0002
#: ... and at most (the default switch interval: beyond it CPython hands over anyway)
LONGEST = 0.005
#: how much CPU time a Yielder lets pass between two looks at the clock, about: a
#: hand-over comes at most this much after its period is up
LOOK = 50e-6
#: per thread: ``since``, its CPU time (``time.thread_time``) when it last handed over,
#: ``period``, the current time between hand-overs, ``waits``, its last few waits for
#: the GIL (shared by every Yielder so that loops run one after another add up), and
#: ``held``, how deep it is inside :func:`held` (no hand-overs then)
_ran = threading.local()

_lock = threading.Lock()
#: thread ident → how deep it is inside paced(); the interval is lowered while non-empty
_holders: dict[int, int] = {}
_saved = 0.0  # the interval to restore
_ours = 0.0  # the interval we set, as read back


#: threading's own registries of running and starting threads, read without its lock
_THREADS: dict[int, Any] = getattr(threading, "_active", {})
_STARTING: dict[Any, Any] = getattr(threading, "_limbo", {})


def hand_over() -> None:
    """Let other threads run now, if there are any (a real sleep, not ``sleep(0)``)."""
    # not threading.active_count(): it takes a lock, and inside stop's pause a parked
    # thread may hold it (see tasks.thread_names)
    if not getattr(_ran, "held", 0) and len(_THREADS) + len(_STARTING) > 1:
        time.sleep(SLEEP)
    _ran.since = time.thread_time()


@contextmanager
def held() -> Iterator[None]:
    """No hand-overs in this thread for the length of the block: the world is stopped
    (``stop``), so a nap would only lengthen the pause; every other thread is parked."""
    _ran.held = getattr(_ran, "held", 0) + 1
    try:
        yield
    finally:
        _ran.held -= 1


def _set_interval(seconds: float) -> float:
    """Set the switch interval to `seconds` as CPython stores it (whole microseconds).

    ``setswitchinterval`` truncates, so a value read back from ``getswitchinterval`` does
    not always survive a round trip (15 µs would come back as 14): aim at the middle of
    the microsecond instead. Returns the interval now in force.
    """
    sys.setswitchinterval((round(seconds * 1e6) + 0.5) / 1e6)
    return sys.getswitchinterval()


#: functions: a patch this large is bulk work for install and finalize (tens of µs each)
#: and runs them under paced(); a smaller one is done within a hand-over period or two,
#: and the lowered interval would only slow it among busy threads (see the module doc)
BULK = 32


@contextmanager
def paced(when: bool = True) -> Iterator[None]:
    """Lower the switch interval to :data:`INTERVAL` for the length of the block (only if
    `when`)."""
    global _saved, _ours
    if not when:
        yield
        return
    me = threading.get_ident()
    with _lock:
        first = not _holders
        _holders[me] = _holders.get(me, 0) + 1
        if first:
            _saved = sys.getswitchinterval()
            _ours = _set_interval(INTERVAL) if _saved > INTERVAL else _saved
    try:
        yield
    finally:
        with _lock:
            _leave(me)


def _leave(me: int) -> None:
    depth = _holders.pop(me) - 1
    if depth:
        _holders[me] = depth
    elif not _holders and sys.getswitchinterval() == _ours:
        _set_interval(_saved)


def _after_fork_in_child() -> None:
    """In a child only the forking thread lives on: forget the others' uses of
    :func:`paced` (putting the interval back if none is left), and do not inherit a lock
    that one of them held at the fork."""
    global _lock, _holders
    _lock = threading.Lock()
    me = threading.get_ident()
    mine = _holders.get(me, 0)
    _holders = {me: mine} if mine else {}
    if _holders or sys.getswitchinterval() != _ours:
        return
    if _ours != _saved:
        _set_interval(_saved)


os.register_at_fork(after_in_child=_after_fork_in_child)


class Yielder:
    """Paces a long loop of the patching thread: call it once per item, and once per
    :data:`EVERY` of the thread's CPU time it hands the GIL over.

    The clock is per thread and shared by every Yielder: it runs from the thread's last
    hand-over, so loops that follow one another (install, check, remove, finalize) add up
    instead of each starting afresh. It is CPU time, so that a loop's own waits for the
    GIL (other threads forcing a switch) do not count as running. More than
    :data:`LONGEST` of it since the last hand-over is not one stretch (CPython forces a
    switch by then, and the thread may have blocked too): the clock restarts.

    Each hand-over costs the loop a wait for the GIL. When the waits are long, many
    threads want the GIL and each of them waits for the others anyway, so the thread then
    runs for as long as it waited (`share` times the median of its last five waits, up to
    :data:`LONGEST`) before the next one. Checking 1,064 tasks under 64 request-like
    threads (bench_transition 1a, one run each), handing over every 0.5 ms regardless took
    a hybrid transition's median from 25 to 54 ms; with the wait-sized period it was
    25 ms (measured when :data:`EVERY` was 0.5 ms). The median, not the last wait: under
    4 light threads, one long wait (the OS ran something else meanwhile) let the next
    stretch run that long, and a ticker waited for it. Traced with
    ``benchmarks/trace_pauses.py`` (two runs each of 10 apply/revert cycles of a
    100-function patch), the patching thread's unbroken runs of over 0.7 ms
    inside the install loop, during a ticker's gaps, went from 9 and 20 (11 and 29 ms in
    all) to 3 and 2 (2.8 and 4.1 ms).
    """

    def __init__(self, every: float = EVERY, share: float = 1.0) -> None:
        self.every = every
        self.share = share
        now = time.thread_time()
        if now - getattr(_ran, "since", -2 * LONGEST) > LONGEST:
            _ran.since = now
        if not hasattr(_ran, "period"):
            _ran.period = every
            _ran.waits = collections.deque(maxlen=5)
        #: calls between two looks at the clock, calls left before the next, and the CPU
        #: time at the last look: reading a thread's CPU clock is a system call (about
        #: 1 µs here), a fifth of a small loop item's cost, and items of one loop are alike
        self._stride = self._left = 1
        self._looked = now

    def __call__(self, ahead: float = 0.0) -> None:
        """Hand over if the period is up, or if it would be `ahead` seconds of CPU from
        now: before a stretch that must not be interrupted, so it starts with that much
        of the period left."""
        self._left -= 1
        if self._left > 0 and not ahead:
            return
        now = time.thread_time()
        spent = now - self._looked
        # look again after about LOOK of CPU time, but at most twice as many calls on: a
        # loop that calls first and works after makes its first look after no work at
        # all, which would say "64 calls". Planning 100 functions with expect= then ran
        # 3 to 4 ms without a hand-over once per apply (items of 100 µs)
        grown = int(self._stride * LOOK / spent) if spent > 0 else 1
        self._stride = max(1, min(64, 2 * self._stride, grown))
        self._left = self._stride
        self._looked = now
        if now - _ran.since + ahead >= _ran.period:
            start = time.perf_counter()
            hand_over()
            self._looked = _ran.since
            _ran.waits.append(time.perf_counter() - start)
            # the median of the last few waits: one long one (the OS ran something else
            # meanwhile) must not let the thread hold the GIL that long next time
            waited = statistics.median(_ran.waits)
            _ran.period = min(max(self.every, self.share * waited), LONGEST)
