"""`apply --tree` on a real gunicorn (master + 4 workers on 127.0.0.1): all or nothing,
pending in the master (no --preload), new workers come up patched, and a restarted
gunicorn comes up with the recorded patch applied."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from lp_harness import LIVEPATCH, cli, cli_json, free_port, stop_session, wait_for, write_patch

from livepatch.agent import discovery

pytest.importorskip("gunicorn")
FIXTURES = Path(__file__).parent / "fixtures"
WORKERS = 4

FIX = """import livepatch
patch = livepatch.Patch("fix-message", description="new message")

@patch.function("gunicorn_app:message")
def message():
    return "new"
"""

# fails in exactly one process: the pid written to FAIL_FILE
FAILING = """import os, pathlib, livepatch
patch = livepatch.Patch("fix-doomed", description="fails in one worker")

@patch.pre_patch
def veto():
    if str(os.getpid()) == pathlib.Path("FAIL_FILE").read_text().strip():
        raise RuntimeError("this worker says no")

@patch.function("gunicorn_app:message")
def message():
    return "doomed"
"""


class Gunicorn:
    def __init__(self, lp, port: int) -> None:
        gunicorn = Path(sys.executable).with_name("gunicorn")
        self.lp = lp
        self.port = port
        self.proc = subprocess.Popen(
            [
                str(LIVEPATCH),
                "run",
                "--",
                sys.executable,
                str(gunicorn),
                "-w",
                str(WORKERS),
                "-b",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "2",
                "gunicorn_app:application",
            ],
            cwd=FIXTURES,
            env=lp.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self.proc.pid  # `livepatch run` execs: this pid becomes the master
        wait_for(lambda: len(self.agents()) == WORKERS + 1, timeout=30, what="5 agents")

    def agents(self) -> list[int]:
        tree = [self.pid, *discovery.children(self.pid)]
        return [pid for pid in tree if self.lp.socket_of(pid).exists()]

    def workers(self) -> list[int]:
        return [pid for pid in self.agents() if pid != self.pid]

    def get(self) -> str:
        url = f"http://127.0.0.1:{self.port}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def answers(self, n: int = 24) -> set[str]:
        return {self.get().split()[1] for _ in range(n)}

    def stop(self) -> None:
        stop_session(self.proc)


@pytest.fixture
def port() -> int:
    return free_port()


def test_tree_apply_is_all_or_nothing_and_persists(lp, port) -> None:
    server = Gunicorn(lp, port)
    try:
        assert server.answers() == {"old"}
        fix = write_patch(lp.tmp, "fix", FIX)
        code, result = cli_json(lp, "apply", str(fix), "--pid", str(server.pid), "--tree")
        assert code == 0, result
        states = {p["pid"]: p["state"] for p in result["processes"]}
        assert states.pop(server.pid) == "deferred"  # the master never imported the app
        assert sorted(states) == sorted(server.workers()) and set(states.values()) == {"applied"}
        assert server.answers() == {"new"}

        # a worker that dies is replaced by a fork of the master: patched on import
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: victim not in server.agents() and len(server.workers()) == WORKERS,
            timeout=30,
            what="gunicorn to replace the worker",
        )
        (fresh,) = set(server.workers()) - set(states)
        assert server.answers(40) == {"new"}
        code, status = cli_json(lp, "status", "--pid", str(fresh))
        assert [p["name"] for p in status["patches"]] == ["fix-message"]

        # all or nothing: one worker vetoes, every other process is put back
        fail_file = lp.tmp / "fail-pid"
        fail_file.write_text(str(server.workers()[-1]))
        doomed = write_patch(lp.tmp, "doomed", FAILING.replace("FAIL_FILE", str(fail_file)))
        done = cli(lp, "apply", str(doomed), "--pid", str(server.pid), "--tree")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "this worker says no" in done.stderr and "reverted" in done.stderr
        for pid in server.agents():
            code, status = cli_json(lp, "status", "--pid", str(pid))
            names = [p["name"] for p in status["patches"]] + [p["name"] for p in status["pending"]]
            assert "fix-doomed" not in names, (pid, status)
        assert server.answers() == {"new"}
    finally:
        server.stop()

    # persistence: the same program started again comes up with the fix
    again = Gunicorn(lp, port)
    try:
        assert again.answers() == {"new"}
        done = cli(lp, "revert", "fix-message", "--pid", str(again.pid), "--tree")
        assert done.returncode == 0, done.stderr
        assert again.answers() == {"old"}
    finally:
        again.stop()
