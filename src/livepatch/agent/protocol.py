"""The wire protocol between `livepatch` and an agent: length-prefixed JSON messages.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON, which
must be an object. Frames longer than `MAX_FRAME` are refused before they are read, so a
client cannot make the agent allocate more than that.

Requests name an operation with `"op"`; every other key must be one the operation
declares, with the declared type (`validate`). Unknown keys are errors, not ignored, so a
typo in a client never silently changes what a patch does. Replies are objects with a
`"type"`: `"progress"` (zero or more: the transition while one runs, and for a long
operation a `{"working": seconds}` heartbeat after a second without news), then exactly one
`"result"` or `"error"`. Errors carry a stable `code` (the `PatchError.code` of the
refusal, or one of the protocol codes below), a one-line `message`, and whatever the
error's `details` hold (a timeout's `blockers`, the transition as it ended).
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

from livepatch.errors import PatchError

PROTOCOL_VERSION = 1
#: large enough for any reasonable patch file, small enough to refuse before allocating
MAX_FRAME = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")

MODELS = ("immediate", "stop", "two_universe", "hybrid")


class ProtocolError(PatchError):
    """A message broke the protocol (bad frame, bad JSON, bad fields, unknown operation)."""

    code = "bad-message"


class FrameTooLarge(ProtocolError):
    """A frame announced more bytes than `MAX_FRAME`."""

    code = "message-too-large"


class ConnectionClosed(PatchError):
    """The other side closed the connection (between or in the middle of a frame)."""

    code = "connection-closed"


@dataclass(frozen=True)
class Field:
    """One declared field of a request: its JSON type and whether it must be present."""

    types: tuple[type, ...]
    required: bool = False
    choices: tuple[Any, ...] | None = None


_STR = (str,)
_NUM = (int, float)
_BOOL = (bool,)

#: the operations an agent understands and the fields each one takes
OPERATIONS: dict[str, dict[str, Field]] = {
    "hello": {},
    "status": {},
    "plan": {
        "text": Field(_STR, required=True),
        "filename": Field(_STR),
        "signature": Field(_STR),
        "defer": Field(_BOOL),
        "tree_main": Field(_STR),
    },
    "apply": {
        "text": Field(_STR, required=True),
        "filename": Field(_STR),
        "signature": Field(_STR),
        "model": Field(_STR, choices=MODELS),
        "timeout": Field(_NUM),
        "force": Field(_BOOL),
        "persist": Field(_BOOL),
        "defer": Field(_BOOL),
        "tree_main": Field(_STR),
    },
    "revert": {
        "name": Field(_STR, required=True),
        "model": Field(_STR, choices=MODELS),
        "timeout": Field(_NUM),
        "force": Field(_BOOL),
    },
}


def encode(message: dict[str, Any]) -> bytes:
    """One frame holding `message`."""
    body = json.dumps(message, separators=(",", ":"), default=str).encode()
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(
            f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit; "
            "split the patch into smaller patches"
        )
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def recv(sock: socket.socket) -> dict[str, Any]:
    """Read one frame and decode it; raises ProtocolError/ConnectionClosed."""
    header = _read_exactly(sock, _HEADER.size, between_frames=True)
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameTooLarge(f"message of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return decode(_read_exactly(sock, length, between_frames=False))


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"message is not UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object, not {type(message).__name__}")
    return message


def validate(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check a request against `OPERATIONS`; return its op and its arguments."""
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError('request has no "op" string; expected one of ' + _ops())
    spec = OPERATIONS.get(op)
    if spec is None:
        raise ProtocolError(f"unknown operation {op[:40]!r}; expected one of {_ops()}")
    args = {k: v for k, v in message.items() if k not in ("op", "v")}
    unknown = sorted(set(args) - set(spec))
    if unknown:
        names = ", ".join(repr(u[:40]) for u in unknown[:5])
        raise ProtocolError(f"operation {op!r} takes no field {names}")
    for name, field in spec.items():
        if name not in args:
            if field.required:
                raise ProtocolError(f"operation {op!r} needs the field {name!r}")
            continue
        value = args[name]
        # bool is an int subclass: a numeric field must not accept true/false
        if not isinstance(value, field.types) or (
            isinstance(value, bool) and bool not in field.types
        ):
            expected = "/".join(t.__name__ for t in field.types)
            raise ProtocolError(f"field {name!r} of {op!r} must be {expected}")
        if field.choices is not None and value not in field.choices:
            raise ProtocolError(
                f"field {name!r} must be one of {', '.join(map(str, field.choices))}"
            )
    if "timeout" in args and not (0 < args["timeout"] <= 24 * 3600):
        raise ProtocolError("field 'timeout' must be between 0 and 86400 seconds")
    return op, args


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def error_from(exc: BaseException) -> dict[str, Any]:
    code = getattr(exc, "code", None) if isinstance(exc, PatchError) else None
    frame = error(code or "internal-error", _one_line(str(exc)) or exc.__class__.__name__)
    if isinstance(exc, PatchError):
        # never over the frame's own keys; and the frame must stay under MAX_FRAME
        extra = {k: v for k, v in exc.details.items() if k not in frame}
        if extra and len(json.dumps(extra, default=str)) < MAX_FRAME // 4:
            frame.update(extra)
    return frame


def result(**fields: Any) -> dict[str, Any]:
    return {"type": "result", **fields}


def progress(**fields: Any) -> dict[str, Any]:
    return {"type": "progress", **fields}


def _ops() -> str:
    return ", ".join(sorted(OPERATIONS))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:2000]


def _read_exactly(sock: socket.socket, n: int, *, between_frames: bool) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 16))
        if not chunk:
            if between_frames and not chunks:
                raise ConnectionClosed("the other side closed the connection")
            raise ConnectionClosed(
                f"connection closed in the middle of a message ({len(chunks)} of {n} bytes)"
            )
        chunks += chunk
    return bytes(chunks)
