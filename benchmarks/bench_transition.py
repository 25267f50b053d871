"""Benchmark: how long transitions take under load, and the longest pause a thread sees.

1. Transition time, per model, with 64 threads doing request-like work (a patched call,
   then 1 ms of sleep standing for I/O) plus 1,000 asyncio tasks doing the same on one
   loop. Median and 90th percentile over apply+revert cycles (target: hybrid under 50 ms
   median on a 2-core machine). Then again with 8 CPU-bound threads (pure-Python loops
   calling the patched function), where the GIL hands the patching thread few slices.
2. The longest pause any thread sees while a 100-function patch is applied and reverted,
   with 4 threads calling the patched functions (1 ms of sleep between rounds): a ticker
   thread sleeps 0.1 ms at a time and records its gaps beyond that. Windows: each
   ``apply`` and each ``revert`` call with the 20 ms after it (the apply includes the
   engine compiling and verifying 100 functions), and each transition proper. Three
   references run in the same cycles, so the machine's noise hits them alike: "no
   patching", the same ticker and callers in windows as long; a one-function patch's
   transitions and whole calls, the least any transition or apply does; and a paced
   busy loop, pure-Python work for as much CPU time as each apply or revert took, handing
   the GIL over as planning does (what any work that long costs the other threads here,
   so what the whole call costs beyond it is the engine's own). Then the whole calls of
   the same 100 functions written as ``livepatch build`` writes a patch (each giving its
   old source as ``expect=``, so planning compiles and compares each: about four times
   the CPU time of planning without), with a paced busy loop of their CPU time. Per kind
   of window: median and max over the windows of the ticker's longest gap (the part of
   it inside the window) and in how many windows it was over 1 ms, how many gaps over
   1 ms they held, and the longest gap of the same ticker run in another process over the
   same spans: a thread that shares no GIL with us, so the machine's own floor (on a
   VM, a virtual CPU that went idle can take a millisecond to wake up). Target: under
   1 ms for hybrid (the patching thread hands the GIL over, ``livepatch.pace``); ``stop``
   parks the world and reports how long. ``benchmarks/trace_pauses.py`` says how much
   of a gap was a wait for the GIL, and who held it meanwhile.

3. How long the engine plans (compiles and verifies) that 100-function patch, alone, and
   the same patch written as ``livepatch build`` writes one (each function's old source
   as ``expect=``, which planning compiles and compares with the live code); and how long
   its hybrid transitions take with no other thread (the CPU work a transition does,
   which the ticker of section 2 waits behind).
4. How long the heap scan takes that a patch replacing a generator or coroutine function
   does at the start of its transition (``gc.get_referrers``, one C call during which no
   other thread runs), per million objects the garbage collector tracks.
5. The floor of section 2 by the length of the work: in section 2's scene (4 callers, the
   ticker), paced busy loops of 1 to 20 ms of CPU time, each window the loop and the
   20 ms after it, like a whole call; and the CPU time an apply and a revert of the
   100-function patch take in the same scene. The longer the work, the more hand-overs,
   and the more often one of them meets the machine's slowest wake-up: this says what
   longest gap work as long as an apply meets here however well it hands over.
6. The first apply in a process, as an on-call engineer makes it: a fresh process that
   imported ``argparse`` (2,600 lines), 4 threads calling ``format_usage`` (5 ms of
   sleep between calls) and the ticker; then a patch file replacing that method is
   loaded and applied. The first apply to a module reads the module's source (its
   imports and ``__future__`` flags, ``livepatch.toplevel``); later ones find it read.
   Per fresh process: the ticker's longest gap over loading and applying the first
   time, over loading and applying again (after a revert), and over as long with no
   patching; median and max over the processes. Then the same as an on-call engineer
   does it: the process started with ``livepatch run``, the patch applied (and
   reverted) with ``livepatch apply --pid``, the windows running from the command's
   start to 20 ms after it returned; the baseline window is a ``livepatch status`` (a
   command that patches nothing: starting one costs the target CPU time on 2 cores).
7. What a process keeps per transition: 400 apply/revert cycles (hybrid) of a
   20-function patch (``--growth-cycles``), with 2 threads calling it, after 50 to warm
   up; the growth of the memory tracemalloc traces and of the objects the collector
   tracks. A process patched and reverted for months must not grow with each transition.

    .venv/bin/python benchmarks/bench_transition.py [--cycles N] [--models hybrid,stop]
        [--sections 1,2,3,4,5,6,7] [--growth-cycles 400]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import livepatch
from livepatch import pace

MODELS = ("hybrid", "two_universe", "stop", "immediate")

SOURCE = '''
def handle(x):
    return x + 1

async def handle_async(x):
    return x + 1
'''

PATCH = '''
import livepatch
patch = livepatch.Patch(NAME)

@patch.function("M:handle")
def handle(x):
    return x + 2

@patch.function("M:handle_async")
async def handle_async(x):
    return x + 2
'''

_counter = [0]
# every file a run writes (target modules, patches, the agent's state), gone at exit
SCRATCH = tempfile.TemporaryDirectory(prefix="lpbench-")


def module_from(source: str) -> Any:
    _counter[0] += 1
    name = f"lpbench_tr_{_counter[0]}"
    path = Path(SCRATCH.name) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def patch_for(module: Any, text: str, name: str) -> livepatch.Patch:
    text = text.replace("M:", f"{module.__name__}:").replace("NAME", repr(name))
    return livepatch.loads(text, filename=f"<bench {name}>")


class Load:
    """Request-like threads and asyncio tasks, or CPU-bound threads."""

    def __init__(self, module: Any, threads: int, tasks: int, cpu_bound: bool) -> None:
        self.module, self.stop = module, threading.Event()
        target = self._cpu if cpu_bound else self._requests
        self.threads = [threading.Thread(target=target, daemon=True) for _ in range(threads)]
        if tasks:
            self.threads.append(threading.Thread(target=self._loop, args=(tasks,), daemon=True))

    def _requests(self) -> None:
        handle, stop = self.module.handle, self.stop
        while not stop.is_set():
            handle(1)
            livepatch.safepoint()  # the request boundary (what the WSGI middleware marks)
            time.sleep(0.001)

    def _cpu(self) -> None:
        handle, stop = self.module.handle, self.stop
        while not stop.is_set():
            s = 0
            for i in range(2000):
                s += handle(i)
            livepatch.safepoint()

    def _loop(self, tasks: int) -> None:
        m = self.module

        async def one() -> None:
            while not self.stop.is_set():
                m.handle(1)
                await m.handle_async(1)
                livepatch.safepoint()
                await asyncio.sleep(0.001)

        async def main() -> None:
            await asyncio.gather(*(one() for _ in range(tasks)))

        asyncio.run(main())

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def transition_times(model: str, cycles: int, threads: int, tasks: int, cpu: bool) -> str:
    module = module_from(SOURCE)
    patch = patch_for(module, PATCH, f"bench-{model}")
    times, paused, failures = [], [], 0
    with Load(module, threads, tasks, cpu):
        for _ in range(cycles):
            for action in ("apply", "revert"):
                try:
                    if action == "apply":
                        t = livepatch.apply(patch, model=model, timeout=10)
                    else:
                        t = livepatch.revert(patch.name, model=model, timeout=10)
                except livepatch.TransitionTimeout:
                    failures += 1
                    break  # nothing applied: the cycle is over
                times.append(t.elapsed)
                paused.append(t.paused)
    if not times:
        return f"{model:<13} all {failures} transitions timed out"
    times.sort()
    p90 = times[int(0.9 * (len(times) - 1))]
    line = (f"{model:<13} median {statistics.median(times) * 1e3:8.2f} ms   "
            f"p90 {p90 * 1e3:8.2f} ms   max {times[-1] * 1e3:8.2f} ms")
    if model == "stop":
        line += f"   world paused max {max(paused) * 1e3:.2f} ms"
    if failures:
        line += f"   ({failures} timed out)"
    return line


WIDE = "\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(100))


def wide_patch(
    module: Any, name: str, functions: int = 100, expect: bool = False
) -> livepatch.Patch:
    """A patch of the first `functions` functions of WIDE (with `expect`: each gives its
    old source as expect=, as ``livepatch build`` writes it)."""
    def verified(i: int) -> str:
        return f', expect="def f{i}(x):\\n    return x + {i}\\n"' if expect else ""

    body = "".join(
        f'\n@patch.function("M:f{i}"{verified(i)})\ndef f{i}(x):\n    return x - {i}\n'
        for i in range(functions)
    )
    return patch_for(module, "import livepatch\npatch = livepatch.Patch(NAME)\n" + body, name)


class Ticker:
    """A thread that sleeps 0.1 ms at a time and records its gaps beyond that.

    A gap is the ticker's sleep running late (the OS, the machine) plus its wait for the
    GIL (the program's threads); this cannot tell them apart, trace_pauses.py can.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        #: per gap: its end and its length, in arrays of floats, which the garbage
        #: collector does not track: a tuple per tick would make the ticker itself
        #: trigger collections that pause everyone
        self.ends, self.lengths = array("d"), array("d")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            time.sleep(0.0001)
            now = time.monotonic()
            self.ends.append(now)
            self.lengths.append(now - last - 0.0001)
            last = now
            livepatch.safepoint()  # a loop boundary (two_universe needs one)

    def within(self, start: float = -math.inf, end: float = math.inf) -> list[float]:
        """The gaps that overlap [start, end], each cut to its part inside: a pause that
        began before the window began is not the window's doing (between two windows the
        benchmark itself holds the GIL, reading these arrays)."""
        n = min(len(self.ends), len(self.lengths))  # it may be mid-tick
        return clipped(zip(self.ends[:n], self.lengths[:n], strict=True), start, end)

    def __enter__(self) -> Ticker:
        self.thread.start()
        time.sleep(0.05)
        self.clear()
        return self

    def clear(self) -> None:
        # in place: the ticker thread appends to these very arrays
        for values in (self.ends, self.lengths):
            del values[:]

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


#: a ticker in a process of its own: it shares no GIL with the benchmark, so its gaps are
#: the machine's (a virtual CPU that went idle can take a millisecond to wake up)
_OUTSIDE = """
import json, sys, threading, time
gaps, stop = [], threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
last = time.monotonic()
while not stop.is_set():
    time.sleep(0.0001)
    now = time.monotonic()
    if now - last > 0.0003:
        gaps.append((now, now - last - 0.0001))
    last = now
json.dump(gaps, sys.stdout)
"""


class OutsideTicker:
    """The same ticker in another process (CLOCK_MONOTONIC is system-wide on Linux):
    how late a thread that does not share our GIL woke meanwhile."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _OUTSIDE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.gaps: list[tuple[float, float]] = []

    def close(self) -> None:
        out, _ = self.proc.communicate(timeout=10)
        self.gaps = [(t, g) for t, g in json.loads(out)]

    def within(self, start: float, end: float) -> list[float]:
        return clipped(self.gaps, start, end)


def clipped(gaps: Iterable[tuple[float, float]], start: float, end: float) -> list[float]:
    """Of gaps given as (end, length), the parts inside [start, end]."""
    return [min(t, end) - max(t - g, start) for t, g in gaps if t >= start and t - g <= end]


class Spread:
    """One kind of window over the cycles: its longest gap per window, how many gaps over
    1 ms it held in how much time (the rate says more than a maximum when the machine's
    other load stalls threads now and then), and the longest gap of a ticker in another
    process in the same spans (the machine's own floor: what no hand-over can remove)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.longest: list[float] = []
        self.over = 0
        self.seconds = 0.0
        self.spans: list[list[tuple[float, float]]] = []
        self.outside: list[float] = []

    def add(self, gaps: list[float], seconds: float, spans: list[tuple[float, float]]) -> None:
        self.longest.append(max(gaps, default=0.0))
        self.over += sum(g > 0.001 for g in gaps)
        self.seconds += seconds
        self.spans.append(spans)

    def add_transitions(self, ticker: Ticker, ts: list[livepatch.Transition]) -> None:
        spans = [(t._t0, t._t1 or t._t0) for t in ts]
        self.add([g for a, b in spans for g in ticker.within(a, b)],
                 sum(t.elapsed for t in ts), spans)

    def resolve(self, outside: OutsideTicker) -> None:
        self.outside = [max((g for a, b in spans for g in outside.within(a, b)), default=0.0)
                        for spans in self.spans]

    def line(self, model: str) -> str:
        def ms(xs: list[float]) -> str:
            return f"{statistics.median(xs) * 1e3:5.2f} / {max(xs) * 1e3:6.2f} ms"

        windows = sum(g > 0.001 for g in self.longest)
        line = (f"{model:<13} {self.label:<26} longest gap {ms(self.longest)}, over 1 ms in "
                f"{windows:2d} of {len(self.longest)} windows; gaps over 1 ms: {self.over:3d} "
                f"in {self.seconds * 1e3:5.0f} ms")
        if self.outside:
            line += f"; another process {ms(self.outside)}"
        return line


def call_wide(module: Any, stop: threading.Event) -> None:
    """A caller of section 2: every patched function in turn, then 1 ms of sleep."""
    fs = [getattr(module, f"f{i}") for i in range(100)]
    while not stop.is_set():
        for f in fs:
            f(1)
        livepatch.safepoint()
        time.sleep(0.001)


@contextmanager
def wide_callers(module: Any, count: int = 4) -> Iterator[None]:
    """Section 2's calling threads (:func:`call_wide`) for the length of the block."""
    stop = threading.Event()
    callers = [threading.Thread(target=call_wide, args=(module, stop), daemon=True)
               for _ in range(count)]
    for caller in callers:
        caller.start()
    try:
        yield
    finally:
        stop.set()
        for caller in callers:
            caller.join(5)


class Call(NamedTuple):
    """One apply or revert call: its window (the call and the 20 ms after it), its
    transition, and the calling thread's CPU time in the call."""

    start: float
    end: float
    transition: livepatch.Transition
    cpu: float


def apply_and_revert(patch: livepatch.Patch, model: str) -> list[Call]:
    """Apply, 20 ms, revert, 20 ms."""
    calls = []
    for action in ("apply", "revert"):
        start, cpu = time.monotonic(), time.thread_time()
        if action == "apply":
            t = livepatch.apply(patch, model=model, timeout=10)
        else:
            t = livepatch.revert(patch.name, model=model, timeout=10)
        cpu = time.thread_time() - cpu
        time.sleep(0.02)
        calls.append(Call(start, time.monotonic(), t, cpu))
    return calls


def paced_busy(cpu: float) -> None:
    """Pure-Python work for `cpu` seconds of this thread's CPU time, handing the GIL
    over as planning does (``pace.paced`` and a ``pace.Yielder``): what any work that
    long costs the other threads here, done as well as livepatch knows how."""
    handing_over = pace.Yielder()
    end = time.thread_time() + cpu
    with pace.paced():
        while time.thread_time() < end:
            total = 0
            for i in range(200):  # about 10 µs, an engine step's size
                total += i
            handing_over()


def busy_as_long(calls: list[Call], spread: Spread) -> None:
    """Per call, paced busy work for as much CPU time as the call took, then 20 ms: the
    ticker's gaps go to `spread`."""
    with Ticker() as ticker:
        for call in calls:
            start = time.monotonic()
            paced_busy(call.cpu)
            time.sleep(0.02)
            end = time.monotonic()
            spread.add(ticker.within(start, end), end - start, [(start, end)])


def pauses(model: str, cycles: int) -> list[str]:
    module = module_from(WIDE)
    patch = wide_patch(module, f"wide-{model}")
    one = wide_patch(module, f"one-{model}", functions=1)
    built = wide_patch(module, f"built-{model}", expect=True)
    base, whole = Spread("no patching"), Spread("whole apply or revert")
    inside, least = Spread("inside transition"), Spread("inside, 1-function patch")
    least_whole = Spread("whole, 1-function patch")
    busy = Spread("paced busy loop, same CPU")
    built_whole = Spread("whole, built patch")
    built_busy = Spread("paced busy, built's CPU")
    paused: list[float] = []
    outside = OutsideTicker()
    try:
        with wide_callers(module):
            for _ in range(cycles):
                with Ticker() as ticker:
                    calls = apply_and_revert(patch, model)
                for start, end, t, _ in calls:
                    paused.append(t.paused)
                    whole.add(ticker.within(start, end), end - start, [(start, end)])
                    inside.add_transitions(ticker, [t])
                # the baseline: the same threads, windows as long, no patching
                with Ticker() as ticker:
                    for length in [c.end - c.start for c in calls]:
                        start = time.monotonic()
                        time.sleep(length)
                        end = time.monotonic()
                        base.add(ticker.within(start, end), end - start, [(start, end)])
                busy_as_long(calls, busy)
                with Ticker() as ticker:
                    for start, end, t, _ in apply_and_revert(one, model):
                        least.add_transitions(ticker, [t])
                        least_whole.add(ticker.within(start, end), end - start,
                                        [(start, end)])
                with Ticker() as ticker:
                    built_calls = apply_and_revert(built, model)
                for start, end, _, _ in built_calls:
                    built_whole.add(ticker.within(start, end), end - start, [(start, end)])
                busy_as_long(built_calls, built_busy)
    finally:
        outside.close()
    spreads = (base, whole, inside, least, least_whole, busy, built_whole, built_busy)
    for spread in spreads:
        spread.resolve(outside)
    lines = [s.line(model) for s in spreads]
    if model == "stop":
        lines[2] += f"; world paused max {max(paused) * 1e3:.2f} ms"
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sections", default="1,2,3,4,5,6,7",
                        help="which sections to run: 1, 2, 3, 4, 5, 6, 7")
    parser.add_argument("--growth-cycles", type=int, default=400,
                        help="section 7's apply/revert cycles")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    logging.getLogger("livepatch").setLevel(logging.ERROR)  # "not verified" warnings
    models = args.models.split(",")
    print(f"Python {sys.version.split()[0]}; {args.cycles} apply+revert cycles per model")
    if "1" in sections:
        section_1(models, args.cycles)
    if "2" in sections:
        section_2(models, args.cycles)
    if "3" in sections:
        section_3(args.cycles)
    if "4" in sections:
        section_4()
    if "5" in sections:
        section_5(args.cycles)
    if "6" in sections:
        section_6(args.cycles)
    if "7" in sections:
        section_7(args.growth_cycles)


def section_7(cycles: int = 400, warm: int = 50) -> None:
    import tracemalloc

    module = module_from(WIDE)
    patch = wide_patch(module, "wide-growth", functions=20)

    def cycle(n: int) -> None:
        for _ in range(n):
            livepatch.apply(patch, model="hybrid", timeout=10)
            livepatch.revert(patch.name, model="hybrid", timeout=10)
        gc.collect()

    with wide_callers(module, 2):
        cycle(warm)
        tracemalloc.start()
        objects = len(gc.get_objects())
        cycle(cycles)
        grown = tracemalloc.get_traced_memory()[0]
        objects = len(gc.get_objects()) - objects
        tracemalloc.stop()
    print(f"\n7. growth over {cycles} apply/revert cycles of a 20-function patch (hybrid, "
          f"2 calling threads): {grown / 1024:.1f} KiB traced, {objects:+d} tracked objects")


def section_1(models: list[str], cycles: int) -> None:
    print("\n1a. transition time: 64 request-like threads + 1,000 asyncio tasks")
    for model in models:
        print(transition_times(model, cycles, 64, 1000, cpu=False), flush=True)
    print("\n1b. transition time: 8 CPU-bound threads")
    for model in models:
        print(transition_times(model, cycles, 8, 0, cpu=True), flush=True)


def section_3(cycles: int) -> None:
    """How long the engine plans a 100-function patch (compile, verify): the bulk of
    ``apply``'s own work, done before the transition, with no other thread running."""
    module = module_from(WIDE)
    patch = wide_patch(module, "wide-plan")

    def planning(of: livepatch.Patch) -> str:
        times = []
        for _ in range(cycles):
            start = time.perf_counter()
            livepatch.plan(of)
            times.append(time.perf_counter() - start)
        return (f"median {statistics.median(times) * 1e3:.1f} ms, "
                f"min {min(times) * 1e3:.1f} ms")

    print("\n3. planning a 100-function patch (livepatch.plan), no other thread: "
          f"{planning(patch)} over {cycles}")
    # as `livepatch build` writes a patch: each function's old source as expect=
    verified = wide_patch(module, "wide-plan-expect", expect=True)
    print("   the same with each function's old source as expect= (as livepatch build "
          f"writes it): {planning(verified)}")
    # the transition proper: from the first trampoline stored to the new code installed
    # (its trampolines are built before it starts, like the plan)
    spans: dict[str, list[float]] = {"apply": [], "revert": []}
    for _ in range(cycles):
        spans["apply"].append(livepatch.apply(patch, model="hybrid").elapsed)
        spans["revert"].append(livepatch.revert(patch.name, model="hybrid").elapsed)
    print("   its hybrid transition, no other thread: "
          + ", ".join(f"{action} median {statistics.median(xs) * 1e3:.2f} ms, "
                      f"min {min(xs) * 1e3:.2f} ms" for action, xs in spans.items()))


def section_4() -> None:
    from livepatch import tasks

    async def coroutine() -> None:
        pass

    heap = [[i] for i in range(1_000_000)]  # a million small tracked objects
    tracked = len(gc.get_objects())
    times = []
    for _ in range(5):
        start = time.perf_counter()
        tasks.suspended_with([coroutine.__code__])
        times.append(time.perf_counter() - start)
    print(f"\n4. heap scan for suspended coroutines of a patched function, {tracked:,} tracked "
          f"objects: median {statistics.median(times) * 1e3:.1f} ms over 5, "
          f"{statistics.median(times) * 1e3 / (tracked / 1e6):.1f} ms per million")
    try:
        import greenlet
    except ImportError:
        print("   (greenlet is not installed: no walk for suspended greenlets)")
        return
    from livepatch import greenlets

    loaded = _median_ms(greenlets.suspended)  # imported, no greenlet ever started
    started = greenlet.greenlet(lambda: greenlet.getcurrent().parent.switch())
    started.switch()  # one suspended greenlet: the walk now has to look
    walked = _median_ms(greenlets.suspended)
    started.throw(greenlet.GreenletExit)
    del heap
    print(f"   the walk for suspended greenlets before finalization: {loaded:.2f} ms where "
          f"greenlet is only imported, {walked:.1f} ms once one was started "
          f"({walked / (tracked / 1e6):.1f} ms per million)")


def _median_ms(call: Any, times: int = 5) -> float:
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        spent.append(time.perf_counter() - start)
    return statistics.median(spent) * 1e3


#: section 5's lengths of paced busy work (seconds of CPU time)
FLOOR_LENGTHS = (0.001, 0.0025, 0.005, 0.01, 0.02)


def section_5(cycles: int) -> None:
    module = module_from(WIDE)
    patch = wide_patch(module, "wide-floor")
    gaps: dict[float, list[float]] = {cpu: [] for cpu in FLOOR_LENGTHS}
    cpu_of: dict[str, list[float]] = {"apply": [], "revert": []}
    with wide_callers(module):
        # three windows per length per cycle, lengths interleaved so that the machine's
        # noise hits them alike
        for _ in range(3 * cycles):
            with Ticker() as ticker:
                for cpu in FLOOR_LENGTHS:
                    start = time.monotonic()
                    paced_busy(cpu)
                    time.sleep(0.02)
                    gaps[cpu].append(max(ticker.within(start, time.monotonic()), default=0.0))
        for _ in range(cycles):
            apply_call, revert_call = apply_and_revert(patch, "hybrid")
            cpu_of["apply"].append(apply_call.cpu)
            cpu_of["revert"].append(revert_call.cpu)
    print("\n5. the floor by length: paced busy work in section 2's scene (4 callers, the")
    print("   ticker); per window (the work and 20 ms after), the ticker's longest gap:")
    print("   median, 75th percentile over the windows, windows over 1 ms")
    for cpu, xs in gaps.items():
        xs.sort()
        print(f"   {cpu * 1e3:4.1f} ms of CPU time  longest gap {statistics.median(xs) * 1e3:.2f} "
              f"ms, p75 {xs[len(xs) * 3 // 4] * 1e3:.2f} ms, over 1 ms in "
              f"{sum(x > 0.001 for x in xs)} of {len(xs)}")
    print("   the 100-function patch in the same scene, CPU time of the calling thread: "
          + ", ".join(f"{action} median {statistics.median(xs) * 1e3:.1f} ms"
                      for action, xs in cpu_of.items()))


#: section 6's patch: argparse's format_usage, as it reads on 3.11 to 3.13
FIRST_PATCH = '''
import livepatch
patch = livepatch.Patch("usage")

@patch.function("argparse:ArgumentParser.format_usage")
def format_usage(self):
    formatter = self._get_formatter()
    formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
    return formatter.format_help()
'''

#: section 6's fresh process: the scene, then the patch file argv[1] applied in it twice
#: by the process itself (argv[3] "self") or by `livepatch apply` through its agent
#: ("agent": the parent applies and sends the windows); prints the windows' longest gaps
_FIRST_APPLY = """
import argparse, json, logging, sys, threading, time
sys.path.insert(0, sys.argv[2])
import bench_transition as bt
import livepatch

logging.getLogger("livepatch").setLevel(logging.ERROR)
parser = argparse.ArgumentParser(prog="bench")
parser.add_argument("--count", type=int)
stop = threading.Event()

def call():
    while not stop.is_set():
        parser.format_usage()
        livepatch.safepoint()
        time.sleep(0.005)

callers = [threading.Thread(target=call, daemon=True) for _ in range(4)]
for caller in callers:
    caller.start()
windows = {}
with bt.Ticker() as ticker:
    if sys.argv[3] == "self":
        for label in ("first", "again"):
            start = time.monotonic()
            livepatch.apply(livepatch.load(sys.argv[1]))
            took = time.monotonic() - start
            time.sleep(0.02)
            windows[label] = (start, time.monotonic())
            livepatch.revert("usage")
            time.sleep(0.02)
            start = time.monotonic()
            time.sleep(took + 0.02)
            windows.setdefault("none", (start, time.monotonic()))
    else:
        print("ready", flush=True)
        windows = json.loads(sys.stdin.readline())
stop.set()
json.dump({label: max(ticker.within(a, b), default=0.0) for label, (a, b) in windows.items()},
          sys.stdout)
"""


def _through_the_agent(path: Path, here: str) -> dict[str, float]:
    """Section 6 with ``livepatch run`` and ``livepatch apply``/``revert`` by pid: the
    windows run from starting the command to 20 ms after it returned."""
    cli = str(Path(sys.executable).with_name("livepatch"))
    state = tempfile.mkdtemp(prefix="state-", dir=SCRATCH.name)
    env = dict(os.environ, LIVEPATCH_STATE_DIR=state)
    target = subprocess.Popen(
        [cli, "run", "--", sys.executable, "-c", _FIRST_APPLY, str(path), here, "agent"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert target.stdin is not None and target.stdout is not None
        assert target.stdout.readline().strip() == "ready"
        pid = str(target.pid)

        def timed(*command: str) -> tuple[float, float]:
            start = time.monotonic()
            subprocess.run([cli, *command, "--pid", pid], env=env, check=True, timeout=60,
                           capture_output=True)
            time.sleep(0.02)
            return start, time.monotonic()

        # the baseline runs a command too: on 2 CPUs starting one (importing click and
        # rich) takes CPU time from the target's threads, patch or no patch
        windows = {"none": timed("status"), "first": timed("apply", str(path), "--no-persist")}
        timed("revert", "usage")
        windows["again"] = timed("apply", str(path), "--no-persist")
        target.stdin.write(json.dumps(windows) + "\n")
        target.stdin.flush()
        out, _ = target.communicate(timeout=60)
        result: dict[str, float] = json.loads(out)
        return result
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()


def section_6(cycles: int) -> None:
    path = Path(SCRATCH.name) / "usage_patch.py"
    path.write_text(FIRST_PATCH)
    here = str(Path(__file__).resolve().parent)
    gaps: dict[str, dict[str, list[float]]] = {
        how: {"first": [], "again": [], "none": []} for how in ("self", "agent")
    }
    for _ in range(cycles):
        out = subprocess.run([sys.executable, "-c", _FIRST_APPLY, str(path), here, "self"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        for label, gap in json.loads(out).items():
            gaps["self"][label].append(gap)
        for label, gap in _through_the_agent(path, here).items():
            gaps["agent"][label].append(gap)

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e3:5.2f} / {max(xs) * 1e3:5.2f} ms"

    print(f"\n6. the first apply in a fresh process (argparse, 4 callers, the ticker), {cycles} "
          "processes each way;\n   the ticker's longest gap, median / max over the processes:")
    for how, title in (("self", "in the process (livepatch.load and apply)"),
                       ("agent", "through the agent (livepatch run, livepatch apply --pid)")):
        print(f"   {title}:")
        none = "no patching, as long" if how == "self" else "livepatch status, no patching"
        for label, key in (("load and apply, first time", "first"),
                           ("load and apply again", "again"), (none, "none")):
            print(f"     {label:<30} {spread(gaps[how][key])}")


def section_2(models: list[str], cycles: int) -> None:
    print("\n2. longest pause seen by a ticker thread, 100-function patch, 4 caller threads;")
    print("   per window, median / max over the windows (each apply and each revert: the")
    print("   call and 20 ms after it, or its transition): the ticker's longest gap; gaps")
    print("   over 1 ms in all;")
    print("   the longest gap of the same ticker in another process (the machine's floor).")
    print("   'no patching': the same threads for as long, right after each apply+revert;")
    print("   '1-function patch': its transitions and whole calls, in the same cycles (the")
    print("   least a transition, or an apply, does); 'built patch': the same 100")
    print("   functions, each giving its old source as expect= (as livepatch build writes")
    print("   it, so planning compiles and compares each), whole calls in the same cycles,")
    print("   and a paced busy loop for as much CPU time as each of those calls took")
    for model in models:
        print("\n".join(pauses(model, cycles)), flush=True)


if __name__ == "__main__":
    main()
