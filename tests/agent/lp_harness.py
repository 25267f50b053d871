"""Shared harness for the agent and CLI tests: real target processes and the real command.

`LivepatchEnv` gives each test its own socket directory, state directory and audit log
(through the documented environment variables), so tests never see each other's agents.
`Target` runs `fixtures/target.py` with `LIVEPATCH_AGENT=1` and the startup hook on
PYTHONPATH, i.e. the way `livepatch run` starts a program, and talks to it over its
stdin/stdout. `cli()` runs the installed `livepatch` console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import livepatch

FIXTURES = Path(__file__).parent / "fixtures"
STARTUP = Path(livepatch.__file__).parent / "_startup"
LIVEPATCH = Path(sys.executable).with_name("livepatch")


class LivepatchEnv:
    """Private locations for one test, as environment variables for every process."""

    def __init__(self, tmp_path: Path) -> None:
        # sun_path is 108 bytes: pytest's tmp_path can be too long for a socket path
        self.short = Path(tempfile.mkdtemp(prefix="lpt-", dir="/tmp"))
        self.socket_dir = self.short / "run"
        self.state_dir = tmp_path / "state"
        self.audit_log = self.state_dir / "audit.jsonl"
        self.tmp = tmp_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
        env.update(
            LIVEPATCH_SOCKET_DIR=str(self.socket_dir),
            LIVEPATCH_STATE_DIR=str(self.state_dir),
        )
        self.env = env

    def target_env(self, **extra: str) -> dict[str, str]:
        env = dict(self.env)
        env["LIVEPATCH_AGENT"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(STARTUP), str(FIXTURES)])
        env.update(extra)
        return env

    def socket_of(self, pid: int) -> Path:
        return self.socket_dir / f"agent-{pid}.sock"

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def cleanup(self) -> None:
        shutil.rmtree(self.short, ignore_errors=True)


class Target:
    """A running fixtures/target.py with an agent."""

    def __init__(self, lp: LivepatchEnv, *, wait_agent: bool = True, **extra_env: str) -> None:
        self.lp = lp
        self.proc = subprocess.Popen(
            [sys.executable, str(FIXTURES / "target.py")],
            env=lp.target_env(**extra_env),
            cwd=str(lp.tmp),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        assert self.readline(timeout=20) == "ready", self.stderr()
        if wait_agent:
            wait_for(lambda: lp.socket_of(self.pid).exists(), what="the agent socket")

    def readline(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.1):
                    return self.proc.stdout.readline().strip()
        raise AssertionError(f"target {self.pid} said nothing for {timeout}s")

    def ask(self, command: str, timeout: float = 10.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.readline(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def cli(
    lp: LivepatchEnv, *args: str, timeout: float = 60.0, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """Run the `livepatch` command as a user would."""
    env = dict(lp.env)
    env.update(extra_env)
    return subprocess.run(
        [str(LIVEPATCH), *args],
        env=env,
        cwd=str(lp.tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(lp: LivepatchEnv, *args: str, **kw: Any) -> tuple[int, Any]:
    done = cli(lp, *args, "--json", **kw)
    try:
        return done.returncode, json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"not JSON: {done.stdout!r} {done.stderr!r}") from None


def write_patch(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(body)
    return path


GREET_FIX = """import livepatch
patch = livepatch.Patch("fix-greet", description="shout")

@patch.function("greeter:greet")
def greet(name):
    return "HELLO " + name
"""


def wait_for(condition: Any, *, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_session(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM the process group `proc` leads (a server and its workers), SIGKILL it if
    it lingers; returns what it wrote to stderr."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.stderr is not None
    with proc.stderr:
        return proc.stderr.read().decode(errors="replace")


# ---- raw protocol access, for the tests that must speak it badly on purpose


def raw_connect(path: Path, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next reply, or None when the agent closed the connection."""
    header = _read(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    body = _read(sock, length)
    assert body is not None, "connection closed mid-frame"
    reply = json.loads(body)
    assert isinstance(reply, dict)
    return reply


def _read(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:  # closed with our unread bytes still in its buffer
            return None
        if not chunk:
            return None
        data += chunk
    return data


# ---- fixtures (imported by tests/agent/conftest.py and tests/cli/conftest.py)

import pytest  # noqa: E402


@pytest.fixture
def lp(tmp_path: Path) -> Any:
    env = LivepatchEnv(tmp_path)
    yield env
    env.cleanup()


@pytest.fixture
def make_target(lp: LivepatchEnv) -> Any:
    started: list[Target] = []

    def make(**kw: Any) -> Target:
        target = Target(lp, **kw)
        started.append(target)
        return target

    yield make
    for target in started:
        target.close()


@pytest.fixture
def target(make_target: Any) -> Target:
    return make_target()
