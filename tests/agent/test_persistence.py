"""Patches that outlive a process (per-program records), wait for an import (deferred),
and follow fork() into a child that gets an agent of its own."""

from __future__ import annotations

from lp_harness import GREET_FIX, cli, cli_json, wait_for, write_patch

LAZY_FIX = """import livepatch
patch = livepatch.Patch("fix-lazy", description="new answer")

@patch.function("lazymod:answer")
def answer():
    return "lazy-new"
"""


def test_a_process_started_later_comes_up_with_recorded_patches(lp, make_target) -> None:
    first = make_target()
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    assert cli(lp, "apply", str(patch), "--pid", str(first.pid)).returncode == 0
    records = list((lp.state_dir / "programs").glob("*.json"))
    assert len(records) == 1 and "fix-greet" in records[0].read_text()
    # same program (same command line, same directory), started after the patch
    second = make_target()
    assert second.ask("greet b") == "HELLO b"
    code, status = cli_json(lp, "status", "--pid", str(second.pid))
    assert code == 0 and [p["name"] for p in status["patches"]] == ["fix-greet"]
    # reverting removes the record: the next process starts unpatched, others keep theirs
    assert cli(lp, "revert", "fix-greet", "--pid", str(second.pid)).returncode == 0
    assert second.ask("greet b") == "hello b"
    third = make_target()
    assert third.ask("greet c") == "hello c"
    assert first.ask("greet a") == "HELLO a"
    assert not list((lp.state_dir / "programs").glob("*.json"))


def test_no_persist_leaves_no_record(lp, target) -> None:
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    done = cli(lp, "apply", str(patch), "--pid", str(target.pid), "--no-persist")
    assert done.returncode == 0, done.stderr
    assert not list((lp.state_dir / "programs").glob("*.json"))


def test_patch_for_a_module_not_imported_yet_waits_for_the_import(lp, target) -> None:
    patch = write_patch(lp.tmp, "lazy", LAZY_FIX)
    # without --defer the patch is refused: the module is not loaded here
    done = cli(lp, "apply", str(patch), "--pid", str(target.pid))
    assert done.returncode == 1 and "not imported" in done.stderr
    code, result = cli_json(lp, "apply", str(patch), "--pid", str(target.pid), "--defer")
    assert code == 0 and result["state"] == "deferred"
    assert result["waiting_for"] == ["lazymod"]
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert status["pending"][0]["name"] == "fix-lazy" and status["patches"] == []
    # the import applies it before the module's code can run
    assert target.ask("lazy") == "lazy-new"
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert status["pending"] == [] and [p["name"] for p in status["patches"]] == ["fix-lazy"]
    records = [(r["event"], r["result"]) for r in lp.audit_records()]
    assert records[-2:] == [("apply", "deferred"), ("apply", "ok")]


def test_a_pending_patch_can_be_cancelled(lp, target) -> None:
    patch = write_patch(lp.tmp, "lazy", LAZY_FIX)
    code, _ = cli_json(lp, "apply", str(patch), "--pid", str(target.pid), "--defer")
    assert code == 0
    code, result = cli_json(lp, "revert", "fix-lazy", "--pid", str(target.pid))
    assert code == 0 and result["state"] == "cancelled"
    assert target.ask("lazy") == "lazy-old"


def test_forked_child_gets_its_own_agent_and_inherits_patches(lp, target) -> None:
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    assert cli(lp, "apply", str(patch), "--pid", str(target.pid)).returncode == 0
    child = int(target.ask("fork"))
    try:
        wait_for(lambda: lp.socket_of(child).exists(), what="the child's agent")
        code, status = cli_json(lp, "status", "--pid", str(child))
        assert code == 0 and status["pid"] == child
        assert [p["name"] for p in status["patches"]] == ["fix-greet"]
        # the child is patched and reverted independently of its parent
        assert cli(lp, "revert", "fix-greet", "--pid", str(child)).returncode == 0
        code, status = cli_json(lp, "status", "--pid", str(child))
        assert status["patches"] == []
        assert target.ask("greet p") == "HELLO p"
        code, agents = cli_json(lp, "ps")
        assert {a["pid"] for a in agents} >= {target.pid, child}
    finally:
        import os
        import signal

        os.kill(child, signal.SIGKILL)


LATE_START = """
import threading, greeter, livepatch.agent as agent
agent.start()  # late: greeter is loaded and callable already
for thread in threading.enumerate():
    if thread.name == "livepatch-restore":
        thread.join(20)
print(greeter.greet("x"))
"""


def test_agent_started_late_applies_recorded_patches_to_loaded_modules(lp, make_target) -> None:
    import subprocess
    import sys

    from lp_harness import FIXTURES

    first = make_target(LIVEPATCH_PROGRAM="shared-program")
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    assert cli(lp, "apply", str(patch), "--pid", str(first.pid)).returncode == 0
    env = {**lp.env, "LIVEPATCH_PROGRAM": "shared-program", "PYTHONPATH": str(FIXTURES)}
    done = subprocess.run(
        [sys.executable, "-c", LATE_START], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.stdout.strip() == "HELLO x", done.stderr
    restored = [r for r in lp.audit_records() if r["pid"] != first.pid]
    assert restored and restored[-1]["result"] == "ok"
    assert "restored" in restored[-1]["message"]


def test_a_programs_records_are_named_for_what_the_interpreter_runs(monkeypatch) -> None:
    """The record's file name starts with the module, script or -c the interpreter runs,
    not with an option's value (uvicorn's ``--log-level warning`` once named it
    ``warning-…``); the digest of the whole identity keeps programs apart."""
    from livepatch.agent import persist

    monkeypatch.delenv(persist.PROGRAM_ENV, raising=False)
    names = {}
    for argv in (
        ["python", "-m", "uvicorn", "app:app", "--log-level", "warning"],
        ["python", "-X", "dev", "/srv/bin/gunicorn", "-w", "2", "app:application"],
        ["python", "-c", "import app"],
        ["python", "-mhttp.server", "8000"],
        ["python"],
    ):
        monkeypatch.setattr("sys.orig_argv", argv)
        names[argv[-1]] = persist.program_key().rsplit("-", 1)[0]
    assert names == {
        "warning": "uvicorn",
        "app:application": "gunicorn",
        "import app": "python-c",
        "8000": "http.server",
        "python": "python",
    }
    monkeypatch.setenv(persist.PROGRAM_ENV, "billing api")
    assert persist.program_key().startswith("billing_api-")


MAIN_FIX = """import livepatch
patch = livepatch.Patch("fix-main", description="a function of the script itself")

@patch.function("__main__:_hog")
def _hog(seconds):
    return None
"""


def test_a_patch_of_the_script_itself_applies_but_is_not_recorded(lp, make_target) -> None:
    """A later process defines __main__'s functions only as its script runs, after its
    agent has started: a record would be applied too early, be refused, and leave that
    process unpatched while the operator believes it is. So it is not recorded, and the
    command says so."""
    first = make_target()
    patch = write_patch(lp.tmp, "main", MAIN_FIX)
    done = cli(lp, "apply", str(patch), "--pid", str(first.pid))
    assert done.returncode == 0, done.stderr
    assert "not recorded for later processes of this program" in done.stdout, done.stdout
    assert "move that code into a module" in done.stdout
    code, status = cli_json(lp, "status", "--pid", str(first.pid))
    assert [p["name"] for p in status["patches"]] == ["fix-main"]
    assert not list((lp.state_dir / "programs").glob("*.json"))
    second = make_target()
    code, status = cli_json(lp, "status", "--pid", str(second.pid))
    assert code == 0 and status["patches"] == []
    assert "could not be applied" not in second.stderr()
