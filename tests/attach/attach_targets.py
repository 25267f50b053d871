"""Attach targets: real Python processes of each version, with their output read live."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(__file__).with_name("fixtures") / "target.py"
VERSIONS = ("3.11", "3.12", "3.13")


def find_python(version: str) -> str | None:
    """The base interpreter of `version` (no venv: livepatch is not on its sys.path)."""
    found = subprocess.run(
        [str(ROOT / ".ci" / "find-python"), version], capture_output=True, text=True
    )
    path = found.stdout.strip()
    return path if found.returncode == 0 and path else None


OURS = f"{sys.version_info[0]}.{sys.version_info[1]}"


class Target:
    """A running target program; `expect()` waits for a line of its output."""

    def __init__(self, argv: list[str], env: dict[str, str], **popen: Any) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            **popen,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        pumps = ((self.proc.stdout, self.lines.put), (self.proc.stderr, self.stderr.append))
        for stream, put in pumps:
            threading.Thread(target=self._pump, args=(stream, put), daemon=True).start()
        self.expect("ready")

    @staticmethod
    def _pump(stream, put) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"target {self.pid} printed no line starting with {prefix!r} in {timeout}s "
                    f"(exit status {self.proc.poll()}, stderr {self.stderr[-5:]})"
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
