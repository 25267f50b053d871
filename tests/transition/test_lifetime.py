"""A finished transition's dispatch state goes with its last reference.

Each trampoline's state holds a bound slow path of the universe and the entry it serves;
left alone that is a cycle per patched function, which only the cyclic garbage collector
frees, and its passes over thousands of such objects pause every thread (the engine
applies patches precisely so as not to pause them). ``Universe.remove`` breaks it.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

import livepatch

from .conftest import import_source, patch_for

SOURCE = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(20))
BODY = "".join(
    f'@patch.function("M:f{i}")\ndef f{i}(x):\n    return x - {i}\n\n' for i in range(20)
)


@pytest.fixture
def no_collector() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_a_finished_transition_is_freed_without_the_cyclic_collector(
    tmp_path, model, no_collector
) -> None:
    mod = import_source(tmp_path, SOURCE)
    patch = patch_for(mod, f"lifetime-{model}", BODY)
    universes = []
    for action in ("apply", "revert"):
        if action == "apply":
            t = livepatch.apply(patch, model=model, timeout=10)
        else:
            t = livepatch.revert(patch.name, model=model, timeout=10)
        assert t.state.value == "complete"
        assert t._universe is not None
        universes.append(weakref.ref(t._universe))
        del t
    assert mod.f3(10) == 13  # reverted
    assert [ref() for ref in universes] == [None, None]


def _names_made() -> int:
    """How many state names the dispatch layer has ever made (its counter, unconsumed)."""
    from livepatch import dispatch

    return int(repr(dispatch._ids)[len("count("):-1])


@pytest.mark.parametrize("model", ["hybrid", "two_universe"])
def test_patching_again_and_again_does_not_grow_the_process(tmp_path, model) -> None:
    """A process patched and reverted for months keeps nothing per transition: state
    names in the builtins are used again (each new one would be interned for good on
    3.12+), and exercise tracking forgets the code of reverted versions."""
    from livepatch import exercise

    mod = import_source(tmp_path, SOURCE)
    patch = patch_for(mod, f"again-{model}", BODY)

    def cycles(n: int) -> None:
        for _ in range(n):
            livepatch.apply(patch, model=model, timeout=10)
            livepatch.revert(patch.name, model=model, timeout=10)
        gc.collect()

    cycles(3)
    made, watched = _names_made(), exercise.watched()
    cycles(20)
    # 20 functions, two transitions a cycle: 800 new names before
    assert _names_made() - made <= 40, _names_made() - made
    assert exercise.watched() <= watched  # 20 more a cycle before (3.12+)
    assert mod.f3(10) == 13
