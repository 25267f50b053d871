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

* :func:`paced` lowers the process-wide switch interval to :data:`INTERVAL` while the bulk
  work runs, so any thread that starts waiting for the GIL meanwhile forces a hand-over
  after that long, wherever the patching thread is (except inside one long C call: a
  heap walk, a garbage collection). A thread that was already waiting keeps the interval
  it read when it began, so entering also sleeps for real once (:func:`hand_over`) to let
  such threads run. Uses nest and overlap across threads (the caller of ``apply`` and the
  transition worker); the last one out restores the saved interval exactly — unless
  someone set another interval meanwhile, which then stays. A child forked meanwhile
  keeps only the forking thread's uses.
* :class:`Yielder` paces a long loop that may run outside :func:`paced`: once per
  ``every`` seconds it sleeps for real, so the patching thread is off the GIL long enough
  for a woken waiter to take it. It skips the sleep when :mod:`threading` knows of no
  other thread, and inside :func:`paced`, where the lowered interval already hands over
  and every extra hand-over only makes the patching thread queue for the GIL again (a
  stack check over 1,065 tasks took longer with both than with the interval alone).

The price is the patching thread's own speed: it shares the GIL in slices of
:data:`INTERVAL` instead of 5 ms, so with many busy threads it queues for the GIL after
every slice. Measured with ``benchmarks/bench_transition.py`` (64 request-like threads and
1,000 asyncio tasks), pacing the transition itself made hybrid transitions 1.5 to 3 times
slower and two_universe ones 2 to 5 times. So only the engine's planning (compiling and
checking every function, before the transition starts: tens of ms for 100 functions) runs
inside :func:`paced`; the transition's own loops hand over through :class:`Yielder`, and
its one window where every call takes the slow path (the stores of the trampolines) is
kept to a fraction of a millisecond instead.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: the switch interval while bulk work runs (seconds): a waiting thread forces a hand-over
#: after this long, well inside the 1 ms pause budget
INTERVAL = 0.0002
#: how long a hand-over sleeps: the shortest real sleep (the kernel rounds it up to its
#: timer slack, about 50 µs), enough for a woken waiter to take the GIL
SLEEP = 1e-6

_lock = threading.Lock()
#: thread ident → how deep it is inside paced(); the interval is lowered while non-empty
_holders: dict[int, int] = {}
_saved = 0.0  # the interval to restore
_ours = 0.0  # the interval we set, as read back


def hand_over() -> None:
    """Let other threads run now, if there are any (a real sleep, not ``sleep(0)``)."""
    if threading.active_count() > 1:
        time.sleep(SLEEP)


def _set_interval(seconds: float) -> float:
    """Set the switch interval to `seconds` as CPython stores it (whole microseconds).

    ``setswitchinterval`` truncates, so a value read back from ``getswitchinterval`` does
    not always survive a round trip (15 µs would come back as 14): aim at the middle of
    the microsecond instead. Returns the interval now in force.
    """
    sys.setswitchinterval((round(seconds * 1e6) + 0.5) / 1e6)
    return sys.getswitchinterval()


@contextmanager
def paced() -> Iterator[None]:
    """Lower the switch interval to :data:`INTERVAL` for the length of the block."""
    global _saved, _ours
    me = threading.get_ident()
    with _lock:
        first = not _holders
        _holders[me] = _holders.get(me, 0) + 1
        if first:
            _saved = sys.getswitchinterval()
            _ours = _set_interval(INTERVAL) if _saved > INTERVAL else _saved
    try:
        if first:
            hand_over()  # threads already waiting still count the old interval
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
    """Lets waiting threads run once per `every` seconds of a long loop of the patching
    thread, so no thread waits the whole switch interval for the GIL (and the loop does
    not pay a hand-over per item when many threads are runnable).

    Each hand-over costs the loop a wait for the GIL, up to a switch interval per busy
    thread. Checking 1,064 tasks under 64 request-like threads (bench_transition 1a),
    a hybrid transition took a median of 68 ms handing over every 0.5 ms, 32 ms every
    1 ms, 19 to 26 ms every 2 ms; a ticker's longest GIL wait inside a 100-function
    transition went from about 2.5 to about 4.5 ms between 0.5 and 2 ms.
    """

    def __init__(self, every: float = 0.001) -> None:
        self.every = every
        self.last = time.perf_counter()

    def __call__(self) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            if not _holders:
                hand_over()
            self.last = time.perf_counter()
