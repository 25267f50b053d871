"""Real servers patched under load from the command line: uvicorn (asyncio Tasks, one per
connection, behind ``SafepointASGI``) and gunicorn's threaded worker (a pool of threads
behind ``SafepointWSGI``), on 127.0.0.1.

Clients keep connections alive and send request after request (with uvicorn, long
streaming responses too) while the patch is applied and reverted a few times. Every
request checks that it ran one version from end to end (``fixtures/served_app.py``): a
500 is a request that mixed them. Then the shape every ASGI server has: the lifespan
task lives in the application coroutine for good, so a patch of that coroutine can
never switch it; the command must name it, change nothing, and ``--force`` must work."""

from __future__ import annotations

import collections
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lp_harness import LIVEPATCH, cli, cli_json, free_port, stop_session, wait_for, write_patch

from livepatch.agent import discovery

pytest.importorskip("uvicorn")
pytest.importorskip("gunicorn")
FIXTURES = Path(__file__).parent / "fixtures"

FIX = """import livepatch
patch = livepatch.Patch("fix-served", description="v2 of the wire format")

@patch.function("served_app:encode")
def encode(x):
    return f"v2:{x}"

@patch.function("served_app:decode")
def decode(s):
    tag, _, x = s.partition(":")
    if tag != "v2":
        raise RuntimeError(f"decode v2 got a value from encode {tag}")
    return x

@patch.function("served_app:work")
def work(x):
    s = encode(x)
    time.sleep(0.002)
    return decode(s)

@patch.function("served_app:work_async")
async def work_async(x):
    s = encode(x)
    await asyncio.sleep(0.002)
    return decode(s)

@patch.function("served_app:version")
def version():
    return "v2"
"""

# the application coroutine itself, in which uvicorn's lifespan task waits for good
APP_FIX = """import livepatch
patch = livepatch.Patch("fix-app", description="the ASGI application, lifespan and all")

@patch.function("served_app:app")
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f"app-v2 {await work_async(scope['path'])}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
"""


class Server:
    """``livepatch run -- <server>`` serving fixtures/served_app.py on 127.0.0.1."""

    def __init__(self, lp, kind: str) -> None:
        self.lp, self.port = lp, free_port()
        bind = ["--host", "127.0.0.1", "--port", str(self.port)]
        command = {
            "uvicorn": ["-m", "uvicorn", *bind, "--log-level", "warning", "served_app:asgi"],
            "gunicorn": [str(Path(sys.executable).with_name("gunicorn")), "-w", "1",
                         "-k", "gthread", "--threads", "8", "--graceful-timeout", "2",
                         "-b", f"127.0.0.1:{self.port}", "served_app:wsgi"],
        }[kind]
        self.proc = subprocess.Popen(
            [str(LIVEPATCH), "run", "--", sys.executable, *command],
            cwd=FIXTURES, env=lp.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self.proc.pid  # `livepatch run` execs: this pid is the server
        agents = 2 if kind == "gunicorn" else 1  # gunicorn: the master and its worker
        wait_for(lambda: len(self.agents()) == agents, timeout=30, what="the agents")
        wait_for(self._listening, timeout=30, what="the server to listen")

    def agents(self) -> list[int]:
        tree = [self.pid, *discovery.children(self.pid)]
        return [pid for pid in tree if self.lp.socket_of(pid).exists()]

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def livepatch(self, *args: str) -> tuple[int, dict]:
        return cli_json(self.lp, *args, "--pid", str(self.pid), "--tree", timeout=60)

    def stop(self) -> str:
        return stop_session(self.proc)


class Clients:
    """Keep-alive clients sending request after request, and (uvicorn) streaming ones:
    counts each answer by its version, and keeps what every bad answer said."""

    def __init__(self, port: int, requests: int, streams: int) -> None:
        self.port, self.stopping = port, threading.Event()
        self.seen: collections.Counter[str] = collections.Counter()
        self.bad: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._requests, args=(i,), daemon=True)
                        for i in range(requests)]
        self.threads += [threading.Thread(target=self._streams, daemon=True)
                         for _ in range(streams)]
        for t in self.threads:
            t.start()

    def _note(self, line: str, status: int = 200) -> None:
        version, _, rest = line.partition(" ")
        with self._lock:
            if status != 200 or version not in ("v1", "v2"):
                self.bad.append(f"{status} {line}")
            else:
                self.seen[version] += 1

    def _requests(self, me: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        n = 0
        while not self.stopping.is_set():
            n += 1
            conn.request("GET", f"/c{me}-{n}")
            response = conn.getresponse()
            self._note(response.read().decode(), response.status)

    def _streams(self) -> None:
        while not self.stopping.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
            conn.request("GET", "/stream")
            response = conn.getresponse()
            for line in response.read().decode().splitlines():
                self._note(line)
            conn.close()

    def finish(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)
            assert not t.is_alive(), "a client never got its answer"


@pytest.mark.parametrize(
    ("kind", "model"),
    [("uvicorn", "hybrid"), ("uvicorn", "two_universe"), ("gunicorn", "hybrid")],
)
def test_no_request_mixes_versions_while_a_server_under_load_is_patched(lp, kind, model):
    server = Server(lp, kind)
    fix = write_patch(lp.tmp, "fix", FIX)
    clients = Clients(server.port, requests=8, streams=2 if kind == "uvicorn" else 0)
    try:
        wait_for(lambda: clients.seen["v1"] > 50, what="traffic")
        for _ in range(2):
            code, applied = server.livepatch("apply", str(fix), "--model", model)
            assert code == 0, json.dumps(applied, indent=1)
            outcome = {p["pid"]: p["state"] for p in applied["processes"]}
            assert "applied" in outcome.values(), outcome
            before = clients.seen["v2"]
            wait_for(lambda b=before: clients.seen["v2"] > b + 50, what="v2 answers")
            code, reverted = server.livepatch("revert", "fix-served", "--model", model)
            assert code == 0, json.dumps(reverted, indent=1)
            before = clients.seen["v1"]
            wait_for(lambda b=before: clients.seen["v1"] > b + 50, what="v1 answers")
        clients.finish()
    finally:
        clients.stopping.set()
        log = server.stop()
    assert clients.bad == [], clients.bad[:5]
    assert clients.seen["v1"] > 150 and clients.seen["v2"] > 100, clients.seen
    assert "Traceback" not in log, log


def test_two_universe_on_gunicorn_names_the_thread_that_never_serves_a_request(lp):
    """The threaded worker's main thread runs the accept loop: it never passes a request
    boundary, so a strict two_universe transition cannot move it. It times out naming
    that thread (structured in --json too), and every process is as it was."""
    server = Server(lp, "gunicorn")
    fix = write_patch(lp.tmp, "fix", FIX)
    clients = Clients(server.port, requests=8, streams=0)
    try:
        wait_for(lambda: clients.seen["v1"] > 50, what="traffic")
        code, failed = server.livepatch(
            "apply", str(fix), "--model", "two_universe", "--timeout", "2")
        assert code == 1, json.dumps(failed, indent=1)
        (worker,) = [p for p in failed["processes"] if p["state"] == "failed"]
        assert worker["code"] == "transition-timeout"
        assert "MainThread" in worker["error"] and "model='hybrid'" in worker["error"]
        blocking = {b["task"].split(" (")[0]: b["frames"] for b in worker["blockers"]}
        assert blocking == {"thread MainThread": ["(waiting for a safe point)"]}, blocking
        # the transition as it ended, not the last progress on its way back
        assert worker["transition"]["state"] == "reversed", worker["transition"]
        for pid in server.agents():
            code, status = cli_json(lp, "status", "--pid", str(pid))
            assert code == 0 and status["patches"] == [] and status["transition"] is None
        # the switched pool threads served v2 meanwhile; now they are all back on v1
        seen, new = clients.seen["v1"], clients.seen["v2"]
        wait_for(lambda: clients.seen["v1"] > seen + 50, what="v1 answers after")
        assert clients.seen["v2"] == new, clients.seen
        clients.finish()
    finally:
        clients.stopping.set()
        log = server.stop()
    assert clients.bad == [], clients.bad[:5]
    assert "Traceback" not in log, log


def test_the_lifespan_task_in_the_patched_asgi_app_is_named_and_force_moves_it(lp):
    server = Server(lp, "uvicorn")
    fix = write_patch(lp.tmp, "app", APP_FIX)
    try:
        started = time.monotonic()
        done = cli(lp, "apply", str(fix), "--pid", str(server.pid), "--timeout", "1")
        assert done.returncode == 1, done.stderr
        assert time.monotonic() - started < 20
        # one line: who blocks, where, and what to do; the server is as it was
        (error,) = [line for line in done.stderr.splitlines() if line.startswith("livepatch:")]
        assert "timed out" in error and "served_app.py:" in error and " in app" in error
        assert "force" in error
        code, failed = cli_json(lp, "apply", str(fix), "--pid", str(server.pid),
                                "--timeout", "1")
        assert code == 1 and failed["code"] == "transition-timeout", failed
        (blocker,) = failed["blockers"]  # the lifespan task, where it waits
        (frame,) = blocker["frames"]
        assert blocker["task"].startswith("task ") and frame.endswith(" in app"), blocker
        assert failed["transition"]["state"] == "reversed", failed["transition"]
        code, status = cli_json(lp, "status", "--pid", str(server.pid))
        assert code == 0 and status["patches"] == [] and status["transition"] is None
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/x")
        assert conn.getresponse().read().decode() == "v1 /x"

        code, forced = cli_json(lp, "apply", str(fix), "--pid", str(server.pid), "--force")
        assert code == 0, forced
        code, status = cli_json(lp, "status", "--pid", str(server.pid))
        (patch,) = status["patches"]
        assert patch["name"] == "fix-app" and patch["forced"], patch
        conn.request("GET", "/y")
        assert conn.getresponse().read().decode() == "app-v2 /y"
        conn.close()
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
