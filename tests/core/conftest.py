"""Shared helpers for the core-engine tests.

Every scenario lives in ``fixtures/<scenario>/``: ``v1.py`` (the code a process runs),
``v2.py`` (the fixed source) and ``patch.py`` (the patch file turning v1 into v2). A test
imports ``v1.py`` as a live module under a unique name, and materialises the patch file
into ``tmp_path`` with the module name filled in (the token ``TARGET_MODULE`` in the
patch file), then loads it with ``livepatch.load`` exactly as a user would.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import livepatch
from livepatch import redirect

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "TARGET_MODULE"
_counter = itertools.count()


def unique_name(scenario: str) -> str:
    return f"lpcore_{scenario}_{next(_counter)}"


def import_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def module_from_source(name: str, source: str, tmp_path: Path) -> types.ModuleType:
    """Write `source` to a file and import it as `name` (so it has real source)."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return import_file(path, name)


def revert_all() -> None:
    for applied in reversed(livepatch.patches()):
        livepatch.revert(applied.name, model="immediate")


class Env:
    """Per-test helper: live modules, patch files, and cleanup."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.modules: list[str] = []

    def module(self, scenario: str, version: str = "v1") -> types.ModuleType:
        name = unique_name(f"{scenario}_{version}")
        self.modules.append(name)
        return import_file(FIXTURES / scenario / f"{version}.py", name)

    def source_module(self, source: str, prefix: str = "src") -> types.ModuleType:
        name = unique_name(prefix)
        self.modules.append(name)
        return module_from_source(name, source, self.tmp_path)

    def patch_file(
        self, scenario: str, module: types.ModuleType | str, file: str = "patch.py",
        **extra: str,
    ) -> Path:
        """The scenario's patch file, with TARGET_MODULE (and extra tokens) filled in."""
        text = (FIXTURES / scenario / file).read_text()
        return self.patch_text(text, module, f"{scenario}_{file}", **extra)

    def patch_text(
        self, text: str, module: types.ModuleType | str, filename: str = "patch.py",
        **extra: str,
    ) -> Path:
        name = module if isinstance(module, str) else module.__name__
        text = textwrap.dedent(text).replace(TOKEN, name)
        for token, value in extra.items():
            text = text.replace(token, value)
        path = self.tmp_path / f"{next(_counter)}_{filename}"
        path.write_text(text)
        return path

    def patch(self, scenario: str, module: types.ModuleType, file: str = "patch.py",
              **extra: str) -> livepatch.Patch:
        return livepatch.load(self.patch_file(scenario, module, file, **extra))

    def cleanup(self) -> None:
        revert_all()
        for name in self.modules:
            sys.modules.pop(name, None)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.cleanup()


@pytest.fixture(autouse=True)
def _no_patch_leaks() -> Iterator[None]:
    """Every test starts and ends with no applied patch (a leak would poison the next)."""
    revert_all()
    yield
    leftover = [p.name for p in livepatch.patches()]
    revert_all()
    assert not leftover, f"test left patches applied: {leftover}"
    # with nothing applied, no function may still be held in a version stack
    slots = [(s.key, [v.patch for v in s.stack]) for s in redirect.all_slots()]
    assert not slots, f"version stacks left behind with nothing applied: {slots}"


# -- source of v1 definitions, for expect= -------------------------------------------


def v1_def_source(scenario: str, target_qualname: str, version: str = "v1") -> str:
    """The source (with decorators) of the def in v1.py (or v2.py) that a target names."""
    path = FIXTURES / scenario / f"{version}.py"
    text = path.read_text()
    tree = ast.parse(text)
    parts = [p for p in target_qualname.split(".") if p != "<locals>"]
    accessor = None
    if parts[-1] in ("fset", "fdel"):
        accessor = {"fset": "setter", "fdel": "deleter"}[parts.pop()]
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        found = None
        for child in ast.walk(node) if not isinstance(node, ast.Module) else node.body:
            if child is node:
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (
                child.name == part
            ):
                if last and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    kind = _accessor_kind(child)
                    if kind != accessor:
                        continue
                found = child
                break
        assert found is not None, f"{target_qualname}: {part} not in {path}"
        node = found
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    lines = text.splitlines(keepends=True)[first - 1 : node.end_lineno]
    return textwrap.dedent("".join(lines))


def _accessor_kind(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    for d in node.decorator_list:
        if isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter"):
            return d.attr
    return None


def with_v1_expect(patch: livepatch.Patch, scenario: str) -> livepatch.Patch:
    """Fill every replacement's expect= with the v1 source of its target."""
    for spec in patch.functions:
        qualname = spec.target.partition(":")[2]
        spec.expect = v1_def_source(scenario, qualname)
    return patch


def snapshot(*objs: Any) -> dict[str, Any]:
    """Everything livepatch may change: code, defaults, kwdefaults, and namespaces."""
    snap: dict[str, Any] = {}
    for i, obj in enumerate(objs):
        if isinstance(obj, types.FunctionType):
            snap[f"{i}:code"] = obj.__code__
            snap[f"{i}:defaults"] = obj.__defaults__
            snap[f"{i}:kwdefaults"] = (
                dict(obj.__kwdefaults__) if obj.__kwdefaults__ is not None else None
            )
        elif isinstance(obj, (types.ModuleType, type)):
            snap[f"{i}:dict"] = dict(vars(obj))
        else:  # pragma: no cover - helper misuse
            raise TypeError(obj)
    return snap


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, dict):
            assert value.keys() == other.keys(), key
            for name in value:
                assert value[name] is other[name] or value[name] == other[name], (key, name)
        else:
            assert value is other or value == other, key


Call = Callable[..., Any]
