"""The invariant: no stack ever runs old and new versions of one patch at once.

16 threads, 200 asyncio tasks suspended inside a patched coroutine between ``encode`` and
``decode``, and generators suspended between the two calls and finished by other threads,
while a patch replacing encode/decode/work is applied and reverted over and over. A
violation is a value decoded by a version other than the one that encoded it.
"""

from __future__ import annotations

import time

import pytest

import livepatch
from livepatch import TransitionTimeout

from .conftest import import_source, patch_for
from .workload import PATCH, TARGET, Workload

CYCLE_SECONDS = 2.5
#: cycles each run completes whatever the machine's speed (a 2-core CI runner once
#: finished only one in CYCLE_SECONDS), within CYCLE_SECONDS * 6
MIN_CYCLES = 3


def _cycles(module, model: str, seconds: float, timeout: float = 20.0) -> tuple[int, list[float]]:
    patch = patch_for(module, "invariant", PATCH)
    cycles, times = 0, []
    start = time.monotonic()
    deadline, hard_deadline = start + seconds, start + 6 * seconds
    while time.monotonic() < deadline or (
        cycles < MIN_CYCLES and time.monotonic() < hard_deadline
    ):
        t = livepatch.apply(patch, model=model, timeout=timeout)
        assert module.encode(0) == ("v2", 0)
        times.append(t.elapsed)
        t = livepatch.revert("invariant", model=model, timeout=timeout)
        assert module.encode(0) == ("v1", 0)
        times.append(t.elapsed)
        cycles += 1
    return cycles, times


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_dispatching_models_never_mix_versions(tmp_path, model):
    module = import_source(tmp_path, TARGET)
    load = Workload(module, threads=16, tasks=200).start()
    try:
        cycles, times = _cycles(module, model, CYCLE_SECONDS)
    finally:
        load.stop()
    assert cycles >= MIN_CYCLES, (
        f"only {cycles} apply/revert cycles in {6 * CYCLE_SECONDS} s; transitions took "
        f"{', '.join(f'{t:.3f}' for t in times)} s"
    )
    assert module.DECODED[0] > 1000, "the workload did not run"
    assert load.iterations > 100
    assert module.VIOLATIONS == [], module.VIOLATIONS[:5]
    # after the last revert, functions run the original code with no trampoline
    assert module.work.__code__.co_filename == module.__file__
    assert module.work.__kwdefaults__ is None


def test_stop_never_mixes_versions_when_it_can_succeed(tmp_path):
    module = import_source(tmp_path, TARGET)
    # mostly idle: each thread/task spends most of its time outside the patch, and no
    # generator waits in another thread's queue (stop cannot finish while one does)
    load = Workload(module, threads=16, tasks=20, idle=0.01, handoff=False).start()
    try:
        cycles, times = _cycles(module, "stop", CYCLE_SECONDS)
    finally:
        load.stop()
    assert cycles >= MIN_CYCLES, f"only {cycles} cycles; transitions took {times} s"
    assert module.DECODED[0] > 200
    assert module.VIOLATIONS == [], module.VIOLATIONS[:5]


def test_stop_reports_blockers_when_it_cannot_succeed(tmp_path):
    module = import_source(tmp_path, TARGET)
    load = Workload(module, threads=16, tasks=200).start()
    patch = patch_for(module, "invariant-busy", PATCH)
    try:
        with pytest.raises(TransitionTimeout) as info:
            livepatch.apply(patch, model="stop", timeout=1.0)
    finally:
        load.stop()
    message = str(info.value)
    assert "activeness safety check failed" in message
    assert " in work" in message or "work_async" in message or "work_gen" in message
    assert "nothing changed" in message
    assert module.encode(0) == ("v1", 0)  # all-or-nothing: nothing was installed
    assert module.VIOLATIONS == []
    assert livepatch.patches() == []


def test_immediate_does_mix_versions(tmp_path):
    """The test can fail: without a consistency model, stacks do mix versions."""
    module = import_source(tmp_path, TARGET)
    patch = patch_for(module, "invariant-immediate", PATCH)
    load = Workload(module, threads=16, tasks=200).start()
    try:
        deadline = time.monotonic() + 2 * CYCLE_SECONDS
        while time.monotonic() < deadline and len(module.VIOLATIONS) < 10:
            livepatch.apply(patch, model="immediate")
            time.sleep(0.005)  # let the workload run on both sides of each swap
            livepatch.revert("invariant-immediate", model="immediate")
            time.sleep(0.005)
    finally:
        load.stop()
    assert module.VIOLATIONS, "immediate never mixed versions: the invariant test is blind"


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_reversing_mid_transition_never_mixes_versions(tmp_path, model):
    """Revert while the transition is in flight, over and over, under the same load."""
    module = import_source(tmp_path, TARGET)
    patch = patch_for(module, "invariant-reverse", PATCH)
    load = Workload(module, threads=16, tasks=200).start()
    reversed_count = 0
    try:
        deadline = time.monotonic() + CYCLE_SECONDS / 2
        # on a loaded machine transitions may finish before the revert lands: keep going
        # (bounded) until one was caught in flight
        hard_deadline = time.monotonic() + 4 * CYCLE_SECONDS
        attempt = 0
        while time.monotonic() < deadline or (
            reversed_count == 0 and time.monotonic() < hard_deadline
        ):
            t = livepatch.apply(patch, model=model, timeout=20, wait=False)
            attempt += 1
            time.sleep((0.0, 0.0005, 0.002)[attempt % 3])
            if t.done:  # finished before we could turn it around: revert normally
                livepatch.revert("invariant-reverse", model=model, timeout=20)
                continue
            try:
                r = livepatch.revert("invariant-reverse", model=model, timeout=20)
            except livepatch.TransitionBusy:  # it was finalizing right then
                t.wait(20)
                livepatch.revert("invariant-reverse", model=model, timeout=20)
                continue
            if r is not t:  # it completed in between: that was an ordinary revert
                # (t may still be running its post callbacks: it has finalized, though)
                assert t.wait(20).state.value == "complete" and r.state.value == "complete"
                continue
            assert t.state.value == "reversed"
            reversed_count += 1
            assert module.encode(0) == ("v1", 0)
    finally:
        load.stop()
    assert reversed_count >= 1, "never caught a transition in flight"
    assert module.VIOLATIONS == [], module.VIOLATIONS[:5]
    assert livepatch.patches() == []
