"""Exercise tracking: has the new code of a patch actually run yet?

An SRE who applied a fix wants to know whether the fixed path has been taken since. Counting
calls would cost every call forever; instead, on Python 3.12+ we ask ``sys.monitoring`` for
the *first* ``PY_START`` of each new code object and then disable the event at that
location, so a function costs nothing extra once it has been seen to run. On 3.11 there is
no per-code-object hook that goes quiet by itself, so the answer is "unknown" (``None``).
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from types import CodeType
from typing import Any

_TOOL_NAME = "livepatch-exercise"
_lock = threading.Lock()
#: id(code) → [weak reference to code, time of first run or None]; by identity, since code
#: objects compiled from the same source compare equal. Weak: every apply makes new code
#: objects, and an entry must go with its code (a reverted patch's), or a process that is
#: patched and reverted for months keeps every version it ever ran.
_first_run: dict[int, list[Any]] = {}
_tool: int | None = None

_monitoring: Any = getattr(sys, "monitoring", None)


def _claim_tool() -> int | None:
    global _tool
    if _tool is not None or _monitoring is None:
        return _tool
    for tool in (4, 3):  # ids the standard tools (debugger, coverage, profiler) leave free
        try:
            _monitoring.use_tool_id(tool, _TOOL_NAME)
        except ValueError:
            continue
        _monitoring.register_callback(tool, _monitoring.events.PY_START, _on_start)
        _tool = tool
        return tool
    return None


def _on_start(code: CodeType, offset: int) -> Any:
    entry = _first_run.get(id(code))
    if entry is not None and entry[0]() is code and entry[1] is None:
        entry[1] = time.time()
    return _monitoring.DISABLE


def _forget(key: int) -> Any:
    """The weak reference's callback: drop the entry of a code object that died. Lock-free
    (a dict pop): it runs wherever the code object is freed, which may be inside
    :func:`watch` holding `_lock`."""

    def forget(ref: weakref.ref[CodeType]) -> None:
        entry = _first_run.get(key)
        if entry is not None and entry[0] is ref:
            _first_run.pop(key, None)

    return forget


def watch(codes: list[CodeType]) -> None:
    """Start watching `codes` for their first run."""
    with _lock:
        tool = _claim_tool()
        if tool is None:
            return
        for code in codes:
            if id(code) not in _first_run:
                _first_run[id(code)] = [weakref.ref(code, _forget(id(code))), None]
                _monitoring.set_local_events(tool, code, _monitoring.events.PY_START)


def first_run(code: CodeType) -> float | None:
    """When `code` first ran (epoch seconds), None if not yet."""
    entry = _first_run.get(id(code))
    return entry[1] if entry is not None and entry[0]() is code else None


def watched() -> int:
    """How many code objects are watched (alive ones only)."""
    return len(_first_run)


def supported() -> bool:
    return _monitoring is not None and _claim_tool() is not None
