"""Greenlets: tasks that keep their frames where no thread's stack shows them.

gevent, eventlet and the ``greenlet`` package itself run many greenlets on one thread,
each with its own stack. The one running now is that thread's stack; every other one is
suspended (it switched away) with its frames saved inside the greenlet object, off every
thread's stack, so ``sys._current_frames()`` never shows them. In that they are like
suspended generators, and they are treated alike:

* during a dispatching transition nothing extra is needed. Every greenlet has its own
  ``contextvars`` context, which no switch of its thread marks, so its calls into the
  patch take the trampoline's slow path, and that walks the greenlet's own stack: one
  suspended inside an old version goes on calling old versions when it resumes;
* what must wait is the end. Finalization installs the new code for every caller, and
  ``stop`` installs it at once, so a greenlet suspended inside an old version would
  resume it and then call new versions. :func:`holding` finds such greenlets, and they
  block finalization (and ``stop``'s check) like any other task holding old code.

Finding them takes a pass over the heap (``gc.get_objects()``, frozen objects included:
see :mod:`livepatch.heap`): about 65 ms per million objects the collector tracks, in C
calls that hold the GIL. Suspended greenlets refer to neither their code nor (the plain
ones) their type, so ``gc.get_referrers`` cannot find them the way it finds generators.
It is done only where a greenlet was ever started (the ``greenlet`` module is loaded and
has made a thread's main greenlet), once every thread and Task has switched, as the
last check before finalization (and in ``stop``'s check).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import Any

from livepatch import heap


def loaded() -> bool:
    """Whether greenlets can exist here at all (the ``greenlet`` module is loaded)."""
    return "greenlet" in sys.modules


def suspended() -> list[Any]:
    """Every greenlet that is suspended with a frame: started, not finished, and not the
    one a thread runs now (that one's frames are its thread's stack)."""
    module = sys.modules.get("greenlet")
    kind = getattr(module, "greenlet", None)
    if not isinstance(kind, type):
        return []
    # a thread gets its main greenlet the first time it uses greenlets: none means no
    # greenlet was ever started here (a process that only imports greenlet, as
    # SQLAlchemy does), and the walk can be skipped
    mains = getattr(getattr(module, "_greenlet", None), "get_total_main_greenlets", None)
    if callable(mains) and mains() == 0:
        return []
    kinds = _with_subclasses(kind)  # gevent's Greenlet, eventlet's GreenThread...
    found = heap.objects("suspended greenlets")
    # picked by type in C (about 50 ns an object, a third of a Python loop's cost): most
    # objects of a process that merely imports greenlet (SQLAlchemy does) are not one
    picked = list(itertools.compress(found, map(kinds.__contains__, map(type, found))))
    return [g for g in picked if g.gr_frame is not None]


def _with_subclasses(kind: type) -> set[type]:
    kinds, todo = set(), [kind]
    while todo:
        k = todo.pop()
        if k not in kinds:
            kinds.add(k)
            todo.extend(k.__subclasses__())
    return kinds


def frames(g: Any) -> list[FrameType]:
    """The suspended greenlet's frames, innermost first."""
    out = []
    frame = g.gr_frame
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    return out


def name(g: Any, stack: list[FrameType]) -> str:
    """``greenlet <name>``: gevent's name for it where it has one, else the function it
    started with (the outermost frame)."""
    given = getattr(g, "name", None)
    if not isinstance(given, str) or not given:
        code = stack[-1].f_code if stack else None
        given = getattr(code, "co_qualname", "?")
    return f"greenlet {given} (0x{id(g):x})"


def holding(codes: Iterable[CodeType]) -> list[tuple[str, list[FrameType]]]:
    """Each suspended greenlet whose stack runs one of `codes`: its name and those frames."""
    wanted = {id(code) for code in codes}
    if not wanted or not loaded():
        return []
    out = []
    for g in suspended():
        stack = frames(g)
        mine = [f for f in stack if id(f.f_code) in wanted]
        if mine:
            out.append((name(g, stack), mine))
    return out
