"""Who may talk to an agent, and which patches it accepts: modes, SO_PEERCRED, stale
sockets, signatures, the audit trail."""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import struct
import subprocess
import sys

import pytest
from lp_harness import (
    FIXTURES,
    GREET_FIX,
    cli,
    cli_json,
    recv_frame,
    wait_for,
    write_patch,
)

from livepatch.agent import signing

INTRUDER = "lp-intruder"


def test_socket_is_private_and_agent_serves_its_own_user(lp, target) -> None:
    path = lp.socket_of(target.pid)
    dir_mode = stat.S_IMODE(os.stat(path.parent).st_mode)
    sock_mode = stat.S_IMODE(os.stat(path).st_mode)
    assert dir_mode == 0o700 and sock_mode == 0o600
    assert os.stat(path).st_uid == os.getuid()
    # no TCP: the process has no listening inet socket at all
    inodes = {
        os.readlink(f"/proc/{target.pid}/fd/{fd}")
        for fd in os.listdir(f"/proc/{target.pid}/fd")
        if os.readlink(f"/proc/{target.pid}/fd/{fd}").startswith("socket:")
    }
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            assert f"socket:[{fields[9]}]" not in inodes or fields[3] != "0A", line


def test_unsafe_socket_directory_is_refused_and_the_program_still_runs(lp, make_target) -> None:
    loose = lp.short / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    target = make_target(wait_agent=False, LIVEPATCH_SOCKET_DIR=str(loose))
    assert target.ask("greet z") == "hello z"
    assert not any(loose.iterdir())
    target.proc.stdin.close()
    target.proc.wait(timeout=10)
    assert target.proc.stderr.read().count("open to other users") == 1


def _intruder_uid() -> int:
    if os.getuid() != 0:
        pytest.skip("creating a second user needs root; run as root to test SO_PEERCRED")
    try:
        return pwd.getpwnam(INTRUDER).pw_uid
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", INTRUDER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(INTRUDER).pw_uid


def _connect_as(uid: int, path: str) -> dict:
    """Fork, become `uid`, connect to the agent and send hello; report what happened."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result: dict = {}
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(5)
                sock.connect(path)
                body = b'{"op": "status"}'
                try:
                    sock.sendall(struct.pack(">I", len(body)) + body)
                except BrokenPipeError:
                    pass  # refused and closed before we spoke: the reply is still there
                result["reply"] = recv_frame(sock)
            except OSError as exc:
                result["oserror"] = exc.errno
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_another_user_is_refused_and_logged(lp, target) -> None:
    uid = _intruder_uid()
    path = lp.socket_of(target.pid)
    # first line of defence: the private directory keeps the other user out entirely
    outcome = _connect_as(uid, str(path))
    assert outcome.get("oserror") == 13, outcome  # EACCES
    # second line: with the file modes opened up by mistake, SO_PEERCRED still refuses
    os.chmod(lp.short, 0o755)
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o666)
    outcome = _connect_as(uid, str(path))
    reply = outcome.get("reply")
    assert reply is not None and reply["type"] == "error", outcome
    assert reply["code"] == "peer-refused" and str(uid) in reply["message"]
    refusals = [r for r in lp.audit_records() if r["event"] == "connect"]
    assert refusals and refusals[-1]["result"] == "peer-refused"
    assert refusals[-1]["peer_uid"] == uid
    # and the owner is still served
    assert target.ask("greet a") == "hello a"
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert code == 0 and status["pid"] == target.pid


def test_stale_sockets_are_removed_and_reported(lp, make_target) -> None:
    lp.socket_dir.mkdir(parents=True, mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = lp.socket_of(dead.pid)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # the file stays, like after a crash
    assert stale.exists()
    # the CLI says the process is gone rather than trying the dead socket
    done = cli(lp, "status", "--pid", str(dead.pid))
    assert done.returncode == 3 and "no process" in done.stderr
    # a live pid with a socket nobody listens on: the CLI calls the socket stale
    mine = lp.socket_of(os.getpid())
    zombie = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    zombie.bind(str(mine))
    try:
        done = cli(lp, "status", "--pid", str(os.getpid()))
        assert done.returncode == 3 and "stale" in done.stderr, done.stderr
        # the next agent to start cleans up both leftovers
        target = make_target()
        assert not stale.exists() and not mine.exists()
        assert lp.socket_of(target.pid).exists()
    finally:
        zombie.close()


SIDE_EFFECT_FIX = """import livepatch, pathlib
pathlib.Path("MARKER").write_text("executed")
patch = livepatch.Patch("fix-greet", description="shout")

@patch.function("greeter:greet")
def greet(name):
    return "SIGNED " + name
"""


def test_signatures_are_required_once_a_key_is_trusted(lp, make_target) -> None:
    tmp = lp.tmp
    assert cli(lp, "keygen", "--out", str(tmp / "good")).returncode == 0
    signing.generate(tmp / "evil.key", tmp / "evil.pub")
    assert stat.S_IMODE(os.stat(tmp / "good.key").st_mode) == 0o600
    marker = tmp / "marker"
    patch = write_patch(tmp, "fix", SIDE_EFFECT_FIX.replace("MARKER", str(marker)))
    target = make_target(LIVEPATCH_TRUSTED_KEYS=str(tmp / "good.pub"))

    def refused(expect: str) -> None:
        done = cli(lp, "apply", str(patch), "--pid", str(target.pid))
        assert done.returncode == 1, done.stderr
        assert expect in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert target.ask("greet s") == "hello s"
        # the patch file was never executed in the target
        assert not marker.exists()

    refused("only accepts signed patches")
    assert cli(lp, "sign", str(patch), "--key", str(tmp / "evil.key")).returncode == 0
    refused("does not trust")
    assert cli(lp, "sign", str(patch), "--key", str(tmp / "good.key")).returncode == 0
    patch.write_text(patch.read_text() + "\n# changed after signing\n")
    refused("different version")
    good = signing.sign(patch.read_bytes(), tmp / "good.key")
    forged = signing.Signature(good.key_id, good.sha256, bytes(64))
    (tmp / "fix.py.sig").write_text(forged.dumps())
    refused("forged")
    (tmp / "fix.py.sig").write_text(good.dumps())
    done = cli(lp, "apply", str(patch), "--pid", str(target.pid), "--model", "immediate")
    assert done.returncode == 0, done.stderr
    assert target.ask("greet s") == "SIGNED s"
    results = [(r["event"], r["result"]) for r in lp.audit_records()]
    assert results.count(("apply", "bad-signature")) == 4
    assert results[-1] == ("apply", "ok")


def test_audit_log_and_sys_audit_events(lp, make_target) -> None:
    events = lp.tmp / "events.txt"
    target = make_target(TARGET_AUDIT_FILE=str(events))
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    broken = write_patch(lp.tmp, "broken", "raise RuntimeError('boom at load')\n")
    assert cli(lp, "apply", str(patch), "--pid", str(target.pid)).returncode == 0
    assert cli(lp, "apply", str(broken), "--pid", str(target.pid)).returncode == 1
    assert cli(lp, "revert", "fix-greet", "--pid", str(target.pid)).returncode == 0
    records = lp.audit_records()
    assert [(r["event"], r["result"]) for r in records] == [
        ("apply", "ok"),
        ("apply", "bad-patch-file"),
        ("revert", "ok"),
    ]
    first = records[0]
    assert first["patch"] == "fix-greet" and len(first["sha256"]) == 64
    assert first["peer_uid"] == os.getuid() and first["peer_pid"] > 0
    assert first["pid"] == target.pid and first["model"] == "hybrid"
    wait_for(lambda: events.exists() and "livepatch.agent.revert" in events.read_text())
    text = events.read_text()
    assert "livepatch.agent.apply ('fix-greet'" in text
    assert "'bad-patch-file'" in text
    # `livepatch log` reads the same records back
    code, log = cli_json(lp, "log", "--pid", str(target.pid))
    assert code == 0 and [r["event"] for r in log] == ["apply", "apply", "revert"]


TRUSTING_PROGRAM = """
import sys, greeter, livepatch.agent as agent
path = agent.start(trusted_keys=[sys.argv[1]])
assert agent.start() == path  # idempotent
print("ready", flush=True)
for line in sys.stdin:
    print(greeter.greet("k"), flush=True)
"""


def test_start_argument_makes_the_process_require_signatures(lp) -> None:
    signing.generate(lp.tmp / "trusted.key", lp.tmp / "trusted.pub")
    env = {**lp.env, "PYTHONPATH": str(FIXTURES)}
    proc = subprocess.Popen(
        [sys.executable, "-c", TRUSTING_PROGRAM, str(lp.tmp / "trusted.pub")],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        patch = write_patch(lp.tmp, "fix", GREET_FIX)
        done = cli(lp, "apply", str(patch), "--pid", str(proc.pid))
        assert done.returncode == 1 and "only accepts signed patches" in done.stderr
        code, hello = cli_json(lp, "status", "--pid", str(proc.pid))
        assert hello["agent"]["signatures_required"] is True and hello["patches"] == []
        signed = signing.sign(patch.read_bytes(), lp.tmp / "trusted.key")
        (lp.tmp / "fix.py.sig").write_text(signed.dumps())
        assert cli(lp, "apply", str(patch), "--pid", str(proc.pid)).returncode == 0
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "HELLO k"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdin.close()
        proc.stdout.close()


def test_a_socket_served_by_another_process_is_not_trusted(lp) -> None:
    lp.socket_dir.mkdir(parents=True, mode=0o700)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        impostor.bind(str(lp.socket_of(victim.pid)))
        impostor.listen(1)
        patch = write_patch(lp.tmp, "fix", GREET_FIX)
        done = cli(lp, "apply", str(patch), "--pid", str(victim.pid))
        assert done.returncode == 3
        assert f"served by pid {os.getpid()}" in done.stderr
        impostor.settimeout(0.2)
        try:
            conn, _ = impostor.accept()
        except TimeoutError:
            conn = None
        if conn is not None:  # the client connected, found out, and sent nothing
            conn.settimeout(2)
            assert conn.recv(100) == b""
            conn.close()
    finally:
        impostor.close()
        victim.kill()
        victim.wait()


def test_a_process_that_trusts_no_key_never_loads_cryptography() -> None:
    """Loading cryptography's native modules holds the GIL for milliseconds in one C call:
    a target whose agent requires no signature must not pay that inside its first apply."""
    code = (
        "import sys\n"
        "from livepatch.agent import signing\n"
        "assert signing.TrustedKeys().verify(b'patch text', None) is None\n"
        "print('cryptography' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"
