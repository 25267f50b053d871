"""Where in an apply or revert call a thread's longest pauses fall, phase by phase.

Section 2's scene of ``bench_transition.py``: a 100-function patch applied and reverted
while 4 threads call its functions, and a ticker thread that sleeps 0.1 ms at a time
records its gaps. Each call is cut into phases at the engine's own log lines (each phase
logs a stable line): from the call to "verified" (planning), from there to "starting ...
transition", to "transition started" (building trampolines, installing, the first check),
to "completed", and the 20 ms after the call returns. Per phase: its median length, the
median and max over the calls of the ticker's longest gap overlapping it, and in how many
calls that gap was over 1 ms. A phase whose gaps stand out from the others holds the GIL
too long somewhere; ``trace_pauses.py`` (root) says exactly who held it.

``--expect`` gives every function its old source as ``expect=``, as ``livepatch build``
writes a patch.

    .venv/bin/python benchmarks/phase_pauses.py [--cycles 30] [--expect]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
from collections import defaultdict

import bench_transition as bt

import livepatch


class Marks(logging.Handler):
    """Each livepatch log line's time, as it is emitted."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # the patch name and model vary; the phase is what follows the name
        phase = record.getMessage().split(": ", 2)[-1]
        for end in (" (", ";"):
            phase = phase.split(end)[0]
        self.marks.append((time.monotonic(), phase))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--expect", action="store_true",
                        help="each function gives its old source as expect= (a built patch)")
    args = parser.parse_args()
    marks = Marks()
    logger = logging.getLogger("livepatch")
    logger.setLevel(logging.INFO)
    logger.addHandler(marks)
    logger.propagate = False
    module = bt.module_from(bt.WIDE)
    patch = bt.wide_patch(module, "phases", expect=args.expect)
    gaps: dict[str, list[float]] = defaultdict(list)
    lengths: dict[str, list[float]] = defaultdict(list)
    with bt.wide_callers(module):
        for _ in range(args.cycles):
            with bt.Ticker() as ticker:
                for action in ("apply", "revert"):
                    marks.marks[:] = [(time.monotonic(), "call")]
                    if action == "apply":
                        livepatch.apply(patch, model="hybrid", timeout=10)
                    else:
                        livepatch.revert(patch.name, model="hybrid", timeout=10)
                    marks.marks.append((time.monotonic(), "returned"))
                    time.sleep(0.02)
                    marks.marks.append((time.monotonic(), "20 ms later"))
                    found = list(marks.marks)
                    for (start, name), (end, _) in itertools.pairwise(found):
                        phase = f"{action}: from {name}"
                        gaps[phase].append(max(ticker.within(start, end), default=0.0))
                        lengths[phase].append(end - start)
    print(f"Python {sys.version.split()[0]}; {args.cycles} cycles"
          f"{', expect= on every function' if args.expect else ''}; per phase: its median "
          "length; the ticker's longest gap in it, median / max over the calls; calls "
          "where that gap was over 1 ms")
    for phase, values in gaps.items():
        print(f"{phase:<48} {statistics.median(lengths[phase]) * 1e3:6.2f} ms   longest gap "
              f"{statistics.median(values) * 1e3:5.2f} / {max(values) * 1e3:5.2f} ms   "
              f"over 1 ms in {sum(v > 0.001 for v in values)} of {len(values)}")


if __name__ == "__main__":
    main()
