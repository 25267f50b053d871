"""`livepatch attach PID`: start the agent inside a Python process that did not opt in.

A process started with `livepatch run`, `LIVEPATCH_AGENT=1` or `livepatch.agent.start()`
has an agent from the beginning. Every other Python process can still get one, where the
operating system allows it, in four steps:

1. **Probe** (`inject_probe`): from `/proc` and the binaries alone, make sure the pid is a
   live CPython 3.11-3.13 process of the same version as this livepatch, that ptrace is
   permitted and that the process did not disable remote debugging. Anything else is
   refused before the process is touched: injecting into a non-Python process can kill it.
2. **Inject** (`inject_stub`): with ptrace (pyinjector), make the process load a tiny
   native stub whose constructor only starts a helper thread and returns; the main thread
   is held for about a millisecond and resumes exactly where it was.
3. **Bootstrap** (`inject_bootstrap`): the helper thread takes the GIL like any other
   thread, makes livepatch importable, calls `livepatch.agent.start()` and reports back
   through a file. It never applies a patch.
4. **Verify**: connect to the socket the agent reported and ask it `hello`; the agent
   must answer with the target's pid.

If the agent already runs in the process, nothing is injected and the result says so.
The same steps serve the `livepatch attach` command (`attach_command`, registered by the
CLI) and the Python function `attach()`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

import livepatch
from livepatch.agent.inject_bootstrap import bootstrap_source
from livepatch.agent.inject_errors import AttachFailed, AttachRefused
from livepatch.agent.inject_probe import Target, probe
from livepatch.agent.inject_stub import inject, prepare, stub_library
from livepatch.errors import PatchError

__all__ = [
    "AttachFailed",
    "AttachRefused",
    "AttachResult",
    "attach",
    "attach_command",
]

SUPPORTED = ((3, 11), (3, 13))

#: exit statuses, as `livepatch --help` documents them for every command
EXIT_OK = 0
EXIT_REFUSED = 1

_POLL = 0.005


@dataclass(frozen=True)
class AttachResult:
    """An agent answers in process `pid` (started now, or `already_running`)."""

    pid: int
    python_version: str
    socket_path: str
    #: seconds from the start of `attach()` to the agent's answer
    elapsed: float
    already_running: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def attach(pid: int, timeout: float = 10.0) -> AttachResult:
    """Start the livepatch agent in process `pid` and check that it answers.

    Raises `AttachRefused` (nothing was done to the process) or `AttachFailed` (the stub
    was injected but no agent answered within `timeout` seconds).
    """
    started = time.monotonic()
    deadline = started + timeout
    # an agent that answers is all that was asked for, whatever the checks below would say
    # (a process started with `livepatch run` may well have opted out of remote debugging)
    existing = _answering_agent(pid, deadline)
    if existing is not None:
        socket, hello = existing
        return AttachResult(
            pid=pid,
            python_version=str(hello.get("python", "?")),
            socket_path=str(socket),
            elapsed=time.monotonic() - started,
            already_running=True,
        )
    target = probe(pid)
    _check_compatible(target)
    report = run_bootstrap(target, deadline, timeout)
    if not report.get("ok"):
        error = str(report.get("error", "no reason given"))
        hint = ""
        if "No module named 'livepatch'" in error:
            where = Path(livepatch.__file__).parent.parent
            hint = (f"; the process's user cannot import livepatch from {where}: install "
                    "livepatch where that user can read it")
        raise AttachFailed(
            f"the stub ran in process {pid} but the agent did not start: {error}{hint}"
        )
    socket = Path(str(report.get("socket")))
    _verify(pid, socket, deadline)
    return AttachResult(
        pid=pid,
        python_version=str(report.get("version") or target.version_text),
        socket_path=str(socket),
        elapsed=time.monotonic() - started,
        already_running=False,
    )


def run_bootstrap(
    target: Target, deadline: float, timeout: float, marker: str | None = None
) -> dict[str, Any]:
    """Inject the stub into `target`, let its bootstrap run and return the bootstrap's report.

    With a `marker` the bootstrap stops before importing livepatch and reports the marker
    back: the injection itself, without the agent (the tests use this).
    """
    stub = stub_library()
    staging = Path(tempfile.mkdtemp(prefix="livepatch-attach-"))
    try:
        result_file = staging / "result.json"
        source = bootstrap_source(
            {
                "result": str(result_file),
                # another version's site-packages would only break the target's imports
                "path": _import_path() if target.version[:2] == sys.version_info[:2] else [],
                "expect_version": list(target.version[:2]),
                "marker": marker,
            }
        )
        library = prepare(stub, source, staging)
        _hand_over(staging, library, target)
        inject(target.pid, library)
        # the target has mapped the library; the file itself is no longer needed
        library.unlink()
        return wait_for_report(target.pid, result_file, deadline, timeout)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def wait_for_report(pid: int, result_file: Path, deadline: float, timeout: float) -> dict[str, Any]:
    """The bootstrap's report; AttachFailed if the process dies or time runs out first."""
    while True:
        try:
            report: dict[str, Any] = json.loads(result_file.read_text())
            return report
        except FileNotFoundError:
            pass
        except ValueError:
            raise AttachFailed(f"process {pid} wrote an unreadable attach report") from None
        if not _alive(pid):
            raise AttachFailed(f"process {pid} exited while the agent was being started")
        if time.monotonic() >= deadline:
            raise AttachFailed(
                f"the stub was loaded into process {pid} but its bootstrap did not report within "
                f"{timeout:g}s (a thread may hold the GIL in a long C call); it may still start "
                "the agent later: check 'livepatch ps'"
            )
        time.sleep(_POLL)


def _check_compatible(target: Target) -> None:
    label = f"process {target.pid} ({target.name})"
    version = target.version[:2]
    low, high = SUPPORTED
    if not low <= version <= high:
        raise AttachRefused(
            f"{label} runs Python {target.version_text}; livepatch supports "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"
        )
    ours = sys.version_info[:2]
    our_free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    if version != ours or target.free_threaded != our_free_threaded:
        wanted = f"{version[0]}.{version[1]}{'t' if target.free_threaded else ''}"
        mine = f"{ours[0]}.{ours[1]}{'t' if our_free_threaded else ''}"
        raise AttachRefused(
            f"{label} runs Python {target.version_text} but this livepatch runs on Python "
            f"{mine}; run livepatch attach from a Python {wanted} environment with livepatch"
        )


def _import_path() -> list[str]:
    """What the target appends to sys.path to import this livepatch and its dependencies."""
    import livepatch

    entries = [str(Path(livepatch.__file__ or __file__).resolve().parent.parent)]
    scheme = sysconfig.get_paths()
    for key in ("purelib", "platlib"):
        if scheme.get(key) and scheme[key] not in entries:
            entries.append(scheme[key])
    return entries


def _hand_over(staging: Path, library: Path, target: Target) -> None:
    """Let a target owned by another user (we are root) read the stub and write its report."""
    if os.geteuid() == 0 and target.uid != 0:
        os.chown(staging, target.uid, target.gid)
        os.chown(library, target.uid, target.gid)


def _answering_agent(pid: int, deadline: float) -> tuple[Path, dict[str, Any]] | None:
    """The socket of an agent already serving `pid` and its hello, if there is one."""
    from livepatch.agent import discovery

    if pid <= 0:
        return None
    try:
        socket = discovery.find_socket(pid)
    except (PatchError, OSError):  # OSError: a socket directory we may not look into
        return None
    try:
        return socket, _verify(pid, socket, deadline)
    except AttachFailed:
        return None  # a stale socket: the attach goes ahead and the agent replaces it


def _verify(pid: int, socket: Path, deadline: float) -> dict[str, Any]:
    """The agent's answer to `hello` on `socket`; AttachFailed unless it is `pid`'s agent."""
    from livepatch.agent.client import AgentClient

    try:
        with AgentClient(pid, path=socket, timeout=max(0.5, deadline - time.monotonic())) as c:
            hello = c.request("hello")
    except (PatchError, OSError) as exc:
        raise AttachFailed(
            f"the agent of process {pid} does not answer on {socket}: {exc}"
        ) from None
    if hello.get("pid") != pid:
        raise AttachFailed(
            f"{socket} is served by process {hello.get('pid')}, not {pid}; remove the stale socket"
        )
    return hello


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@click.command("attach")
@click.argument("pid", type=int)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=3600),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the agent to answer.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attach_command(pid: int, timeout: float, as_json: bool) -> None:
    """Start the livepatch agent inside running Python process PID.

    For processes that were not started with `livepatch run` or LIVEPATCH_AGENT=1. Needs
    ptrace permission on PID (same user, or root), the same Python version (3.11-3.13) as
    this livepatch, and a C compiler the first time. The process's main thread is paused
    for about a millisecond; the agent starts on a helper thread.

    Exit status 0 when the agent answers; 1 when the attach was refused (code
    attach-refused: the process was not touched) or failed (attach-failed: the stub was
    loaded but no agent answered in time).
    """
    try:
        result = attach(pid, timeout=timeout)
    except PatchError as exc:
        if as_json:
            _print_json({"ok": False, "code": exc.code, "message": str(exc)})
        else:
            click.echo(f"livepatch attach: {exc}", err=True)
        raise SystemExit(EXIT_REFUSED) from None
    if as_json:
        _print_json({"ok": True, **result.to_json()})
    elif result.already_running:
        click.echo(f"process {pid} already has an agent on {result.socket_path}")
    else:
        click.echo(
            f"agent started in process {pid} (Python {result.python_version}) on "
            f"{result.socket_path} in {result.elapsed * 1000:.0f} ms"
        )


def _print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
