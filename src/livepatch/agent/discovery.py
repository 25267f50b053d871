"""Finding agents and processes: which pids have an agent, where its socket is, who its
children are. Everything here reads /proc; nothing connects to anything.

Agents are found in two places: the listening AF_UNIX sockets the kernel lists in
/proc/net/unix (which sees the agents of every user, so root can patch anyone's process),
and the caller's own socket directory (which may be anywhere, by LIVEPATCH_SOCKET_DIR).
An agent's socket is recognised by its name, `agent-<pid>.sock`; commands that act on
it then talk to the agent, whose `hello` reports its real pid.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from livepatch.agent import paths
from livepatch.errors import PatchError

_PROC_PATH = re.compile(r"/agent-(\d+)\.sock$")
_LISTENING = "01"  # SS_UNCONNECTED/TCP_LISTEN state in /proc/net/unix's "St" column


class NoSuchProcess(PatchError):
    """The pid names no running process."""

    code = "no-such-process"


class NoAgent(PatchError):
    """The process runs but has no agent socket."""

    code = "no-agent"


@dataclass
class ProcessInfo:
    pid: int
    ppid: int
    uid: int
    command: list[str] = field(default_factory=list)

    @property
    def command_line(self) -> str:
        return " ".join(self.command) or f"[pid {self.pid}]"


def process_info(pid: int) -> ProcessInfo | None:
    """What /proc says about `pid`, or None if it does not exist."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError:
        return ProcessInfo(pid=pid, ppid=0, uid=-1)
    ppid = uid = -1
    for line in status.splitlines():
        if line.startswith("PPid:"):
            ppid = int(line.split()[1])
        elif line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("State:") and line.split()[1] == "Z":
            return None  # a zombie has exited; only its exit status is left
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        command = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    except OSError:
        command = []
    return ProcessInfo(pid=pid, ppid=ppid, uid=uid, command=command)


def agent_sockets() -> dict[int, Path]:
    """Every agent socket this user can see, by pid (live processes only)."""
    found: dict[int, Path] = {}
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or parts[5] != _LISTENING:
            continue
        match = _PROC_PATH.search(parts[7])
        if match:
            found.setdefault(int(match.group(1)), Path(parts[7]))
    directory = paths.socket_dir()
    try:
        entries = list(directory.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        match = paths.SOCKET_NAME.match(entry.name)
        if match:
            found.setdefault(int(match.group(1)), entry)
    return {pid: path for pid, path in sorted(found.items()) if _alive(pid)}


def find_socket(pid: int) -> Path:
    """The socket of the agent in `pid`; raises NoSuchProcess / NoAgent with what to do."""
    if pid <= 0:
        raise NoSuchProcess(f"{pid} is not a process id; use 'livepatch ps' to list agents")
    info = process_info(pid)
    if info is None:
        raise NoSuchProcess(
            f"no process with pid {pid} (it may have exited); use 'livepatch ps' to list agents"
        )
    own = paths.socket_path(pid)
    if own.exists():
        return own
    found = agent_sockets().get(pid)
    if found is not None:
        return found
    if info.uid >= 0:
        other = paths.socket_path(pid, paths.socket_dir(uid=info.uid, environ={}))
        if other.exists():
            return other
    if runs_python(pid) is False:
        raise NoAgent(
            f"process {pid} ({info.command_line[:60]}) does not run Python; give the pid of "
            "a Python process ('livepatch ps' lists those with an agent), or --tree to "
            "patch the Python processes it started"
        )
    raise NoAgent(
        f"process {pid} ({info.command_line[:60]}) has no livepatch agent; start it with "
        f"'livepatch run -- CMD' or LIVEPATCH_AGENT=1, or try 'livepatch attach {pid}'"
    )


def children(pid: int) -> list[int]:
    """Every descendant of `pid`, parents before children."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: parse after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            by_parent.setdefault(int(fields[1]), []).append(int(entry))
    order: list[int] = []
    todo = sorted(by_parent.get(pid, []))
    while todo:
        child = todo.pop(0)
        order.append(child)
        todo.extend(sorted(by_parent.get(child, [])))
    return order


#: an interpreter binary (python, python3, python3.12, python3.13t), or a libpython
_PYTHON_BINARY = re.compile(r"(^|/)python\d*(\.\d+)?t?$")


def runs_python(pid: int) -> bool | None:
    """Whether `pid` runs CPython: its executable is a ``python`` binary, or it has a
    libpython mapped (an embedding program, a uwsgi). None if /proc will not say (another
    user's process)."""
    try:
        if _PYTHON_BINARY.search(os.readlink(f"/proc/{pid}/exe")):
            return True
        with open(f"/proc/{pid}/maps") as maps:
            return any("/libpython" in line for line in maps)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    return process_info(pid) is not None
