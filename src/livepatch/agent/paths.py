"""Where the agent keeps things: its socket, the audit log and the per-program patch records.

The socket lives in a private directory that only its owner can enter (0700), so no other
user can even reach it; SO_PEERCRED is the second line of defence. The directory is
`$XDG_RUNTIME_DIR/livepatch` when the session has one, else `/tmp/livepatch-<uid>`; the
socket inside is named `agent-<pid>.sock`, which is how `livepatch ps` finds agents.

State that outlives a process (the audit log and the record of applied patches per
program) goes under `$XDG_STATE_HOME/livepatch` (default `~/.local/state/livepatch`).
Every location can be overridden with an environment variable, which tests use to keep
each run apart: `LIVEPATCH_SOCKET_DIR`, `LIVEPATCH_STATE_DIR`, `LIVEPATCH_AUDIT_LOG`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from livepatch.errors import PatchError

SOCKET_DIR_ENV = "LIVEPATCH_SOCKET_DIR"
STATE_DIR_ENV = "LIVEPATCH_STATE_DIR"
AUDIT_LOG_ENV = "LIVEPATCH_AUDIT_LOG"

#: agent sockets are named for the pid of the process that serves them
SOCKET_NAME = re.compile(r"^agent-(\d+)\.sock$")

#: sun_path holds 108 bytes including the terminating NUL on Linux
MAX_SOCKET_PATH = 107


class UnsafeDirectory(PatchError):
    """A directory the agent would use is not private to this user."""

    code = "unsafe-directory"


def socket_dir(uid: int | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding agent sockets of user `uid` (default: this process's user)."""
    env = os.environ if environ is None else environ
    if env.get(SOCKET_DIR_ENV):
        return Path(env[SOCKET_DIR_ENV])
    uid = os.getuid() if uid is None else uid
    runtime = env.get("XDG_RUNTIME_DIR")
    # XDG_RUNTIME_DIR belongs to one user; a process running as someone else (sudo keeps
    # the variable) must not put its socket there.
    if runtime and _owned_by(Path(runtime), uid):
        return Path(runtime) / "livepatch"
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"livepatch-{uid}"


def socket_path(pid: int, directory: Path | None = None) -> Path:
    """The socket of the agent in process `pid`."""
    return (directory or socket_dir()) / f"agent-{pid}.sock"


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Per-user state: the audit log and the per-program patch records."""
    env = os.environ if environ is None else environ
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV])
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "livepatch"


def audit_log_path(environ: Mapping[str, str] | None = None) -> Path:
    """The append-only audit log of this user's agents."""
    env = os.environ if environ is None else environ
    if env.get(AUDIT_LOG_ENV):
        return Path(env[AUDIT_LOG_ENV])
    return state_dir(env) / "audit.jsonl"


def private_dir(path: Path) -> Path:
    """Create `path` (0700) if needed and check that it is ours and closed to others.

    A directory that exists but belongs to someone else, or is a symlink, or is open to
    group/others is refused rather than repaired: in a shared /tmp it may be a trap.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory; remove it and try again")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(
            f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            f"remove it or set {SOCKET_DIR_ENV} to a private directory"
        )
    if st.st_mode & 0o077:
        raise UnsafeDirectory(
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run 'chmod 700 {path}' and try again"
        )
    return path


def _owned_by(path: Path, uid: int) -> bool:
    try:
        return path.stat().st_uid == uid
    except OSError:
        return False
