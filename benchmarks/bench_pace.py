"""Benchmark: how well a busy patching thread hands the GIL over (livepatch.pace).

One thread runs pure Python in ~10 µs units (as the engine does while it compiles and
installs), calling a hand-over step after each unit. Meanwhile a ticker thread sleeps
0.1 ms at a time and records how late it wakes, and four other threads each run a short
burst of calls and sleep 1 ms (a program's own work). Per strategy: the ticker's
lateness (median, 99th percentile, max), how many wake-ups were over 1 ms late per
second, and the busy thread's work done relative to not handing over at all. Strategies
run in turn, interleaved over the rounds, so the machine's own noise hits them alike.

    .venv/bin/python benchmarks/bench_pace.py [--rounds 3] [--seconds 1]

Strategies:
  none          no hand-over: waiters wait for the 5 ms switch interval
  sleep(0)      time.sleep(0) every 0.5 ms of CPU: releases the GIL and takes it back
  sleep(1us)    a 1 µs sleep every 0.5 ms of CPU
  nap(50us)     a 50 µs sleep every 0.5 ms of CPU (what Yielder does when the GIL is
                not crowded)
  drain         every 0.5 ms of CPU, 50 µs sleeps until the other threads' CPU time stops
                growing (at most 1 ms): not used by livepatch, for comparison
  Yielder       livepatch.pace.Yielder (what the transition uses)
  paced         livepatch.pace.paced(): the switch interval lowered to 0.2 ms
  paced+Yielder both (what planning uses)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from livepatch import pace


def every_half_ms(action: Callable[[], None]) -> Callable[[], None]:
    last = [time.thread_time()]

    def step() -> None:
        now = time.thread_time()
        if now - last[0] >= 0.0005:
            action()
            last[0] = time.thread_time()

    return step


def drain() -> None:
    """Nap until the other threads stop running (their CPU time stops growing), up to 1 ms."""
    others = time.process_time() - time.thread_time()
    end = time.perf_counter() + 0.001
    while True:
        time.sleep(50e-6)
        now = time.process_time() - time.thread_time()
        if now - others < 5e-6 or time.perf_counter() > end:
            return
        others = now


@contextmanager
def both() -> Iterator[None]:
    with pace.paced():
        yield


STRATEGIES: dict[str, Callable[[], tuple[AbstractContextManager[None], Callable[[], None]]]] = {
    "none": lambda: (nullcontext(), lambda: None),
    "sleep(0)": lambda: (nullcontext(), every_half_ms(lambda: time.sleep(0))),
    "sleep(1us)": lambda: (nullcontext(), every_half_ms(lambda: time.sleep(1e-6))),
    "nap(50us)": lambda: (nullcontext(), every_half_ms(lambda: time.sleep(50e-6))),
    "drain": lambda: (nullcontext(), every_half_ms(drain)),
    "Yielder": lambda: (nullcontext(), pace.Yielder()),
    "paced": lambda: (pace.paced(), lambda: None),
    "paced+Yielder": lambda: (both(), pace.Yielder()),
}


def unit() -> None:
    x = 0
    for i in range(300):  # about 10 µs of pure Python
        x += i


def one_run(strategy: str, seconds: float) -> tuple[list[float], int]:
    """(the ticker's lateness of each wake-up, units of work the busy thread did)"""
    stop = threading.Event()
    late: list[float] = []

    def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.0001)
            late.append(time.perf_counter() - t - 0.0001)

    def other() -> None:
        def f(x: int) -> int:
            return x + 1

        while not stop.is_set():
            for i in range(100):
                f(i)
            time.sleep(0.001)

    threads = [threading.Thread(target=ticker, daemon=True)]
    threads += [threading.Thread(target=other, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    late.clear()
    context, step = STRATEGIES[strategy]()
    units = 0
    with context:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            unit()
            step()
            units += 1
    stop.set()
    for t in threads:
        t.join(5)
    return late, units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}; {args.rounds} rounds of {args.seconds:g} s per "
          "strategy; a ticker sleeping 0.1 ms, 4 other threads, one busy thread")
    results: dict[str, list[tuple[list[float], int]]] = {name: [] for name in STRATEGIES}
    for _ in range(args.rounds):
        for name in STRATEGIES:
            results[name].append(one_run(name, args.seconds))
    base_units = statistics.median(units for _, units in results["none"])
    print(f"\n{'strategy':<14} {'late p50':>9} {'p99':>8} {'max':>8}  {'over 1 ms/s':>11}  "
          f"{'busy thread work':>16}")
    for name, runs in results.items():
        late = sorted(x for lates, _ in runs for x in lates)
        over = sum(x > 0.001 for x in late) / (args.rounds * args.seconds)
        work = statistics.median(units for _, units in runs) / base_units
        p50, p99 = late[len(late) // 2], late[int(0.99 * len(late))]
        print(f"{name:<14} {p50 * 1e3:6.3f} ms {p99 * 1e3:5.2f} ms {late[-1] * 1e3:5.2f} ms  "
              f"{over:11.1f}  {work:15.2f}x")


if __name__ == "__main__":
    main()
