"""Paired A/B of pacing settings in the real scene: which hand-over rhythm pauses least.

The scene is bench_transition section 2's: a ticker thread sleeping 0.1 ms at a time, 4
threads calling a 100-function module (1 ms of sleep between rounds), and hybrid apply
and revert of a patch of all 100 functions. Section 2 compares code in separate runs,
minutes apart, and this VM's noise moves by 2x in minutes; here the variants take turns
*per apply/revert cycle* in one process (in alternating order), so the noise hits them
alike. Per variant: the median over the windows of the ticker's longest gap, for the
whole call (planning included, and the 20 ms after it) and for the transition proper,
with how many windows went over 1 ms; then, for each variant against the first, in how
many paired windows it did better.

Variants (``livepatch.pace`` settings, changed between cycles):

  current        as shipped
  plan-no-naps   planning and the building of trampolines hand over only by CPython's
                 forced switches (``paced()``'s 0.2 ms switch interval), with no naps
  plan-no-naps-100  the same with a 0.1 ms switch interval
  nap-150us, nap-300us  hand-overs sleep 150 or 300 µs instead of 50 µs
  every-100us    a hand-over every 0.1 ms of CPU time at least, not 0.2 ms (planning
                 keeps its own 0.25 ms)
  every-300us    the same, every 0.3 ms
  every-500us    the same, every 0.5 ms (what it was until commit 5b01c79)
  interval-100us ``paced()`` lowers the switch interval to 0.1 ms, not 0.2 ms
  unpaced        ``paced()`` leaves the switch interval at CPython's 5 ms: only the naps
  plan-100us     planning hands over every 0.1 ms of CPU time at least, not 0.25 ms
                 (``core.PLAN_EVERY``); -fixed: and its period does not grow with the waits
  all-100us      planning and everything else every 0.1 ms

``--expect`` runs it on the patch as ``livepatch build`` writes it (every function gives
its old source as ``expect=``).

    .venv/bin/python benchmarks/pair_pace.py [--cycles 20] [--variants current,nap-300us]
        [--expect]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from livepatch import core, dispatch, pace

_shipped = {name: getattr(pace, name) for name in ("SLEEP", "INTERVAL", "EVERY")}
_shipped_plan_every = core.PLAN_EVERY
_hand_over = pace.hand_over
_quiet = threading.local()  # inside planning or prepare, when the variant says no naps


def _hand_over_unless_quiet() -> None:
    if getattr(_quiet, "depth", 0) and _settings.get("plan_naps") is False:
        pace._ran.since = time.thread_time()  # as if it had handed over
        return
    _hand_over()


def _quietly(func: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        _quiet.depth = getattr(_quiet, "depth", 0) + 1
        try:
            return func(*args, **kwargs)
        finally:
            _quiet.depth -= 1

    return run


VARIANTS: dict[str, dict[str, Any]] = {
    "current": {},
    "plan-no-naps": {"plan_naps": False},
    "plan-no-naps-100": {"plan_naps": False, "INTERVAL": 0.0001},
    "nap-150us": {"SLEEP": 150e-6},
    "nap-300us": {"SLEEP": 300e-6},
    "every-100us": {"EVERY": 0.0001},
    "every-300us": {"EVERY": 0.0003},
    "every-500us": {"EVERY": 0.0005},
    "interval-100us": {"INTERVAL": 0.0001},
    "unpaced": {"INTERVAL": 0.005},
    # the period does not grow with the waits (a Yielder's `share` of 0)
    "fixed-200us": {"share": 0.0},
    "fixed-100us": {"EVERY": 0.0001, "share": 0.0},
    # planning hands over every 0.1 ms of CPU time at least (core.PLAN_EVERY), not 0.25 ms
    "plan-100us": {"plan_every": 0.0001},
    "plan-100us-fixed": {"plan_every": 0.0001, "share": 0.0},
    "all-100us": {"plan_every": 0.0001, "EVERY": 0.0001},
}
_settings: dict[str, Any] = {}


@contextmanager
def variant(name: str) -> Iterator[None]:
    _settings.clear()
    _settings.update(VARIANTS[name])
    for key, value in {**_shipped, **_settings}.items():
        if key.isupper():
            setattr(pace, key, value)
    # a Yielder's period floor and share are its constructor's defaults, bound at
    # definition
    pace.Yielder.__init__.__defaults__ = (pace.EVERY, _settings.get("share", 1.0))
    core.PLAN_EVERY = _settings.get("plan_every", _shipped_plan_every)
    try:
        yield
    finally:
        for key, value in _shipped.items():
            setattr(pace, key, value)
        pace.Yielder.__init__.__defaults__ = (_shipped["EVERY"], 1.0)
        core.PLAN_EVERY = _shipped_plan_every
        _settings.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--expect", action="store_true",
                        help="each function gives its old source as expect= (a built patch)")
    parser.add_argument("--variants", default="current,plan-no-naps,nap-300us,every-500us",
                        help=f"comma-separated, the first is the reference: {', '.join(VARIANTS)}")
    args = parser.parse_args()
    chosen = args.variants.split(",")
    unknown = [n for n in chosen if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    import logging

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_transition as bt

    logging.getLogger("livepatch").setLevel(logging.ERROR)  # "not verified" warnings
    core._plan = _quietly(core._plan)  # type: ignore[assignment]
    dispatch.Universe.prepare = _quietly(dispatch.Universe.prepare)  # type: ignore[method-assign]
    pace.hand_over = _hand_over_unless_quiet

    module = bt.module_from(bt.WIDE)
    patch = bt.wide_patch(module, "pair-pace", expect=args.expect)
    whole: dict[str, list[float]] = {n: [] for n in chosen}
    inside: dict[str, list[float]] = {n: [] for n in chosen}
    with bt.wide_callers(module), bt.Ticker() as ticker:
        for cycle in range(args.cycles):
            for name in chosen if cycle % 2 == 0 else chosen[::-1]:
                with variant(name):
                    for start, end, t, _ in bt.apply_and_revert(patch, "hybrid"):
                        whole[name].append(max(ticker.within(start, end), default=0.0))
                        inside[name].append(max(ticker.within(t._t0, t._t1 or t._t0),
                                                default=0.0))

    def summary(xs: list[float]) -> str:
        over = sum(x > 0.001 for x in xs)
        return f"median {statistics.median(xs) * 1e3:5.2f} ms (over 1 ms: {over:2d}/{len(xs)})"

    print(f"Python {sys.version.split()[0]}; {args.cycles} cycles, variants alternating per "
          "cycle; the ticker's longest gap per window")
    for name in chosen:
        print(f"{name:<17} whole call {summary(whole[name])}; "
              f"inside the transition {summary(inside[name])}")
    first = chosen[0]
    for name in chosen[1:]:
        better = sum(b < a for a, b in zip(whole[first], whole[name], strict=True))
        inner = sum(b < a for a, b in zip(inside[first], inside[name], strict=True))
        print(f"{name} paused less than {first} in {better} of {len(whole[first])} paired "
              f"windows over the whole call, {inner} inside the transition")


if __name__ == "__main__":
    main()
