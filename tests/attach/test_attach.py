"""`livepatch attach`: the agent starts inside a program that did not opt in, answers on
its socket, and the program keeps running; a second attach finds it running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from attach_targets import OURS, TARGET, Target

import livepatch
from livepatch.agent import discovery
from livepatch.agent.attach import AttachFailed, attach
from livepatch.agent.client import AgentClient

pytestmark = pytest.mark.timeout(60)

LIVEPATCH = Path(sys.executable).with_name("livepatch")


def _hello(pid: int, socket: str) -> dict:
    with AgentClient(pid, path=Path(socket), timeout=10) as client:
        return client.request("hello")


@pytest.mark.parametrize("mode", ["sleep", "busy", "asyncio", "join"])
def test_attach_to_a_running_program(spawn, isolated_env, mode):
    target = spawn(OURS, mode)
    target.expect("tick")

    result = attach(target.pid, timeout=20)

    assert result.pid == target.pid and not result.already_running
    assert result.python_version.startswith(OURS + ".")
    assert Path(result.socket_path).parent == Path(isolated_env["LIVEPATCH_SOCKET_DIR"])
    assert 0 < result.elapsed < 20
    hello = _hello(target.pid, result.socket_path)
    assert hello["pid"] == target.pid and hello["python"] == result.python_version
    ticks = [int(target.expect("tick").split()[1]) for _ in range(3)]
    assert ticks == sorted(ticks)
    assert target.alive() and target.stderr == []


def test_attach_to_a_program_blocked_on_a_pipe_then_again(spawn):
    target = spawn(OURS, "pipe")

    first = attach(target.pid, timeout=20)
    again = attach(target.pid, timeout=20)

    assert not first.already_running
    assert again.already_running and again.socket_path == first.socket_path
    assert again.python_version == first.python_version
    target.send("check")
    # the agent serves from its own thread; the program's main thread is untouched
    _, main, alive, others = target.expect("check").split()
    assert (main, alive) == ("main-is-current", "alive")
    # the agent's thread, maybe a connection thread finishing, and no helper left over
    names = others.split(",")
    assert "livepatch-agent" in names
    assert all(name.startswith("livepatch-agent") for name in names), names
    target.send("still here")
    assert target.expect("echo") == "echo still here"
    target.send("exit")
    target.expect("bye")
    assert target.proc.wait(timeout=10) == 0
    assert target.stderr == []


def test_cli_attach_json(spawn, isolated_env):
    target = spawn(OURS, "sleep")
    done = subprocess.run(
        [str(LIVEPATCH), "attach", str(target.pid), "--json", "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        env=isolated_env,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is True and out["pid"] == target.pid and out["already_running"] is False
    assert _hello(target.pid, out["socket_path"])["pid"] == target.pid
    target.expect("tick")


def test_attach_reports_a_target_holding_the_gil_and_the_agent_comes_later(spawn):
    # one C call that never releases the GIL: the helper thread cannot run until it ends
    target = spawn(OURS, "gil", str(6 * 10**7))
    target.expect("holding")

    with pytest.raises(AttachFailed, match="did not report within"):
        attach(target.pid, timeout=0.3)

    target.expect("released", timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket = discovery.find_socket(target.pid)
            break
        except discovery.NoAgent:
            assert time.monotonic() < deadline, "the agent never started"
            time.sleep(0.05)
    assert _hello(target.pid, str(socket))["pid"] == target.pid
    target.expect("tick")


SYSTEM_PYTHON = Path(f"/usr/bin/python{OURS}")
NOBODY = 65534


def _others_can_read(folder: Path) -> bool:
    """Whether a user with no special rights can reach and read `folder`."""
    folder = folder.resolve()
    if not folder.stat().st_mode & 0o004:
        return False
    return all(p.stat().st_mode & 0o001 for p in [folder, *folder.parents])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a target as another user")
@pytest.mark.skipif(
    not SYSTEM_PYTHON.exists(), reason=f"needs {SYSTEM_PYTHON}, which another user can run"
)
def test_root_attaches_to_a_process_of_another_user(isolated_env):
    # the target cannot read our private staging directory unless attach hands it over
    home = Path(tempfile.mkdtemp(prefix="livepatch-nobody-"))
    os.chown(home, NOBODY, NOBODY)
    env = {
        **isolated_env,
        "HOME": str(home),
        "LIVEPATCH_SOCKET_DIR": str(home / "sockets"),
        "LIVEPATCH_STATE_DIR": str(home / "state"),
        "LIVEPATCH_AUDIT_LOG": str(home / "audit.jsonl"),
    }
    # its own copy of the script: a checkout may sit in a directory only we can read
    script = home / TARGET.name
    shutil.copy(TARGET, script)
    os.chown(script, NOBODY, NOBODY)
    argv = [str(SYSTEM_PYTHON), str(script), "sleep"]
    target = Target(argv, env, user=NOBODY, group=NOBODY, extra_groups=[])
    try:
        if not _others_can_read(Path(livepatch.__file__).parent):
            # a checkout in a private directory (mktemp -d): the user cannot import us,
            # and attach must say so and what to do
            with pytest.raises(AttachFailed, match="install livepatch where that user"):
                attach(target.pid, timeout=20)
            return
        result = attach(target.pid, timeout=20)
        socket = Path(result.socket_path)
        assert socket.parent == home / "sockets" and socket.stat().st_uid == NOBODY
        assert _hello(target.pid, result.socket_path)["pid"] == target.pid
        target.expect("tick")
        assert target.stderr == []
    finally:
        target.stop()
        shutil.rmtree(home, ignore_errors=True)


PATCH = """\
import livepatch

patch = livepatch.Patch("attach-price", description="prices triple")


@patch.function("attach_shop:price")
def price(quantity):
    return quantity * 3
"""


def test_a_patch_applies_through_the_attached_agent(spawn, isolated_env, tmp_path):
    # the point of attaching: `livepatch apply` then works on a program that never opted in
    target = spawn(OURS, "pipe")
    target.send("price 5")
    assert target.expect("price") == "price 10"
    attach(target.pid, timeout=20)
    patch_file = tmp_path / "attach_price.py"
    patch_file.write_text(PATCH)

    done = subprocess.run(
        [str(LIVEPATCH), "apply", str(patch_file), "--pid", str(target.pid), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=isolated_env,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    target.send("price 5")
    assert target.expect("price") == "price 15"


def test_a_running_agent_is_reported_even_where_attach_would_refuse(spawn, isolated_env):
    # started with the agent (and opted out of remote debugging): nothing to inject
    env = {"LIVEPATCH_AGENT": "1", "PYTHON_DISABLE_REMOTE_DEBUG": "1"}
    target = spawn(OURS, "sleep", env=env, python=sys.executable)
    target.expect("tick")
    deadline = time.monotonic() + 20
    while not list(Path(isolated_env["LIVEPATCH_SOCKET_DIR"]).glob(f"agent-{target.pid}.sock")):
        assert time.monotonic() < deadline, "LIVEPATCH_AGENT=1 started no agent"
        time.sleep(0.05)

    result = attach(target.pid, timeout=20)

    assert result.already_running and result.python_version.startswith(OURS + ".")
    assert "stub-" not in Path(f"/proc/{target.pid}/maps").read_text()
