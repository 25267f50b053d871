"""The wire protocol: validation rules, and a real agent facing garbage (it must shrug)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lp_harness import raw_connect, recv_frame, send_frame, wait_for

from livepatch.agent import protocol


def test_validate_accepts_declared_fields_and_rejects_everything_else() -> None:
    assert protocol.validate({"op": "hello"}) == ("hello", {})
    op, args = protocol.validate({"op": "apply", "text": "x", "model": "stop", "timeout": 2})
    assert op == "apply" and args["timeout"] == 2
    bad = [
        {},
        {"op": 3},
        {"op": "format-disk"},
        {"op": "apply"},  # missing text
        {"op": "apply", "text": 1},
        {"op": "apply", "text": "x", "timeout": True},  # bool is not a number here
        {"op": "apply", "text": "x", "timeout": -1},
        {"op": "apply", "text": "x", "timeout": float("inf")},
        {"op": "apply", "text": "x", "model": "yolo"},
        {"op": "status", "extra": 1},
    ]
    for message in bad:
        with pytest.raises(protocol.ProtocolError):
            protocol.validate(message)


def test_frames_round_trip_and_refuse_oversize() -> None:
    frame = protocol.encode({"op": "hello"})
    (length,) = struct.unpack(">I", frame[:4])
    assert protocol.decode(frame[4 : 4 + length]) == {"op": "hello"}
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(b"\xff\xfe")
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(b"[1, 2]")
    with pytest.raises(protocol.FrameTooLarge):
        protocol.encode({"op": "apply", "text": "x" * (protocol.MAX_FRAME + 1)})


def test_agent_answers_garbage_with_errors_and_keeps_serving(lp, target) -> None:
    path = lp.socket_of(target.pid)
    sock = raw_connect(path)
    cases = [
        (b"\x00\x01garbage", "bad-message"),
        (b"[1,2,3]", "bad-message"),
        (b'{"op": "rm -rf"}', "bad-message"),
        (b'{"op": "apply", "text": 42}', "bad-message"),
        (json.dumps({"op": "revert", "name": "nothing-applied"}).encode(), "not-applied"),
    ]
    for body, code in cases:
        send_frame(sock, body)
        reply = recv_frame(sock)
        assert reply is not None and reply["type"] == "error", (body, reply)
        assert reply["code"] == code, reply
        assert reply["message"]
    # the same connection still works after all that
    send_frame(sock, b'{"op": "hello"}')
    reply = recv_frame(sock)
    assert reply is not None and reply["type"] == "result" and reply["pid"] == target.pid
    # an oversized frame is refused before it is read, and ends the connection
    sock.sendall(struct.pack(">I", protocol.MAX_FRAME + 1) + b"x" * 100)
    reply = recv_frame(sock)
    assert reply is not None and reply["code"] == "message-too-large"
    assert recv_frame(sock) is None
    sock.close()
    # a client that hangs up in the middle of a frame does not disturb the agent
    half = raw_connect(path)
    half.sendall(struct.pack(">I", 1000) + b"{")
    half.close()
    # the host process kept running throughout, and the agent still answers
    assert target.ask("greet x") == "hello x"
    fresh = raw_connect(path)
    send_frame(fresh, b'{"op": "status"}')
    reply = recv_frame(fresh)
    assert reply is not None and reply["type"] == "result" and reply["patches"] == []
    fresh.close()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_messages = st.one_of(
    st.binary(max_size=64).map(lambda b: ("raw", b)),
    _json_values.map(lambda v: ("json", v)),
    st.fixed_dictionaries(
        {"op": st.sampled_from(["apply", "plan", "revert", "x", ""])},
        optional={
            "text": _json_values,
            "name": _json_values,
            "model": _json_values,
            "timeout": _json_values,
            "force": _json_values,
            "junk": _json_values,
        },
    ).map(lambda v: ("json", v)),
)


def test_random_messages_get_error_replies_and_the_agent_keeps_serving(lp, target) -> None:
    path = lp.socket_of(target.pid)
    conn = {"sock": raw_connect(path)}
    before = int(target.ask("counter"))

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(_messages)
    def throw(message: tuple[str, object]) -> None:
        kind, value = message
        body = value if kind == "raw" else json.dumps(value).encode()
        assert isinstance(body, bytes)
        send_frame(conn["sock"], body)
        reply = recv_frame(conn["sock"])
        assert reply is not None, f"agent hung up on {body!r}"
        # nothing random is a complete, valid request that can succeed
        assert reply["type"] == "error", (body, reply)
        assert isinstance(reply["code"], str) and reply["message"]

    try:
        throw()
    finally:
        conn["sock"].close()
    # the process was never disturbed: it kept working and its agent still answers
    assert int(target.ask("counter")) > before
    assert target.ask("greet y") == "hello y"
    sock = raw_connect(path)
    send_frame(sock, b'{"op": "hello"}')
    reply = recv_frame(sock)
    assert reply is not None and reply["type"] == "result"
    sock.close()


def test_connection_flood_is_capped_and_the_agent_recovers(lp, target) -> None:
    from livepatch.agent.server import MAX_CLIENTS

    path = lp.socket_of(target.pid)
    idle = [raw_connect(path) for _ in range(MAX_CLIENTS)]
    try:
        # every slot is held by a client that says nothing: the next one is turned away
        extra = raw_connect(path)
        reply = recv_frame(extra)
        assert reply is not None and reply["code"] == "agent-busy"
        extra.close()
    finally:
        for sock in idle:
            sock.close()

    def served() -> bool:
        sock = raw_connect(path)
        try:
            send_frame(sock, b'{"op": "hello"}')
            answer = recv_frame(sock)
            return answer is not None and answer["type"] == "result"
        finally:
            sock.close()

    wait_for(served, timeout=10, what="the agent to serve again")
    assert target.ask("greet f") == "hello f"
