"""The agent's socket server: accept, check the peer, read requests, answer, never crash.

One daemon thread accepts connections on the agent socket; each connection gets its own
daemon thread (at most `MAX_CLIENTS` at once, so a flood of connections cannot exhaust the
host's threads). A connection from a uid other than the process's own or root is answered
with a `peer-refused` error, audited and closed before anything is read from it.

Nothing a client sends can reach the host process: every frame is size-checked before it
is read, decoded and validated before it is acted on, and every exception, including
those raised by patch files, ends as an error reply. A frame that breaks the framing
itself (too large, or the connection closes mid-frame) ends the connection, since the
stream can no longer be trusted; anything else leaves it open for the next request.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from livepatch.agent import paths, protocol
from livepatch.agent.audit import AuditRecord
from livepatch.agent.operations import AgentState, Request, dispatch
from livepatch.agent.peercred import Peer, allowed, peer_of

MAX_CLIENTS = 8
#: a client that sends nothing for this long is disconnected
IDLE_TIMEOUT = 60.0


#: operations that may take a while before their first progress message (loading and
#: planning a patch, its pre_patch callbacks): they get heartbeats
_LONG_OPS = frozenset({"plan", "apply", "revert"})
#: seconds without a message before a heartbeat goes out: more than the transition's
#: own heartbeat (operations.HEARTBEAT), which says more
HEARTBEAT = 1.5


class _Line:
    """The agent's side of one conversation: messages out, from the thread serving the
    request and from its heartbeat, one at a time."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.alive = True
        self.last = time.monotonic()
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> bool:
        with self._lock:
            if not self.alive:
                return False
            try:
                protocol.send(self.conn, message)
            except OSError:
                self.alive = False  # the client left; the operation carries on without it
            self.last = time.monotonic()
            return self.alive


@contextlib.contextmanager
def _heartbeat(line: _Line, *, when: bool) -> Any:
    """While the block runs, a progress message (``{"working": seconds}``) whenever
    nothing went out for :data:`HEARTBEAT`: the client can then tell an agent at work
    (a slow pre_patch callback) from one that cannot run (a thread holding the GIL, which
    keeps this thread off it too)."""
    if not when:
        yield
        return
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(HEARTBEAT / 4) and line.alive:
            if time.monotonic() - line.last >= HEARTBEAT:
                line.send(protocol.progress(working=round(time.monotonic() - start, 1)))

    beating = threading.Thread(target=beat, name="livepatch-agent-heartbeat", daemon=True)
    beating.start()
    try:
        yield
    finally:
        done.set()
        beating.join()


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client has closed its end (nothing more to read, ever)."""
    # poll first: on a socket with a timeout, recv() waits for data whatever its flags
    # (poll, not select: a server holding thousands of connections has fds over 1023)
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    if not poller.poll(0):
        return False  # open, and nothing sent after the request: the usual case
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Agent:
    """The control socket of this process."""

    def __init__(self, state: AgentState, directory: Path) -> None:
        self.state = state
        self.directory = directory
        self.path = paths.socket_path(os.getpid(), directory)
        self.pid = os.getpid()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._closed = threading.Event()

    def start(self) -> None:
        paths.private_dir(self.directory)
        if len(os.fsencode(self.path)) > paths.MAX_SOCKET_PATH:
            raise paths.UnsafeDirectory(
                f"socket path {self.path} is longer than {paths.MAX_SOCKET_PATH} bytes; "
                f"set {paths.SOCKET_DIR_ENV} to a shorter directory"
            )
        remove_stale(self.directory)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # ours from before an exec(), or a dead process's with our pid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.state.socket = str(self.path)
        self._thread = threading.Thread(
            target=self._accept_loop, name="livepatch-agent", daemon=True
        )
        self._thread.start()

    def close(self, unlink: bool = True) -> None:
        """Stop accepting; `unlink=False` in a forked child, whose parent owns the path."""
        self._closed.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            if unlink:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if unlink and os.getpid() == self.pid:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @property
    def running(self) -> bool:
        return self._sock is not None and self._thread is not None and self._thread.is_alive()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if self._closed.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning
                continue
            if not self._slots.acquire(blocking=False):
                self._reply_and_close(
                    conn, protocol.error("agent-busy", "too many clients; try again shortly")
                )
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="livepatch-agent-client", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(IDLE_TIMEOUT)
                peer = peer_of(conn)
                if not allowed(peer):
                    self._refuse_peer(conn, peer)
                    return
                self._conversation(conn, peer)
        except BaseException as exc:  # the host process must never see an agent error
            _warn(f"connection handler failed: {type(exc).__name__}: {exc}")
        finally:
            self._slots.release()

    def _conversation(self, conn: socket.socket, peer: Peer) -> None:
        line = _Line(conn)
        send = line.send
        while line.alive and not self._closed.is_set():
            try:
                message = protocol.recv(conn)
            except protocol.ConnectionClosed:
                return
            except protocol.ProtocolError as exc:
                send(protocol.error_from(exc))
                if isinstance(exc, protocol.FrameTooLarge):
                    return
                continue
            except (TimeoutError, OSError):
                return
            try:
                op, args = protocol.validate(message)
                if _hung_up(conn):
                    self._abandoned(op, args, peer)
                    return
                with _heartbeat(line, when=op in _LONG_OPS):
                    reply = dispatch(self.state, Request(op=op, args=args, peer=peer, send=send))
            except BaseException as exc:
                reply = protocol.error_from(exc)
            send(reply)

    def _abandoned(self, op: str, args: dict[str, Any], peer: Peer) -> None:
        """The client gave up before this request started (its process could not run
        the agent for a while: a thread held the GIL, the process was stopped). An
        operator who pressed Ctrl-C then must not see the patch go in minutes later."""
        if op in ("apply", "revert"):
            self.state.audit.write(
                AuditRecord(
                    event=op,
                    result="abandoned",
                    peer_uid=peer.uid,
                    peer_pid=peer.pid,
                    patch=args.get("name"),  # a revert's; an apply's patch by its hash
                    sha256=hashlib.sha256(args["text"].encode()).hexdigest()
                    if "text" in args else None,
                    model=args.get("model"),
                    message="the client hung up before the agent could start it; not started",
                )
            )

    def _refuse_peer(self, conn: socket.socket, peer: Peer) -> None:
        self.state.audit.write(
            AuditRecord(
                event="connect",
                result="peer-refused",
                peer_uid=peer.uid,
                peer_pid=peer.pid,
                message=f"uid {peer.uid} is neither uid {os.getuid()} nor root",
            )
        )
        self._reply_and_close(
            conn,
            protocol.error(
                "peer-refused",
                f"this agent serves uid {os.getuid()} and root only, not uid {peer.uid}; "
                "run livepatch as the process's user",
            ),
        )

    @staticmethod
    def _reply_and_close(conn: socket.socket, message: dict[str, Any]) -> None:
        with conn:
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)
                protocol.send(conn, message)


def remove_stale(directory: Path) -> list[Path]:
    """Delete sockets of agents that are gone (dead pid, or nobody listening)."""
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = paths.SOCKET_NAME.match(entry.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        if _pid_alive(int(match.group(1))) and _listening(entry):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # cannot tell (e.g. timeout under load): leave it alone
    finally:
        probe.close()
    return True


def _warn(text: str) -> None:
    with contextlib.suppress(Exception):
        print(f"livepatch agent (pid {os.getpid()}): {text}", file=sys.stderr)
