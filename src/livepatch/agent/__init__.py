"""The agent: a control socket inside a running process (the kernel's /sys/kernel/livepatch).

`livepatch.agent.start()` opens an AF_UNIX socket in a private directory and serves the
`livepatch` command from a daemon thread: status, dry runs, apply and revert, with
progress streamed while a transition runs (see `protocol`, `server`, `operations`). It is
idempotent, survives `fork()` (a forked child such as a gunicorn worker gets an agent of
its own, on a socket named for its own pid), and never raises into the host after it has
started. Processes opt in with `livepatch run -- CMD`, with `LIVEPATCH_AGENT=1` (honoured
at interpreter startup, see `boot`), or by calling `start()`; `livepatch attach` starts it
in a process that did not opt in.

This package must not import the livepatch engine at import time: `livepatch/__init__.py`
imports it first, and the startup hook imports it in every Python process that has the
environment variable set.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livepatch.agent.server import Agent

__all__ = ["running", "socket_path", "start", "stop"]

_lock = threading.Lock()
_agent: Agent | None = None
_options: dict[str, object] | None = None
_fork_hook_installed = False


def start(
    *,
    trusted_keys: Iterable[object] | None = None,
    socket_dir: str | os.PathLike[str] | None = None,
    restore: bool = True,
) -> Path:
    """Start the agent in this process (no-op if it runs already); return its socket path.

    `trusted_keys`: Ed25519 public keys (PEM file paths or PEM text); when any is given,
    or `LIVEPATCH_TRUSTED_KEYS` names some, only patches signed by one of them apply.
    `socket_dir`: where the socket goes (default: see `livepatch.agent.paths`).
    `restore`: apply the patches recorded for this program (persistence).
    """
    global _agent, _options, _fork_hook_installed
    with _lock:
        if _agent is not None and _agent.pid == os.getpid():
            if _agent.running:
                return _agent.path
            _agent.close()  # its thread died somehow: replace it, do not leak its socket
        _options = {"trusted_keys": trusted_keys, "socket_dir": socket_dir, "restore": restore}
        _agent = _create(trusted_keys, socket_dir, restore=restore)
        if not _fork_hook_installed:
            os.register_at_fork(after_in_child=_after_fork_in_child)
            atexit.register(stop)
            _fork_hook_installed = True
        return _agent.path


def stop() -> None:
    """Close the agent's socket and remove it (applied patches stay applied)."""
    global _agent
    with _lock:
        agent, _agent = _agent, None
    if agent is not None:
        agent.close(unlink=agent.pid == os.getpid())


def running() -> bool:
    agent = _agent
    return agent is not None and agent.pid == os.getpid() and agent.running


def socket_path() -> Path | None:
    agent = _agent
    return agent.path if agent is not None and agent.pid == os.getpid() else None


def _create(
    trusted_keys: Iterable[object] | None,
    socket_dir: str | os.PathLike[str] | None,
    *,
    restore: bool,
    deferred: object | None = None,
) -> Agent:
    from livepatch.agent import paths
    from livepatch.agent.audit import AuditLog
    from livepatch.agent.operations import AgentState
    from livepatch.agent.operations import restore as restore_records
    from livepatch.agent.persist import DeferredPatches, ProgramRecords
    from livepatch.agent.server import Agent
    from livepatch.agent.signing import TrustedKeys

    trusted = TrustedKeys.from_environment()
    if trusted_keys is not None:
        trusted = TrustedKeys([*trusted_keys, *_env_key_paths()])
    state = AgentState(
        trusted=trusted,
        audit=AuditLog(),
        records=ProgramRecords(),
        deferred=deferred if isinstance(deferred, DeferredPatches) else DeferredPatches(),
        started_at=time.time(),
        socket="",
    )
    directory = Path(socket_dir) if socket_dir is not None else paths.socket_dir()
    agent = Agent(state, directory)
    agent.start()
    if restore:
        restore_records(state, on_error=_warn)
    return agent


def _env_key_paths() -> list[Path]:
    from livepatch.agent.signing import TRUSTED_KEYS_ENV

    value = os.environ.get(TRUSTED_KEYS_ENV, "")
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


def _after_fork_in_child() -> None:
    """A forked child (gunicorn worker, multiprocessing child) gets its own agent."""
    global _agent, _lock
    _lock = threading.Lock()  # may have been held by another thread at fork time
    parent, _agent = _agent, None
    if parent is None:
        return
    parent.close(unlink=False)
    deferred = parent.state.deferred
    deferred.after_fork()
    options = _options or {}
    try:
        # The child inherits its parent's applied and pending patches with its memory, so
        # it must not restore the program's records a second time.
        _agent = _create(
            options.get("trusted_keys"),  # type: ignore[arg-type]
            options.get("socket_dir"),  # type: ignore[arg-type]
            restore=False,
            deferred=deferred,
        )
    except BaseException as exc:
        _warn(f"no agent in forked child: {exc}")


def _warn(text: str) -> None:
    try:
        print(f"livepatch agent (pid {os.getpid()}): {text}", file=sys.stderr)
    except Exception:
        pass
