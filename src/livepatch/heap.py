"""Heap scans: every object that refers to given code (or every object), frozen ones included.

Two questions have no answer but a pass over the heap: which closures run a nested
function's code (``locate.instances_of``: ``outer.<locals>.inner`` has one function object
per call of ``outer``), and which suspended generators and coroutines run a code object
(``tasks.suspended_with``: a frame suspended in the old version must block finalization).
``gc.get_referrers`` answers both in one C call over the objects the collector tracks.

It does not look at objects frozen by ``gc.freeze()``, which a pre-fork server calls so
that its workers share the memory of everything loaded before the fork. A closure or a
suspended generator made before the freeze was invisible: a nested function's old
closures kept the old code after its patch completed, and a generator suspended in an
old version could resume it after finalization, which the consistency guarantee forbids.
So before scanning, :func:`referrers` gives frozen objects back to the collector
(``gc.unfreeze()``: one splice of two lists, whatever their length) and logs a stable
line saying so. The process then collects them again as it did before the freeze: its
later full collections take longer, and in a forked worker they write to pages shared
with the parent. Freezing again would freeze everything made since as well, garbage
cycles included, so livepatch does not. A plan (``--dry-run``) changes nothing, so it
scans without unfreezing (:func:`looking_only`) and says that applying will unfreeze.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import CodeType
from typing import Any

log = logging.getLogger("livepatch")
#: per thread: how deep it is inside :func:`looking_only`
_looking = threading.local()


def frozen() -> int:
    """How many objects ``gc.freeze()`` keeps from the collector, and so from a scan."""
    return gc.get_freeze_count()


def referrers(codes: list[CodeType], looking_for: str) -> list[Any]:
    """Every object that refers to one of `codes` (``gc.get_referrers``), frozen objects
    included: those are unfrozen first (see the module doc). `looking_for` says what the
    scan is for, in the log line."""
    _unfreeze(looking_for)
    return gc.get_referrers(*codes)


def objects(looking_for: str) -> list[Any]:
    """Every object the collector tracks (``gc.get_objects``), frozen ones included, as
    for :func:`referrers`. For what no code object leads to: a suspended greenlet keeps
    its frames in its own saved stack."""
    _unfreeze(looking_for)
    return gc.get_objects()


def _unfreeze(looking_for: str) -> None:
    count = gc.get_freeze_count()
    if count and not getattr(_looking, "depth", 0):
        gc.unfreeze()
        line = ("livepatch: unfroze %d object(s) (gc.freeze()) to find %s among them; the "
                "collector scans them again from now on", count, looking_for)
        held = getattr(_held, "lines", None)
        if held is not None:
            held.append(line)
        else:
            log.warning(*line)


#: per thread: the log lines held by :func:`logs_held`, or None
_held = threading.local()


@contextmanager
def logs_held() -> Iterator[None]:
    """Scans in this block hold their log lines and write them when it ends. The stop
    model scans with every other thread parked, and one may be parked holding logging's
    lock: taking it there would wait for ever."""
    if getattr(_held, "lines", None) is not None:  # inside another: it writes them
        yield
        return
    lines: list[tuple[Any, ...]] = []
    _held.lines = lines
    try:
        yield
    finally:
        _held.lines = None
        for line in lines:
            log.warning(*line)


@contextmanager
def looking_only() -> Iterator[None]:
    """Scans in this block leave frozen objects frozen (and do not see them): a plan
    must change nothing."""
    _looking.depth = getattr(_looking, "depth", 0) + 1
    try:
        yield
    finally:
        _looking.depth -= 1
