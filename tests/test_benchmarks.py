"""The benchmarks still run and print what README and docs quote from them.

Their figures are not checked here (timings belong to benchmarks, not to tests); this
only keeps the scripts from rotting: one short run each, as a user would start it, and
the lines a reader looks for must be there with numbers in them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MS = r"\d+\.\d+ ms"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_bench_transition_pause_and_planning_sections() -> None:
    out = run("bench_transition.py", "--cycles", "1", "--sections", "2,3",
              "--models", "hybrid")
    for label in ("no patching", "whole apply or revert", "inside transition",
                  "inside, 1-function patch", "whole, 1-function patch",
                  "paced busy loop, same CPU", "whole, built patch",
                  "paced busy, built's CPU"):
        assert re.search(rf"^hybrid +{re.escape(label)} +longest gap +{MS[:-3]} / +{MS}",
                         out, re.M), (label, out)
    assert re.search(rf"planning a 100-function patch .*median {MS}", out), out
    assert re.search(rf"old source as expect= .*median {MS}", out), out
    assert re.search(rf"its hybrid transition, no other thread: apply median {MS}", out), out


def test_bench_transition_floor_by_length() -> None:
    out = run("bench_transition.py", "--cycles", "1", "--sections", "5")
    for length in ("1.0", "2.5", "5.0", "10.0", "20.0"):
        assert re.search(rf"^ +{re.escape(length)} ms of CPU time +longest gap {MS}, p75 {MS}, "
                         r"over 1 ms in \d of 3$", out, re.M), (length, out)
    assert re.search(rf"CPU time of the calling thread: apply median {MS[:-3]} ms, "
                     rf"revert median {MS[:-3]} ms", out), out


def test_bench_transition_first_apply_in_fresh_processes() -> None:
    out = run("bench_transition.py", "--cycles", "1", "--sections", "6")
    for label in ("load and apply, first time", "load and apply again", "no patching, as long",
                  "livepatch status, no patching"):
        assert re.search(rf"^ +{re.escape(label)} +{MS[:-3]} / +{MS}$", out, re.M), (label, out)
    assert re.search(r"^ +through the agent \(livepatch run, livepatch apply --pid\):$", out,
                     re.M), out


def test_bench_transition_heap_walks_and_growth() -> None:
    # a smoke test of the script: 400 growth cycles take 10 s per interpreter
    out = run("bench_transition.py", "--sections", "4,7", "--growth-cycles", "40")
    assert re.search(rf"suspended coroutines .*median {MS} over 5", out), out
    assert re.search(rf"suspended greenlets before finalization: {MS} where greenlet is only "
                     rf"imported, {MS} once one was started", out), out
    assert re.search(r"^7\. growth over 40 apply/revert cycles .*: \d+\.\d KiB traced, "
                     r"[+-]\d+ tracked objects$", out, re.M), out


def test_phase_pauses_splits_each_call_at_the_engine_log_lines() -> None:
    out = run("phase_pauses.py", "--cycles", "1")
    for phase in ("apply: from call", "apply: from verified 0 of 100 function(s)",
                  "apply: from starting patch transition", "apply: from returned",
                  "revert: from call", "revert: from starting unpatch transition",
                  "revert: from unpatch transition started"):
        assert re.search(rf"^{re.escape(phase)} +{MS} +longest gap +{MS[:-3]} / +{MS}",
                         out, re.M), (phase, out)
    built = run("phase_pauses.py", "--cycles", "1", "--expect")  # as livepatch build writes it
    assert re.search(r"^apply: from verified 100 of 100 function\(s\) ", built, re.M), built


def test_pair_pace_compares_variants_pairwise() -> None:
    out = run("pair_pace.py", "--cycles", "2", "--variants", "current,every-500us")
    assert re.search(rf"^current +whole call median +{MS}", out, re.M), out
    assert re.search(rf"^every-500us +whole call median +{MS}", out, re.M), out
    # two cycles, an apply and a revert each: four paired windows
    assert re.search(r"every-500us paused less than current in \d of 4 paired windows", out), out


def test_pair_pace_refuses_an_unknown_variant() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pair_pace.py"), "--variants", "nope"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "unknown variant(s) nope" in result.stderr


def test_bench_dispatch_pairs_in_one_process() -> None:
    out = run("bench_dispatch.py", "--paired-only")
    for label in ("trivial", "work", "trivial-generic"):
        assert re.search(rf"^{label} +added +-?\d+ ns +ratio +\d+\.\d\d$", out, re.M), (label, out)
