"""The injection itself, on every supported Python: the stub runs its bootstrap in a
sleeping, a busy and an I/O-blocked target, and the target carries on unharmed.

These use the bootstrap's marker mode (it reports and stops before importing livepatch),
so they work for targets of any version, whatever Python runs the tests.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from attach_targets import OURS, VERSIONS, find_python

from livepatch.agent.attach import run_bootstrap
from livepatch.agent.inject_bootstrap import bootstrap_source
from livepatch.agent.inject_probe import probe
from livepatch.agent.inject_stub import SLOT_SIZE, stub_library

pytestmark = pytest.mark.timeout(60)


def _tick(line: str) -> int:
    return int(line.split()[1])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_running_target_runs_the_bootstrap_and_keeps_running(spawn, version, mode):
    target = spawn(version, mode)
    before = _tick(target.expect("tick"))
    info = probe(target.pid)
    assert f"{info.version[0]}.{info.version[1]}" == version

    report = run_bootstrap(info, time.monotonic() + 10, 10, marker=f"m-{mode}")

    assert report["ok"] is True, report
    assert (report["pid"], report["marker"]) == (target.pid, f"m-{mode}")
    # the program goes on where it was: the counter keeps counting and stays consistent
    lines = [target.expect("tick") for _ in range(3)]
    ticks = [_tick(line) for line in lines]
    assert ticks == sorted(ticks) and ticks[0] > before
    assert all("CORRUPT" not in line for line in lines)
    assert target.alive() and target.stderr == []


@pytest.mark.parametrize(("version", "options"), [*((v, ()) for v in VERSIONS), ("3.11", ("-S",))])
def test_target_blocked_on_a_pipe_runs_the_bootstrap_and_exits_cleanly(spawn, version, options):
    # (without site, 3.11 has not imported threading either when the bootstrap comes)
    target = spawn(version, "pipe", options=options)
    target.send("hello")
    assert target.expect("echo") == "echo hello"
    target.send("modules")  # whether the program imported threading by itself
    had_threading = target.expect("modules") == "modules threading"
    info = probe(target.pid)

    report = run_bootstrap(info, time.monotonic() + 10, 10, marker="m-pipe")

    assert report["ok"] is True and report["marker"] == "m-pipe", report
    target.send("hello again")
    assert target.expect("echo") == "echo hello again"
    # the bootstrap imported threading from its helper thread: the main thread must
    # still be the main thread, alive, when the program itself looks
    target.send("check")
    # no other thread is left behind, not even a record of the bootstrap's helper
    assert target.expect("check").split()[1:] == ["main-is-current", "alive", "-"]
    target.send("exit")
    target.expect("bye")
    assert target.proc.wait(timeout=10) == 0
    assert target.stderr == []
    # before 3.13, threading records the importing thread as the main thread: repaired
    assert report["repaired"] is (not had_threading and version != "3.13")


def test_stub_is_built_once_and_cached():
    first = stub_library()
    mtime = first.stat().st_mtime_ns
    assert stub_library() == first and first.stat().st_mtime_ns == mtime
    assert first.stat().st_mode & 0o022 == 0
    assert first.parent.stat().st_mode & 0o077 == 0


def test_bootstrap_fits_its_slot_and_compiles():
    params = {"result": "/x/r.json", "path": ["/a"], "expect_version": [3, 12], "marker": None}
    source = bootstrap_source(params)
    assert len(source.encode()) < SLOT_SIZE
    compile(source, "<bootstrap>", "exec")
    with pytest.raises(TypeError):
        bootstrap_source({"result": object()})


def test_target_whose_libpython_was_replaced_on_disk(spawn, tmp_path):
    # a package upgrade replaces libpython under running processes ("(deleted)" in maps)
    version = OURS  # the probe does not depend on the version; copying libpython is slow
    python = find_python(version)
    if python is None:
        pytest.skip(f"python{version} is not installed")
    libs = [line.split()[-1] for line in _ldd(python) if "libpython" in line]
    if not libs:
        pytest.skip(f"python{version} links libpython statically")
    copy = tmp_path / Path(libs[0]).name
    shutil.copy(libs[0], copy)
    target = spawn(version, "sleep", env={"LD_LIBRARY_PATH": str(tmp_path)})
    target.expect("tick")
    copy.unlink()
    maps = Path(f"/proc/{target.pid}/maps").read_text()
    assert f"{copy} (deleted)" in maps

    info = probe(target.pid)
    report = run_bootstrap(info, time.monotonic() + 10, 10, marker="upgraded")

    assert info.python_binary == f"{copy} (deleted)"
    assert report["marker"] == "upgraded"
    target.expect("tick")
    assert target.alive()


def _ldd(python: str) -> list[str]:
    # find-python may answer with a pyenv shim, a script: ask the interpreter itself
    real = subprocess.run(
        [python, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True
    ).stdout.strip()
    done = subprocess.run(["ldd", real], capture_output=True, text=True, timeout=30)
    return [line.split("(")[0].strip() for line in done.stdout.splitlines() if "=>" in line]
