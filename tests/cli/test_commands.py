"""The `livepatch` command as a user meets it: help, exit codes, --json, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner
from lp_harness import GREET_FIX, LIVEPATCH, cli, cli_json, write_patch

MINE = ["run", "ps", "apply", "revert", "status", "log", "check", "keygen", "sign", "demo"]


def test_help_lists_commands_and_documents_exit_codes(lp) -> None:
    done = cli(lp, "--help")
    assert done.returncode == 0
    for command in [*MINE, "build", "attach"]:
        assert f"  {command}" in done.stdout, command
    assert "Exit codes:" in done.stdout
    for code in ("0", "1", "2", "3", "4", "5"):
        assert f"\n    {code}  " in done.stdout
    from livepatch.cli import main

    for command in MINE:
        options = {opt for param in main.commands[command].params for opt in param.opts}
        assert "--json" in options, command


def test_check_loads_and_lints_without_a_target(lp) -> None:
    good = write_patch(lp.tmp, "good", GREET_FIX)
    code, report = cli_json(lp, "check", str(good))
    assert code == 0 and report["ok"] and report["name"] == "fix-greet"
    assert report["functions"] == [{"target": "greeter:greet", "expect": None}]
    assert "no expect=" in report["warnings"][0]
    empty = write_patch(lp.tmp, "empty", "import livepatch\np = livepatch.Patch('nothing')\n")
    code, report = cli_json(lp, "check", str(empty))
    assert code == 1 and "replaces no function" in report["problems"][0]
    syntax = write_patch(lp.tmp, "syntax", "import livepatch\ndef (:\n")
    done = cli(lp, "check", str(syntax))
    assert done.returncode == 1 and "syntax error" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = cli(lp, "check", str(lp.tmp / "missing.py"))
    assert done.returncode == 2 and "cannot read patch file" in done.stderr


def test_bad_input_gives_one_line_and_changes_nothing(lp, target) -> None:
    good = write_patch(lp.tmp, "good", GREET_FIX)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cases = [
        (["status", "--pid", str(dead.pid)], 3, "no process"),
        (["apply", str(good), "--pid", str(os.getpid())], 3, "has no livepatch agent"),
        (["revert", "never-applied", "--pid", str(target.pid)], 1, "not applied"),
    ]
    syntax = write_patch(lp.tmp, "syntax", "import livepatch\np = livepatch.Patch('x'\n")
    cases.append((["apply", str(syntax), "--pid", str(target.pid)], 1, "syntax error"))
    raising = write_patch(lp.tmp, "raising", "raise RuntimeError('boom at load')\n")
    cases.append((["apply", str(raising), "--pid", str(target.pid)], 1, "boom at load"))
    notfound = write_patch(
        lp.tmp, "notfound", GREET_FIX.replace("greeter:greet", "greeter:nothing_here")
    )
    cases.append((["apply", str(notfound), "--pid", str(target.pid)], 1, "nothing_here"))
    for args, code, text in cases:
        done = cli(lp, *args)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert text in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert target.ask("greet u") == "hello u"
    # --json failures are one JSON document with the code
    code, answer = cli_json(lp, "apply", str(raising), "--pid", str(target.pid))
    assert code == 1 and answer == {
        "ok": False,
        "code": "bad-patch-file",
        "message": answer["message"],
    }
    code, status = cli_json(lp, "status", "--pid", str(target.pid))
    assert code == 0 and status["patches"] == [] and status["transition"] is None


def test_run_gives_the_program_and_its_children_agents(lp) -> None:
    program = (
        "import os, subprocess, sys, livepatch.agent as a\n"
        "print(os.getpid(), a.running(), flush=True)\n"
        "subprocess.run([sys.executable, '-c', "
        "'import os, livepatch.agent as a; print(os.getpid(), a.running())'])\n"
    )
    done = subprocess.run(
        [str(LIVEPATCH), "run", "--json", "--", sys.executable, "-c", program],
        env=lp.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    header_end = done.stdout.index("}\n") + 2
    header = json.loads(done.stdout[:header_end])
    lines = done.stdout[header_end:].split()
    # exec: the program runs in the very process `livepatch run` started as
    assert lines[:2] == [str(header["pid"]), "True"]
    assert lines[3] == "True" and lines[2] != lines[0]
    done = cli(lp, "run", "--", "no-such-program-xyz")
    assert done.returncode == 2 and "cannot run" in done.stderr


def test_ps_status_and_log_show_applied_patches(lp, target) -> None:
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    assert cli(lp, "apply", str(patch), "--pid", str(target.pid)).returncode == 0
    code, agents = cli_json(lp, "ps")
    mine = [a for a in agents if a["pid"] == target.pid]
    assert code == 0 and mine and mine[0]["patches"] == ["fix-greet"]
    text = cli(lp, "ps").stdout
    assert str(target.pid) in text and "fix-greet" in text
    status = cli(lp, "status", "--pid", str(target.pid)).stdout
    assert "fix-greet" in status and "applied" in status
    # the patch gives no expect=: none of its one function was verified
    assert "VERIFIED" in status and "0/1" in status, status
    log = cli(lp, "log").stdout
    assert "fix-greet" in log and "apply" in log


def test_keygen_and_sign_json(lp) -> None:
    code, key = cli_json(lp, "keygen", "--out", str(lp.tmp / "k"))
    assert code == 0 and key["key_id"].startswith("ed25519:")
    done = cli(lp, "keygen", "--out", str(lp.tmp / "k"))
    assert done.returncode == 2 and "exists" in done.stderr
    patch = write_patch(lp.tmp, "fix", GREET_FIX)
    code, signed = cli_json(lp, "sign", str(patch), "--key", str(lp.tmp / "k.key"))
    assert code == 0 and signed["key_id"] == key["key_id"]
    code, report = cli_json(lp, "check", str(patch), "--key", str(lp.tmp / "k.pub"))
    assert code == 0 and report["signature"].startswith("valid")


def test_a_broken_optional_command_fails_alone() -> None:
    from livepatch import cli as cli_module

    cli_module._register_optional("broken-x", "livepatch.no_such_module", "command")
    try:
        runner = CliRunner()
        result = runner.invoke(cli_module.main, ["broken-x", "--json", "whatever"])
        assert result.exit_code == 1
        assert json.loads(result.output)["code"] == "command-unavailable"
        assert runner.invoke(cli_module.main, ["check", "--help"]).exit_code == 0
    finally:
        cli_module.main.commands.pop("broken-x", None)


def test_progress_says_when_a_transition_is_on_its_way_back(capsys) -> None:
    """After a timeout or a revert the counts run back towards the old code: the line
    says "reversing", not "running"; and no "tasks 0/0" before stop's first check."""
    from livepatch.cli import _Progress

    progress = _Progress("pid 7", enabled=True)
    base = {"state": "running", "elapsed": 0.0, "tasks_total": 0, "tasks_switched": 0,
            "reversed": False, "blockers": []}
    progress.update({"transition": base})
    progress.update({"transition": base | {"tasks_total": 9, "tasks_switched": 8,
                                           "blockers": [{"task": "thread MainThread"}]}})
    progress.update({"transition": base | {"tasks_total": 9, "tasks_switched": 1,
                                           "reversed": True, "elapsed": 30.0}})
    assert capsys.readouterr().out.splitlines() == [
        "pid 7: running 0.00s",
        "pid 7: running tasks 8/9 0.00s blocked by thread MainThread",
        "pid 7: reversing tasks 1/9 30.00s",
    ]
