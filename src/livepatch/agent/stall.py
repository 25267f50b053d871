"""Why an agent does not answer: what /proc says about its process meanwhile.

The agent is Python code in the target. It cannot run while another thread holds the GIL
in one long C call (``sum(range(10**10))``, a regex on a huge string, a C extension that
never releases it), nor while the process is stopped (SIGSTOP, a debugger). Either way
the socket accepts the request, since the kernel queues it, and the answer just does not
come. The command cannot see the GIL from outside, but it can see the evidence: a thread
that stays on a CPU, or a process in the stopped state. Once the agent has been silent
for a while, :func:`explain` takes two :class:`Sample` of every thread's CPU time a
moment apart and says which of the two it probably is. (Only then: a process may have
hundreds of threads, and the command must not read their /proc files for every message.)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: a thread that used this share of the wall-clock time between two samples held a CPU
#: (and, as the agent did not run, most likely the GIL) most of the time. Not nearer 1: a
#: thread spinning in C all along measured under 0.8 at times (clock ticks of 10 ms over
#: 0.25 s, a busy 2-core VM), and was then taken for one off the CPU
_ALL_ALONG = 0.5
#: seconds between the two samples
LOOK = 0.25


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


def explain(pid: int) -> str:
    """What probably keeps the agent of `pid` from answering, as a clause (takes
    :data:`LOOK` seconds)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    if fields is None:
        return f"process {pid} is gone"
    if fields[0] in ("T", "t"):
        return (f"process {pid} is stopped (SIGSTOP or a debugger); "
                f"'kill -CONT {pid}' lets it answer")
    since = Sample.take(pid)
    time.sleep(LOOK)
    waited = time.monotonic() - since.at
    now = _thread_cpu(since.pid)
    busy = sorted(tid for tid, seconds in now.items()
                  if waited > 0 and seconds - since.cpu.get(tid, seconds) >= _ALL_ALONG * waited)
    if busy:
        which = ", ".join(str(tid) for tid in busy[:3])
        return (f"thread {which} of it is running on a CPU most of the time: probably a long C "
                "call that holds the GIL, which the agent (Python code) waits for")
    return ("no thread of it was on a CPU: a thread may hold the GIL while it waits in a C "
            "call that does not let it go, or the process is swapping")
