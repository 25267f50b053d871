"""Why an agent does not answer: what /proc says about its process meanwhile.

The agent is Python code in the target. It cannot run while another thread holds the GIL
in one long C call (``sum(range(10**10))``, a regex on a huge string, a C extension that
never releases it), nor while the process is stopped (SIGSTOP, a debugger). Either way
the socket accepts the request, since the kernel queues it, and the answer just does not
come. The command cannot see the GIL from outside, but it can see the evidence: a thread
that stayed on a CPU for the whole wait, or a process in the stopped state. This module
takes a :class:`Sample` of every thread's CPU time when the request goes out and says,
from a second look, which of the two it probably is.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: a thread that used this share of the wall-clock time since the sample held a CPU
#: (and, as the agent did not run, most likely the GIL) all along
_ALL_ALONG = 0.8


@dataclass
class Sample:
    """When, and how much CPU time each thread of `pid` had used by then (seconds)."""

    pid: int
    at: float = field(default_factory=time.monotonic)
    cpu: dict[int, float] = field(default_factory=dict)

    @classmethod
    def take(cls, pid: int) -> Sample:
        return cls(pid, time.monotonic(), _thread_cpu(pid))


def _stat_fields(path: Path) -> list[str] | None:
    """The fields of a /proc .../stat file after the command name (which may hold spaces
    and parentheses): state first."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _thread_cpu(pid: int) -> dict[int, float]:
    cpu = {}
    try:
        tids = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    for tid in tids:
        fields = _stat_fields(Path(f"/proc/{pid}/task/{tid}/stat"))
        if fields and len(fields) > 12:
            # utime and stime, fields 14 and 15 of stat(5): 11 and 12 after the state
            cpu[tid] = (int(fields[11]) + int(fields[12])) / _TICK
    return cpu


def explain(since: Sample) -> str:
    """What probably keeps the agent of `since.pid` from answering, as a clause."""
    fields = _stat_fields(Path(f"/proc/{since.pid}/stat"))
    if fields is None:
        return f"process {since.pid} is gone"
    if fields[0] in ("T", "t"):
        return (f"process {since.pid} is stopped (SIGSTOP or a debugger); "
                f"'kill -CONT {since.pid}' lets it answer")
    waited = time.monotonic() - since.at
    now = _thread_cpu(since.pid)
    busy = sorted(tid for tid, seconds in now.items()
                  if waited > 0 and seconds - since.cpu.get(tid, seconds) >= _ALL_ALONG * waited)
    if busy:
        which = ", ".join(str(tid) for tid in busy[:3])
        return (f"thread {which} of it ran on a CPU all along: probably a long C call that "
                "holds the GIL, which the agent (Python code) waits for")
    return ("no thread of it was on a CPU: a thread may hold the GIL while it waits in a C "
            "call that does not let it go, or the process is swapping")
