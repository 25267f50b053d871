"""The audit trail: every apply, revert and refusal, as append-only JSON lines.

Each record is one line written with a single `write` to a file opened with O_APPEND, so
records from many agents (a gunicorn master and its workers share one log) never
interleave, and nothing in the agent ever rewrites or truncates the file. The same facts
are raised as `sys.audit` events, so a process's own audit hooks (PEP 578) see every
change to its code and every refusal:

    livepatch.agent.<event>  (patch name, sha256, model, result, peer uid, peer pid)

where <event> is `apply`, `revert`, `plan` or `connect`, and result is "ok", "deferred"
or the error code of the refusal (`peer-refused` for a connection from another user).

`livepatch log` reads the log back.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livepatch.agent import paths


@dataclass
class AuditRecord:
    """One line of the audit log."""

    event: str  # "apply" | "revert" | "plan" | "connect"
    result: str  # "ok", "deferred" or an error code
    time: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    peer_uid: int | None = None
    peer_pid: int | None = None
    patch: str | None = None
    sha256: str | None = None
    model: str | None = None
    message: str | None = None
    argv: list[str] = field(default_factory=lambda: list(sys.argv[:8]))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["iso_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        return {k: v for k, v in data.items() if v is not None}


class AuditLog:
    """Appends records to one log file; never raises into the agent."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or paths.audit_log_path()
        self.error: str | None = None
        self._lock = threading.Lock()

    def write(self, record: AuditRecord) -> None:
        """Append `record` and raise the matching `sys.audit` event."""
        _raise_event(record)
        line = json.dumps(record.to_dict(), separators=(",", ":"), default=str) + "\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
                self.error = None
            except OSError as exc:
                # The change has happened (or been refused) either way; say so on stderr
                # rather than turn a logging failure into a failure of the host process.
                self.error = f"cannot write the audit log {self.path}: {exc.strerror}"
                print(f"livepatch agent: {self.error}", file=sys.stderr)


def _raise_event(record: AuditRecord) -> None:
    sys.audit(
        f"livepatch.agent.{record.event}",
        record.patch,
        record.sha256,
        record.model,
        record.result,
        record.peer_uid,
        record.peer_pid,
    )


def read(path: Path | None = None) -> Iterator[dict[str, Any]]:
    """The records of a log, oldest first; lines that are not JSON objects are skipped."""
    log = path or paths.audit_log_path()
    try:
        handle = open(log, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record
