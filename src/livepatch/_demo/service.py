"""The demo HTTP service: GET /quote?item=pear&qty=2 answers with JSON from `shop.quote`.

Listens on 127.0.0.1 on a free port and prints `listening on PORT` when ready. Each
request is handled on its own thread, like a typical threaded WSGI server.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import shop


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)
        try:
            body = shop.quote(query["item"][0], int(query.get("qty", ["1"])[0]))
            status = 200
        except (KeyError, ValueError) as exc:
            body, status = {"error": str(exc)}, 400
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the demo's output readable


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
