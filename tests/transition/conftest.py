"""Helpers for the consistency-model tests: live target modules, patches, cleanup.

A test writes a target module to ``tmp_path`` and imports it under a unique name (so it
has real source, as a process's modules do), then builds a patch file from text with
``livepatch.loads`` exactly as a user would. After each test every patch is reverted and
no transition may be left in flight, so tests cannot leak into each other.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import livepatch

tr = importlib.import_module("livepatch.transition")
_counter = itertools.count()


def import_source(tmp_path: Path, source: str, prefix: str = "lptr") -> types.ModuleType:
    name = f"{prefix}_{next(_counter)}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def patch_for(module: types.ModuleType, name: str, body: str) -> livepatch.Patch:
    """A patch file whose functions are `body` (``@patch.function("M:...")`` with M the
    module name filled in)."""
    text = "import asyncio, time\nimport livepatch\n\n"
    text += f"patch = livepatch.Patch({name!r})\n\n"
    text += textwrap.dedent(body).replace("M:", f"{module.__name__}:")
    return livepatch.loads(text, filename=f"<patch {name}>")


def settle_transition(timeout: float = 10.0) -> None:
    t = tr.transition()
    if t is not None and not t.done:
        t.force_complete()
        t._done.wait(timeout)


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    settle_transition()
    yield
    settle_transition()
    for applied in reversed(livepatch.patches()):
        try:
            livepatch.revert(applied.name, model="immediate")
        except livepatch.PatchError:
            pass
    leftover = [t for t in threading.enumerate() if t.name.startswith("lptest-")]
    assert not leftover, f"test left threads running: {leftover}"


@pytest.fixture
def tmp_module(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(source: str) -> types.ModuleType:
        return import_source(tmp_path, source)

    return make
