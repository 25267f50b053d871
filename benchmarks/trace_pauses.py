"""Trace where a ticker thread's pauses come from while a 100-function patch is applied.

bench_transition section 2 says how long a ticker thread waits; this says why. It runs
the same scene (a ticker sleeping 0.1 ms at a time, 4 threads calling the patched
functions, apply and revert of a 100-function hybrid patch, 10 cycles) under
``perf record -e sched:sched_switch`` and matches the kernel's context switches with the
patching thread's hand-overs (``livepatch.pace.hand_over``, recorded with where each
was called from). For every ticker gap over 1 ms inside a transition it reports how
long the patching thread was meanwhile on a CPU, asleep in a hand-over, or neither
(waiting for the GIL, or preempted), and the other threads' CPU time. Then the patching
thread's unbroken runs on a CPU of over 0.7 ms during those gaps, by the code between
the hand-overs around them: the stretches to shorten.

Needs Linux, perf, and the right to trace (root, or kernel.perf_event_paranoid <= -1).

    .venv/bin/python benchmarks/trace_pauses.py [--cycles 10] [--model hybrid]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gc
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def scene(cycles: int, model: str, out: Path) -> None:
    """The traced process: the scene of bench_transition section 2, with records."""
    sys.path.insert(0, str(HERE))
    import logging

    import bench_transition as bt

    import livepatch
    from livepatch import pace

    logging.getLogger("livepatch").setLevel(logging.ERROR)
    stop = threading.Event()
    tids: dict[str, int] = {"main": threading.get_native_id()}
    naps: list[tuple[float, float, str]] = []
    hand_over = pace.hand_over

    def recorded() -> None:
        caller = sys._getframe(2)
        where = f"{caller.f_code.co_name}:{caller.f_lineno}"
        start = time.monotonic()
        hand_over()
        naps.append((start, time.monotonic(), where))

    pace.hand_over = recorded  # the Yielder looks it up at each call
    collections_: list[tuple[float, float, int]] = []  # garbage collections in this thread
    started: list[float] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if threading.get_native_id() != tids["main"]:
            return
        if phase == "start":
            started[:] = [time.monotonic()]
        elif started:
            collections_.append((started[0], time.monotonic(), info["generation"]))

    gc.callbacks.append(timed)
    module = bt.module_from(bt.WIDE)
    patch = bt.wide_patch(module, "traced")

    ends, lengths = array("d"), array("d")  # untracked by the collector (see Ticker)

    def ticker() -> None:
        tids["ticker"] = threading.get_native_id()
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.0001)
            now = time.monotonic()
            ends.append(now)
            lengths.append(now - last - 0.0001)
            last = now

    threads = [threading.Thread(target=bt.call_wide, args=(module, stop), daemon=True)
               for _ in range(4)]
    threads.append(threading.Thread(target=ticker, daemon=True))
    for t in threads:
        t.start()
    time.sleep(0.1)
    spans = []
    for _ in range(cycles):
        applied = livepatch.apply(patch, model=model, timeout=10)
        time.sleep(0.02)
        reverted = livepatch.revert(patch.name, model=model, timeout=10)
        time.sleep(0.02)
        spans += [(t._t0, t._t1 or t._t0) for t in (applied, reverted)]
    stop.set()
    for t in threads:
        t.join(5)
    inside = [(end, g) for end, g in zip(ends, lengths, strict=False)
              if g > 0.001 and any(a <= end and end - g <= b for a, b in spans)]
    gc.callbacks.remove(timed)
    out.write_text(json.dumps({"tids": tids, "gaps": inside, "naps": naps,
                               "ticks": len(ends), "collections": collections_}))


SWITCH = re.compile(r"\s*\d+\s+\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:.*"
                    r"prev_pid=(\d+) .*prev_state=(\S+) ==> .*next_pid=(\d+)")


def on_cpu(trace: str) -> dict[int, list[tuple[float, float, str]]]:
    """pid → its runs on a CPU: (start, end, state it left in: S asleep, R preempted)."""
    runs: dict[int, list[tuple[float, float, str]]] = collections.defaultdict(list)
    current: dict[int, tuple[int, float]] = {}
    for line in trace.splitlines():
        m = SWITCH.match(line)
        if not m:
            continue
        cpu, t, prev, state, nxt = int(m[1]), float(m[2]), int(m[3]), m[4], int(m[5])
        if cpu in current and current[cpu][0] == prev:
            runs[prev].append((current[cpu][1], t, state[:1]))
        current[cpu] = (nxt, t)
    return runs


def overlap(spans: list[Any], a: float, b: float) -> float:
    return sum(max(0.0, min(s[1], b) - max(s[0], a)) for s in spans)


def report(data: dict[str, Any], runs: dict[int, list[tuple[float, float, str]]]) -> None:
    main, ticker = data["tids"]["main"], data["tids"]["ticker"]
    naps = [tuple(n) for n in data["naps"]]
    gaps = [(end - g - 0.0001, end) for end, g in data["gaps"]]
    total: dict[str, float] = collections.defaultdict(float)
    for a, b in gaps:
        mine = overlap(runs[main], a, b)
        napping = overlap(naps, a, b)
        total["patching thread on a CPU"] += mine
        total["patching thread in a hand-over"] += napping
        total["patching thread neither"] += max(0.0, (b - a) - mine - napping)
        total["other threads on a CPU"] += sum(
            overlap(r, a, b) for pid, r in runs.items() if pid not in (main, ticker, 0)
        )
        total["gaps"] += b - a
    print(f"{len(gaps)} ticker gaps over 1 ms inside transitions "
          f"(of {data['ticks']} ticks), {total['gaps'] * 1e3:.1f} ms in all; meanwhile:")
    for key in ("patching thread on a CPU", "patching thread in a hand-over",
                "patching thread neither", "other threads on a CPU"):
        print(f"  {key:<32} {total[key] * 1e3:7.1f} ms")
    starts = [n[0] for n in naps]
    stretches: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter[str] = collections.Counter()
    for a, b, state in runs[main]:
        if b - a < 0.0007 or not any(x < b and y > a for x, y in gaps):
            continue
        i = bisect.bisect_left(starts, a)
        before = naps[i - 1][2] if i else "start"
        after = naps[i][2] if i < len(naps) else "end"
        key = f"{before} .. {after}" + (" (preempted)" if state == "R" else "")
        stretches[key] += b - a
        count[key] += 1
    collected = data["collections"]
    by_generation: dict[int, list[float]] = collections.defaultdict(list)
    for a, b, generation in collected:
        by_generation[generation].append(b - a)
    during = sum(1 for a, b, _ in collected if any(x < b and y > a for x, y in gaps))
    print(f"\ngarbage collections in the patching thread: {len(collected)}, "
          f"{during} of them during those gaps")
    for generation, lengths in sorted(by_generation.items()):
        lengths.sort()
        print(f"  generation {generation}: {len(lengths):3d}, median "
              f"{lengths[len(lengths) // 2] * 1e3:.2f} ms, longest {lengths[-1] * 1e3:.2f} ms")
    print("\nthe patching thread's unbroken runs of over 0.7 ms during those gaps, by the "
          "hand-overs around them:")
    for key, seconds in sorted(stretches.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {count[key]:3d} runs, {seconds * 1e3:6.2f} ms: {key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--model", default="hybrid")
    parser.add_argument("--scene", type=Path, help=argparse.SUPPRESS)  # the traced child
    args = parser.parse_args()
    if args.scene:
        scene(args.cycles, args.model, args.scene)
        return
    with tempfile.TemporaryDirectory(prefix="lptrace-") as tmp:
        data_file, perf_file = Path(tmp) / "scene.json", Path(tmp) / "perf.data"
        child = [sys.executable, __file__, "--cycles", str(args.cycles),
                 "--model", args.model, "--scene", str(data_file)]
        try:
            subprocess.run(["perf", "record", "-a", "-q", "-k", "CLOCK_MONOTONIC",
                            "-e", "sched:sched_switch", "-o", str(perf_file), "--", *child],
                           check=True, stdout=subprocess.DEVNULL)
        except OSError as exc:
            sys.exit(f"trace_pauses: cannot run perf ({exc.strerror}); install perf")
        except subprocess.CalledProcessError as exc:
            sys.exit(f"trace_pauses: perf record or the traced scene failed (exit "
                     f"{exc.returncode}, see above); tracing needs root or "
                     "kernel.perf_event_paranoid <= -1")
        trace = subprocess.run(["perf", "script", "-i", str(perf_file), "-F",
                                "tid,cpu,time,event,trace"], check=True,
                               capture_output=True, text=True).stdout
        report(json.loads(data_file.read_text()), on_cpu(trace))


if __name__ == "__main__":
    main()
