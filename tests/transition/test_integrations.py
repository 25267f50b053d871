"""Request boundaries are safe points: WSGI and ASGI middlewares switch a busy server."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import livepatch
from livepatch.integrations import SafepointASGI, SafepointWSGI

from .conftest import patch_for

TARGET = """
import threading
HOLD = threading.Event()
HELD = threading.Event()

def hold():
    HELD.set()
    HOLD.wait(10)

def version():
    return "v1"
"""

PATCH = """
@patch.function("M:hold")
def hold():
    HELD.set()
    HOLD.wait(10)

@patch.function("M:version")
def version():
    return "v2"
"""


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_wsgi_request_boundary_switches_the_worker_thread(tmp_module):
    m = tmp_module(TARGET)
    patch = patch_for(m, "wsgi", PATCH)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [m.version().encode()]

    server = make_server("127.0.0.1", 0, SafepointWSGI(app), handler_class=_Quiet)
    url = f"http://127.0.0.1:{server.server_port}/"
    serving = threading.Thread(target=server.serve_forever, args=(0.01,), name="lptest-wsgi")
    holder = threading.Thread(target=m.hold, name="lptest-hold")
    serving.start()
    try:
        assert urllib.request.urlopen(url, timeout=5).read() == b"v1"
        holder.start()
        assert m.HELD.wait(5)
        t = livepatch.apply(patch, model="two_universe", wait=False)
        time.sleep(0.05)
        names = [b.task for b in t.blockers]
        assert any("lptest-wsgi" in n for n in names), names  # behind until a request
        # the request starts with a safe point: the server thread switches, serves v2
        assert urllib.request.urlopen(url, timeout=5).read() == b"v2"
        deadline = time.monotonic() + 5
        while any("lptest-wsgi" in b.task for b in t.blockers):
            assert time.monotonic() < deadline, t.blockers
            time.sleep(0.01)
    finally:
        m.HOLD.set()
        holder.join(5) if holder.ident else None
        server.shutdown()
        serving.join(5)
        server.server_close()
    t.wait(10)
    assert t.state.value == "complete"


def test_asgi_request_boundary_switches_the_connection_task(tmp_module):
    """(An idle connection task would also be switched by its loop's "fake signal"; the
    middleware makes the switch happen at the request boundary itself.)"""
    m = tmp_module(TARGET)
    patch = patch_for(m, "asgi", PATCH)
    bodies: list[bytes] = []
    switched = threading.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": m.version().encode()})

    wrapped = SafepointASGI(app)

    async def one_request() -> bytes:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await wrapped({"type": "http", "method": "GET", "path": "/"}, receive, send)
        return sent[-1]["body"]

    async def connection(go: asyncio.Event) -> None:
        # a keep-alive connection: one task serving request after request
        bodies.append(await one_request())
        await go.wait()
        bodies.append(await one_request())
        switched.set()

    async def main() -> None:
        go = asyncio.Event()
        task = asyncio.ensure_future(connection(go))
        while not bodies:
            await asyncio.sleep(0.001)
        # wait until the transition has recorded the tasks (it is visible from its start)
        while (livepatch.transition() is None) or not livepatch.transition().tasks_total:
            await asyncio.sleep(0.001)
        go.set()
        await task

    loop_thread = threading.Thread(target=lambda: asyncio.run(main()), name="lptest-asgi")
    holder = threading.Thread(target=m.hold, name="lptest-hold")
    loop_thread.start()
    holder.start()
    try:
        assert m.HELD.wait(5)
        deadline = time.monotonic() + 5
        while not bodies:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        t = livepatch.apply(patch, model="two_universe", wait=False)
        assert switched.wait(5)
    finally:
        m.HOLD.set()
        holder.join(5)
        loop_thread.join(5)
    t.wait(10)
    assert bodies == [b"v1", b"v2"]
