"""`apply --tree` on trees of other shapes than gunicorn's (real processes).

A multiprocessing program with a spawned pool: its functions are in its script, so the
patch names ``__main__``; the spawned workers run the same script as their ``__main__``,
while multiprocessing's resource tracker runs ``python -c``: the tree skips the tracker (it
runs another program) and patches the rest. Naming the script's module instead
(``pool_app:label``) would wait for an import that never comes: the tree refuses that,
saying what to name.

A shell script that starts Python processes (a container's entrypoint): the shell has
nothing to patch, the tree is the Python processes under it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from lp_harness import LIVEPATCH, cli, cli_json, stop_session, wait_for, write_patch

from livepatch.agent import discovery

FIXTURES = Path(__file__).parent / "fixtures"

FIX = """import livepatch
patch = livepatch.Patch("fix-label")

@patch.function("TARGET", expect="def label(x):\\n    return 'old'\\n")
def label(x):
    return "new"
"""


class Pool:
    """pool_app.py under `livepatch run`: the program, its tracker and 2 workers."""

    def __init__(self, lp: Any) -> None:
        self.lp = lp
        self.out = lp.tmp / "labels.json"
        self.proc = subprocess.Popen(
            [str(LIVEPATCH), "run", "--", sys.executable, str(FIXTURES / "pool_app.py"),
             str(self.out)],
            env=lp.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self.proc.pid  # `livepatch run` execs
        wait_for(lambda: len(self.agents()) == 4 and self.out.exists(), timeout=30,
                 what="the program, its resource tracker and 2 workers, with agents")

    def agents(self) -> list[int]:
        tree = [self.pid, *discovery.children(self.pid)]
        return [pid for pid in tree if self.lp.socket_of(pid).exists()]

    def labels(self) -> set[str]:
        """What the workers answer, from a round that starts after this call."""
        before = self.out.stat().st_mtime_ns
        wait_for(lambda: self.out.stat().st_mtime_ns != before, what="a round of work")
        wait_for(lambda: self.out.stat().st_mtime_ns != before, what="a round of work")
        return set(json.loads(self.out.read_text())["labels"])


def test_a_spawned_pool_is_patched_and_its_resource_tracker_skipped(lp) -> None:
    pool = Pool(lp)
    try:
        assert pool.labels() == {"old"}
        fix = write_patch(lp.tmp, "fix", FIX.replace("TARGET", "__main__:label"))
        code, result = cli_json(lp, "apply", str(fix), "--pid", str(pool.pid), "--tree")
        assert code == 0, result
        states = {p["pid"]: p for p in result["processes"]}
        skipped = [p for p in states.values() if p["state"] == "skipped"]
        assert len(skipped) == 1, result
        assert "python -c" in skipped[0]["reason"], skipped
        assert [p["state"] for p in states.values()].count("applied") == 3, result
        assert pool.labels() == {"new"}  # the workers run the new label()
        # a worker spawned later runs the script afresh: the command says it is not covered
        assert all(p["not_recorded"] for p in states.values() if p["state"] == "applied")

        done = cli(lp, "revert", "fix-label", "--pid", str(pool.pid), "--tree")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"not applied in pid {skipped[0]['pid']}: nothing to revert" in done.stdout
        assert pool.labels() == {"old"}
    finally:
        stop_session(pool.proc)


def test_naming_the_script_as_a_module_is_refused_with_what_to_name(lp) -> None:
    pool = Pool(lp)
    try:
        fix = write_patch(lp.tmp, "fix", FIX.replace("TARGET", "pool_app:label"))
        done = cli(lp, "apply", str(fix), "--pid", str(pool.pid), "--tree")
        assert done.returncode != 0, done.stdout
        assert "no process of the tree" in done.stderr, done.stderr
        assert "name the target __main__:label" in done.stderr, done.stderr
        for pid in pool.agents():  # nothing left pending anywhere
            code, status = cli_json(lp, "status", "--pid", str(pid))
            assert code == 0 and status["pending"] == [] and status["patches"] == [], status

        # asked for, the wait is what the user gets, and the summary says it is a wait
        done = cli(lp, "apply", str(fix), "--pid", str(pool.pid), "--tree", "--defer")
        assert done.returncode == 0, done.stderr
        assert "patched 0 process(es)" in done.stdout and "pending in 4" in done.stdout
        assert pool.labels() == {"old"}
    finally:
        stop_session(pool.proc)


SCRIPT = """import time, shmod
while True:
    time.sleep(0.05)
"""

SH_FIX = """import livepatch
patch = livepatch.Patch("fix-sh")

@patch.function("shmod:label")
def label():
    return "new"
"""


def test_a_shell_starting_python_processes_is_patched_through_them(lp) -> None:
    (lp.tmp / "shmod.py").write_text("def label():\n    return 'old'\n")
    (lp.tmp / "work.py").write_text(SCRIPT)
    python = f"{sys.executable} work.py"
    shell = subprocess.Popen(
        [str(LIVEPATCH), "run", "--", "sh", "-c", f"{python} & {python} & wait"],
        cwd=lp.tmp, env={**lp.env, "PYTHONPATH": str(lp.tmp)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        def pythons() -> list[int]:
            return [p for p in discovery.children(shell.pid) if lp.socket_of(p).exists()]

        wait_for(lambda: len(pythons()) == 2, timeout=30, what="2 Python processes")
        fix = write_patch(lp.tmp, "fix", SH_FIX)
        done = cli(lp, "apply", str(fix), "--pid", str(shell.pid))
        assert done.returncode == 3 and "does not run Python" in done.stderr, done.stderr

        code, result = cli_json(lp, "apply", str(fix), "--pid", str(shell.pid), "--tree")
        assert code == 0, result
        assert sorted(p["pid"] for p in result["processes"]) == sorted(pythons()), result
        assert {p["state"] for p in result["processes"]} == {"applied"}, result
        for pid in pythons():
            code, status = cli_json(lp, "status", "--pid", str(pid))
            assert [p["name"] for p in status["patches"]] == ["fix-sh"], status
        done = cli(lp, "revert", "fix-sh", "--pid", str(shell.pid), "--tree")
        assert done.returncode == 0, done.stderr
    finally:
        stop_session(shell)
