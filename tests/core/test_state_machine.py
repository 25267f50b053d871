"""Random sequences of apply / revert / cumulative apply / refused apply over 3 functions and
4 patches (each also as a cumulative variant) keep every function's behaviour, and the
applied list, equal to a simple model of the version stacks."""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
import types
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import livepatch

from .conftest import import_file

IMM = "immediate"
FUNCS = ("f0", "f1", "f2")
#: which functions each patch replaces
COVERS = {0: ("f0", "f1"), 1: ("f1", "f2"), 2: ("f0",), 3: ("f0", "f1", "f2")}

#: the three functions: a plain module function, a method (called through a bound method
#: stored before any patch) and a nested function (an instance made before any patch)
SOURCE = """
def f0():
    return 'orig-f0'


class K:
    def f1(self):
        return 'orig-f1'


def outer(k):
    def f2():
        return 'orig-f2' if k else None

    return f2


bound = K().f1
made = outer(1)
"""
TARGETS = {"f0": "f0", "f1": "K.f1", "f2": "outer.<locals>.f2"}
DEFS = {"f0": "f0()", "f1": "f1(self)", "f2": "f2()"}
CALLS = {
    "f0": lambda m: [m.f0()],
    "f1": lambda m: [m.bound(), m.K().f1()],
    "f2": lambda m: [m.made(), m.outer(1)()],
}

_world: dict[str, object] = {}
_counter = itertools.count()


def world() -> tuple[types.ModuleType, dict[str, livepatch.Patch]]:
    """A fresh target module and its patches for each example (a failure in one example
    must not leak into the next, or hypothesis cannot shrink it)."""
    forget_world()
    if not _world:
        folder = Path(tempfile.mkdtemp(prefix="lpcore_sm_"))
        name = f"lpcore_statemachine_{next(_counter)}"
        src = folder / f"{name}.py"
        src.write_text(SOURCE)
        module = import_file(src, name)
        patches: dict[str, livepatch.Patch] = {}
        for i, funcs in COVERS.items():
            for cumulative in (False, True):
                pname = f"{'C' if cumulative else 'P'}{i}"
                lines = ["import livepatch",
                         f"patch = livepatch.Patch({pname!r}, cumulative={cumulative})"]
                for f in funcs:
                    lines += [f"@patch.function('{name}:{TARGETS[f]}')",
                              f"def {DEFS[f]}:", f"    return '{pname}-{f}'", ""]
                path = folder / f"{pname}.py"
                path.write_text("\n".join(lines))
                patches[pname] = livepatch.load(path)
        path = folder / "BAD.py"
        path.write_text(
            "import livepatch\npatch = livepatch.Patch('BAD')\n"
            f"@patch.function('{name}:f0')\ndef f0():\n    return 'bad'\n"
            f"@patch.function('{name}:missing')\ndef missing():\n    return 'bad'\n"
        )
        patches["BAD"] = livepatch.load(path)
        _world["module"], _world["patches"], _world["folder"] = module, patches, folder
    return _world["module"], _world["patches"]  # type: ignore[return-value]


class VersionStacks(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.module, self.patches = world()
        assert livepatch.patches() == []
        self.stacks: dict[str, list[str]] = {f: [] for f in FUNCS}
        self.applied: list[str] = []

    @rule(i=st.sampled_from(sorted(COVERS)), cumulative=st.booleans())
    def apply(self, i: int, cumulative: bool) -> None:
        name = f"{'C' if cumulative else 'P'}{i}"
        if name in self.applied:
            with pytest.raises(livepatch.AlreadyApplied):
                livepatch.apply(self.patches[name], model=IMM)
            return
        livepatch.apply(self.patches[name], model=IMM)
        if cumulative:
            self.stacks = {f: [] for f in FUNCS}
            self.applied = []
        for f in COVERS[i]:
            self.stacks[f].append(name)
        self.applied.append(name)

    @precondition(lambda self: bool(self.applied))
    @rule(data=st.data())
    def revert(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.applied))
        livepatch.revert(name, model=IMM)
        self.applied.remove(name)
        for stack in self.stacks.values():
            if name in stack:
                stack.remove(name)

    @rule()
    def refused(self) -> None:
        with pytest.raises(livepatch.TargetNotFound):
            livepatch.apply(self.patches["BAD"], model=IMM)

    @rule(name=st.sampled_from(["P0", "C3", "nothing"]))
    def revert_not_applied(self, name: str) -> None:
        if name not in self.applied:
            with pytest.raises(livepatch.NotApplied):
                livepatch.revert(name, model=IMM)

    @invariant()
    def behaviour_matches_model(self) -> None:
        for f in FUNCS:
            stack = self.stacks[f]
            want = f"{stack[-1]}-{f}" if stack else f"orig-{f}"
            got = CALLS[f](self.module)
            assert got == [want] * len(got), (f, stack, got)

    @invariant()
    def applied_list_matches_model(self) -> None:
        views = livepatch.patches()
        assert [p.name for p in views] == self.applied
        for view in views:
            assert all(p.state == "applied" for p in views)
            covered = COVERS[int(view.name[1])]
            assert sorted(t.partition(":")[2] for t in view.functions) == sorted(
                TARGETS[f] for f in covered
            )

    def teardown(self) -> None:
        for name in reversed([p.name for p in livepatch.patches()]):
            livepatch.revert(name, model=IMM)
        for f in FUNCS:
            got = CALLS[f](self.module)
            assert got == [f"orig-{f}"] * len(got)


VersionStacks.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None, database=None
)
TestVersionStacks = VersionStacks.TestCase


def forget_world() -> None:
    """Drop the last example's module and its files (an example per world: a run would
    leave dozens of folders behind)."""
    module = _world.get("module")
    if isinstance(module, types.ModuleType):
        sys.modules.pop(module.__name__, None)
    folder = _world.get("folder")
    if isinstance(folder, Path):
        shutil.rmtree(folder, ignore_errors=True)
    _world.clear()


def teardown_module() -> None:
    forget_world()
