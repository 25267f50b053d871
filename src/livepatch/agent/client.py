"""The client side of the agent protocol, used by the `livepatch` command.

`AgentClient(pid)` finds and connects to the agent of a process and runs one request at a
time: `request()` returns the result, calling `on_progress` for each progress message in
between. An error reply is raised as `RemoteError`, carrying the agent's code and message
unchanged; losing the connection before the result is raised as `LostConnection`, whose
message tells whether the process is still there; an agent that stays silent is
`on_silence`'s business, and then a `LostConnection` that says why it probably is
(:mod:`livepatch.agent.stall`). Before sending anything, the client
checks with SO_PEERCRED that the process listening on the socket is the pid it asked for.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from livepatch.agent import discovery, protocol, stall
from livepatch.agent.peercred import peer_of
from livepatch.errors import PatchError


class RemoteError(PatchError):
    """The agent answered with an error; `.code` is the agent's code."""

    code = "remote-error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(PatchError):
    """The agent's socket exists but cannot be connected to."""

    code = "agent-unreachable"


class LostConnection(PatchError):
    """The connection ended before the agent answered."""

    code = "connection-lost"


#: seconds of silence from the agent before `on_silence` first hears of it; then every
#: SILENCE_REPEAT seconds. A transition sends progress every few hundred milliseconds
SILENCE_NOTICE = 2.0
SILENCE_REPEAT = 10.0


class AgentClient:
    """A connection to the agent of one process."""

    def __init__(self, pid: int, *, timeout: float = 10.0, path: Path | None = None) -> None:
        self.pid = pid
        self.path = path or discovery.find_socket(pid)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except PermissionError:
            self.sock.close()
            raise Unreachable(
                f"permission denied on {self.path}: the agent of pid {pid} belongs to another "
                "user; run livepatch as that user or as root"
            ) from None
        except (ConnectionRefusedError, FileNotFoundError):
            self.sock.close()
            raise Unreachable(
                f"the agent socket of pid {pid} is stale (nobody listens on {self.path}); "
                "the process may be exiting or stuck — check it with 'livepatch ps'"
            ) from None
        except OSError as exc:
            self.sock.close()
            raise Unreachable(f"cannot connect to the agent of pid {pid}: {exc}") from None
        # The kernel says who listens on the socket. Anyone can name a socket
        # agent-<pid>.sock in a directory of their own: never send a patch to it unless
        # process <pid> itself is the one listening.
        server = peer_of(self.sock)
        if server.pid != pid:
            self.sock.close()
            raise Unreachable(
                f"{self.path} is served by pid {server.pid} (uid {server.uid}), not by "
                f"pid {pid}; remove that socket file or check the pid"
            )

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(
        self,
        op: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        read_timeout: float | None = None,
        on_silence: Callable[[float, str], None] | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        """Send one request; return its result message or raise its error.

        `read_timeout` (default: the connect timeout) is how long the agent may stay
        silent before a message; `on_silence(seconds, why)` hears about a silence every
        :data:`SILENCE_NOTICE` seconds, with what :mod:`stall` makes of it.
        """
        patience = read_timeout if read_timeout is not None else self.sock.gettimeout()
        try:
            protocol.send(self.sock, {"op": op, **args})
            while True:
                self._await_message(patience, on_silence)
                message = protocol.recv(self.sock)
                kind = message.get("type")
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(message)
                    continue
                if kind == "error":
                    error = RemoteError(
                        str(message.get("code", "error")), str(message.get("message", ""))
                    )
                    error.details.update(
                        (k, v) for k, v in message.items() if k not in ("type", "code", "message")
                    )
                    raise error
                if kind == "result":
                    return message
                raise protocol.ProtocolError(f"agent sent a message of unknown type {kind!r}")
        except (protocol.ConnectionClosed, ConnectionResetError, BrokenPipeError):
            raise self._lost() from None
        except TimeoutError:
            raise LostConnection(
                f"the agent of pid {self.pid} did not answer for {patience:g}s: "
                f"{stall.explain(self.pid)}"
            ) from None

    def _await_message(
        self,
        patience: float | None,
        on_silence: Callable[[float, str], None] | None,
    ) -> None:
        """Wait until a message starts to arrive, without reading it (a timeout in the
        middle of a frame would lose the stream); raise TimeoutError after `patience`."""
        self.sock.settimeout(patience)  # for the rest of a frame that has started
        poller = select.poll()  # (not select: a --tree of many processes opens many fds)
        poller.register(self.sock, select.POLLIN)
        start = time.monotonic()
        notice = SILENCE_NOTICE
        while True:
            waited = time.monotonic() - start
            if patience is not None and waited >= patience:
                raise TimeoutError
            steps = [notice - waited] if on_silence is not None else []
            steps += [patience - waited] if patience is not None else []
            wait_ms = max(min(steps), 0.0) * 1000 if steps else None
            if poller.poll(wait_ms):
                return
            waited = time.monotonic() - start
            if on_silence is not None and waited >= notice:
                on_silence(waited, stall.explain(self.pid))
                notice += SILENCE_REPEAT

    def _lost(self) -> LostConnection:
        # An exiting process closes its sockets before it becomes a zombie: give it a
        # moment so the message can say which of the two happened.
        deadline = time.monotonic() + 0.5
        while discovery.process_info(self.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if discovery.process_info(self.pid) is None:
            return LostConnection(
                f"process {self.pid} exited before the agent answered; nothing more to do there"
            )
        return LostConnection(
            f"the agent of pid {self.pid} closed the connection before answering; "
            f"check 'livepatch status --pid {self.pid}'"
        )
