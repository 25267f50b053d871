"""Trace why a ticker thread waits while a patch is applied: who held the GIL meanwhile.

bench_transition section 2 measures a ticker thread's gaps while a 100-function patch is
applied and reverted; this says where they come from. It runs the same scene (a ticker
sleeping 0.1 ms at a time, 4 threads calling the patched functions, hybrid apply and
revert, 10 cycles) with uprobes on CPython's own ``take_gil`` and ``drop_gil``
(``perf probe``), so it knows, for every thread, when it asked for the GIL, got it and
dropped it. The patching thread's hand-overs (``livepatch.pace.hand_over``, with where
each was called from) and its garbage collections are recorded in the process.

It reports:

1. Per transition and per apply/revert call (median / max over them), the ticker's
   longest gap and its longest wait for the GIL. The wait is the share of a pause that
   the process's threads cause; the rest of a gap is the ticker's sleep running late.
2. For the ticker's waits over 0.5 ms inside transitions (``--within calls``: inside
   whole apply/revert calls; ``--within after``: in the 20 ms after each), who had the
   GIL meanwhile:
   - the patching thread, by the code between the hand-overs around each hold, marked
     ``[gc]`` where a collection ran in it;
   - the other threads;
   - nobody: the GIL was dropped but not taken yet, because the thread woken to take it
     was not running yet. On a VM this is often a halted virtual CPU being woken up.
3. The garbage collections in the patching thread.

``--functions 1`` traces a one-function patch, the least any transition does.
``--expect`` gives every function its old source as ``expect=``, as ``livepatch build``
writes a patch (planning then compiles and compares each).
``--callers 0`` leaves out the calling threads.

Needs Linux, perf with uprobes, and the right to trace (root). The probes are added under
the group ``lptrace`` and removed at the end.

    .venv/bin/python benchmarks/trace_pauses.py [--cycles 10] [--functions 100] [--callers 4]
        [--expect] [--within transitions|calls|after]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gc
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GROUP = "lptrace"
#: the probes (perf names a return probe NAME__return): asked for, got, dropped the GIL
PROBES = {"take": "take_gil", "take__return": "take_gil%return", "drop": "drop_gil"}
#: a wait of the ticker this long or longer is looked into
LONG_WAIT = 0.0005
#: the windows whose long waits --within looks into
WITHIN = {"transitions": "transitions", "calls": "apply/revert calls",
          "after": "the 20 ms after each apply/revert"}


def scene(
    cycles: int, model: str, functions: int, callers: int, expect: bool, out: Path
) -> None:
    """The traced process: bench_transition section 2's scene, with records."""
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
    collected: list[tuple[float, float, int]] = []  # garbage collections in this thread
    started: list[float] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if threading.get_native_id() != tids["main"]:
            return
        if phase == "start":
            started[:] = [time.monotonic()]
        elif started:
            collected.append((started[0], time.monotonic(), info["generation"]))

    gc.callbacks.append(timed)
    module = bt.module_from(bt.WIDE)
    patch = bt.wide_patch(module, "traced", functions, expect)

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
               for _ in range(callers)]
    threads.append(threading.Thread(target=ticker, daemon=True))
    for t in threads:
        t.start()
    time.sleep(0.1)
    spans, calls = [], []
    for _ in range(cycles):
        start = time.monotonic()
        applied = livepatch.apply(patch, model=model, timeout=10)
        calls.append((start, time.monotonic()))
        time.sleep(0.02)
        start = time.monotonic()
        reverted = livepatch.revert(patch.name, model=model, timeout=10)
        calls.append((start, time.monotonic()))
        time.sleep(0.02)
        spans += [(t._t0, t._t1 or t._t0) for t in (applied, reverted)]
    stop.set()
    for t in threads:
        t.join(5)
    gc.callbacks.remove(timed)
    ticks = [(end, g) for end, g in zip(ends, lengths, strict=False)
             if any(a <= end and end - g <= b for a, b in calls)]
    out.write_text(json.dumps({"tids": tids, "ticks": ticks, "naps": naps, "spans": spans,
                               "calls": calls, "collections": collected}))


def interpreter_binary() -> str:
    """Where this interpreter's take_gil lives: libpython if it is a shared build."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("INSTSONAME")
        if lib.exists():
            return str(lib)
    return os.path.realpath(sys.executable)


def add_probes(binary: str) -> None:
    remove_probes()
    for name, spec in PROBES.items():
        name = name.removesuffix("__return")
        subprocess.run(["perf", "probe", "-q", "-x", binary, "-a", f"{GROUP}:{name}={spec}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def remove_probes() -> None:
    subprocess.run(["perf", "probe", "-q", "-d", f"{GROUP}:*"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


EVENT = re.compile(rf"\s*(\d+)\s+([\d.]+):\s+{GROUP}:(\w+):")


class GIL:
    """Who held the GIL when, and each thread's waits for it, from the probes."""

    def __init__(self, trace: str) -> None:
        self.holds: list[tuple[float, float, int]] = []  # (got it, dropped it, thread)
        self.waits: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
        asked: dict[int, float] = {}
        holding: dict[int, float] = {}
        for line in trace.splitlines():
            m = EVENT.match(line)
            if m is None:
                continue
            tid, t, what = int(m[1]), float(m[2]), m[3]
            if what == "take":
                asked[tid] = t
            elif what == "take__return":
                holding[tid] = t
                if tid in asked:
                    self.waits[tid].append((asked.pop(tid), t))
            elif what == "drop" and tid in holding:
                self.holds.append((holding.pop(tid), t, tid))
        self.holds.sort()
        self._starts = [h[0] for h in self.holds]

    def during(self, a: float, b: float) -> list[tuple[float, float, int]]:
        """The holds overlapping [a, b], cut to it."""
        i = max(0, bisect.bisect_left(self._starts, a) - 1)
        cut = []
        for x, y, tid in self.holds[i:]:
            if x >= b:
                break
            if y > a:
                cut.append((max(x, a), min(y, b), tid))
        return cut


def percentiles(xs: list[float]) -> str:
    xs = sorted(xs) or [0.0]
    return f"{xs[len(xs) // 2] * 1e3:5.2f} / {xs[-1] * 1e3:5.2f} ms"


def report(data: dict[str, Any], gil: GIL, within: str = "transitions") -> None:
    main, ticker = data["tids"]["main"], data["tids"]["ticker"]
    waits = gil.waits[ticker]
    print("per window, median / max over the windows:")
    for label, windows in (("each transition", data["spans"]),
                           ("each apply or revert", data["calls"])):
        gaps = [max((g for end, g in data["ticks"] if a <= end and end - g <= b),
                    default=0.0) for a, b in windows]
        longest = [max((y - x for x, y in waits if a <= y and x <= b), default=0.0)
                   for a, b in windows]
        print(f"  {label:<21} longest gap {percentiles(gaps)}; "
              f"longest wait for the GIL {percentiles(longest)}")

    windows = {"transitions": data["spans"], "calls": data["calls"],
               "after": [(b, b + 0.02) for a, b in data["calls"]]}[within]

    def inside(a: float, b: float) -> bool:
        return any(s < b and e > a for s, e in windows)

    long_waits = [(a, b) for a, b in waits if b - a >= LONG_WAIT and inside(a, b)]
    naps = data["naps"]
    nap_starts = [n[0] for n in naps]
    collections_ = data["collections"]
    who: dict[str, float] = collections.defaultdict(float)
    regions: dict[str, float] = collections.defaultdict(float)
    longest_free = 0.0

    def region_of(x: float, y: float) -> str:
        """The hand-overs around a hold of the patching thread, and [gc] if one ran in it."""
        i = bisect.bisect_left(nap_starts, x)
        region = (f"{naps[i - 1][2] if i else 'start'} .. "
                  f"{naps[i][2] if i < len(naps) else 'end'}")
        if any(s < y and e > x for s, e, _ in collections_):
            region += " [gc]"
        return region

    for a, b in long_waits:
        cursor = a
        for x, y, tid in gil.during(a, b):
            if x > cursor:
                who["nobody (dropped, not yet taken)"] += x - cursor
                longest_free = max(longest_free, x - cursor)
            cursor = max(cursor, y)
            if tid != main:
                who["other threads"] += y - x
                continue
            who["the patching thread"] += y - x
            regions[region_of(x, y)] += y - x
        if b > cursor:
            who["nobody (dropped, not yet taken)"] += b - cursor
            longest_free = max(longest_free, b - cursor)
    total = sum(b - a for a, b in long_waits)
    print(f"\nthe ticker's {len(long_waits)} waits for the GIL of over {LONG_WAIT * 1e3:g} ms "
          f"inside {WITHIN[within]}, "
          f"{total * 1e3:.1f} ms in all; meanwhile the GIL was held by:")
    for key in ("the patching thread", "other threads", "nobody (dropped, not yet taken)"):
        print(f"  {key:<32} {who[key] * 1e3:7.1f} ms")
    print(f"  (the longest stretch with nobody holding it: {longest_free * 1e3:.2f} ms)")
    holds = sorted((y - x, x) for a, b in windows for x, y, tid in gil.during(a, b)
                   if tid == main)
    held = [length for length, _ in holds]
    if held:
        print(f"\nevery hold of the GIL by the patching thread inside {WITHIN[within]}: "
              f"{len(held)}, median {held[len(held) // 2] * 1e3:.3f} ms, "
              f"90th percentile {held[int(0.9 * (len(held) - 1))] * 1e3:.3f} ms, "
              f"longest {held[-1] * 1e3:.2f} ms, {sum(h > 0.001 for h in held)} over 1 ms")
        print("  the longest, by the hand-overs around them: " + "; ".join(
            f"{length * 1e3:.2f} ms {region_of(x, x + length)}" for length, x in holds[-6:][::-1]))
    print("\nthe patching thread's holds in those waits, by the hand-overs around them:")
    for region, seconds in sorted(regions.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {seconds * 1e3:6.2f} ms  {region}")
    by_generation: dict[int, list[float]] = collections.defaultdict(list)
    for a, b, generation in collections_:
        by_generation[generation].append(b - a)
    print(f"\ngarbage collections in the patching thread: {len(collections_)}")
    for generation, lengths in sorted(by_generation.items()):
        print(f"  generation {generation}: {len(lengths):3d}, median / longest "
              f"{percentiles(lengths)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--model", default="hybrid")
    parser.add_argument("--functions", type=int, default=100, help="patched functions (1-100)")
    parser.add_argument("--callers", type=int, default=4, help="threads calling them")
    parser.add_argument("--expect", action="store_true",
                        help="each function gives its old source as expect= (a built patch)")
    parser.add_argument("--within", choices=WITHIN, default="transitions",
                        help="whose long waits to look into: inside transitions, inside "
                        "whole apply/revert calls (planning included), or in the 20 ms after "
                        "each call")
    parser.add_argument("--scene", type=Path, help=argparse.SUPPRESS)  # the traced child
    args = parser.parse_args()
    if not 1 <= args.functions <= 100:
        parser.error("--functions must be between 1 and 100")
    if args.scene:
        scene(args.cycles, args.model, args.functions, args.callers, args.expect, args.scene)
        return
    binary = interpreter_binary()
    with tempfile.TemporaryDirectory(prefix="lptrace-") as tmp:
        data_file, perf_file = Path(tmp) / "scene.json", Path(tmp) / "perf.data"
        child = [sys.executable, __file__, "--cycles", str(args.cycles), "--model",
                 args.model, "--functions", str(args.functions), "--callers",
                 str(args.callers), *(["--expect"] if args.expect else []), "--scene",
                 str(data_file)]
        events = [arg for name in PROBES for arg in ("-e", f"{GROUP}:{name}")]
        try:
            add_probes(binary)
            subprocess.run(["perf", "record", "-a", "-q", "-m", "8M", "-k", "CLOCK_MONOTONIC",
                            *events, "-o", str(perf_file), "--", *child],
                           check=True, stdout=subprocess.DEVNULL)
            trace = subprocess.run(["perf", "script", "-i", str(perf_file), "-F",
                                    "tid,time,event"], check=True, capture_output=True,
                                   text=True).stdout
        except OSError as exc:
            sys.exit(f"trace_pauses: cannot run perf ({exc.strerror}); install perf")
        except subprocess.CalledProcessError as exc:
            sys.exit(f"trace_pauses: {' '.join(exc.cmd[:3])} failed (exit {exc.returncode}); "
                     f"tracing needs root and uprobes on {binary}")
        finally:
            remove_probes()
        print(f"Python {sys.version.split()[0]}; {args.cycles} apply+revert cycles of a "
              f"{args.functions}-function {args.model} patch"
              f"{' with expect=' if args.expect else ''}, {args.callers} calling threads\n")
        report(json.loads(data_file.read_text()), GIL(trace), args.within)


if __name__ == "__main__":
    main()
