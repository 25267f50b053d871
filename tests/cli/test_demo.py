"""`make demo` keeps working: run it (with short phases) and check its verdicts."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_fixes_the_service_under_load_without_failed_requests(lp) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "livepatch.demo", "--json"],
        env={**lp.env, "LIVEPATCH_DEMO_PHASE_SECONDS": "1.0"},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] and all(report["checks"].values())
    phases = {p["phase"]: p for p in report["phases"]}
    assert sum(p["failed"] for p in report["phases"]) == 0
    assert phases["before"]["buggy"] > 0 and phases["after apply"]["fixed"] > 0
    assert report["seconds"] < 60
