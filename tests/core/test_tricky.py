"""Identity patches over constructs whose code depends on their context: each function of
fixtures/tricky/v1.py, replaced by its own source with `expect=` its own source, must verify
and keep behaving exactly the same (under the target's globals, class, cells and flags)."""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import Callable
from typing import Any

import pytest

import livepatch

from .conftest import Env, v1_def_source

IMM = "immediate"

TARGETS = [
    "uses_global", "comprehensions", "walrus_and_match", "exceptions", "star_args",
    "imports_used", "lambdas_inside", "async_stuff", "_agen", "Base.greet",
    "Tricky.__init__", "Tricky.mangled_in_comprehension", "Tricky.super_in_comprehension",
    "Tricky.class_cell_in_lambda", "Tricky.closure_over_self", "Tricky.make",
    "Tricky.static", "Tricky.first", "Tricky.generator", "Tricky.Inner.reveal",
    "local_import", "lambda_defaults", "nested_global", "try_finally_gen", "factory",
    "factory.<locals>.adder", "factory.<locals>.counter",
]


def function_of(m: types.ModuleType, qualname: str) -> types.FunctionType:
    """The plain function behind a qualname of the fixture (written for these shapes)."""
    if qualname.startswith("factory.<locals>."):
        adder, counter = m.factory(0)
        return adder if qualname.endswith("adder") else counter
    obj: Any = m
    for part in qualname.split("."):
        obj = vars(obj)[part]
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    assert isinstance(obj, types.FunctionType), qualname
    return obj


def behaviour(m: types.ModuleType) -> list[Any]:
    t = m.Tricky()
    calls: list[Callable[[], Any]] = [
        lambda: m.comprehensions(4),
        lambda: m.walrus_and_match([{"kind": "pair", "a": 1, "b": 2}, [1, 2, 3], "s", 5]),
        lambda: m.exceptions(0),
        lambda: m.exceptions(4),
        lambda: m.star_args(1, 2, 3, c=4, z=5),
        lambda: m.imports_used(["a", "b"]),
        lambda: m.lambdas_inside([3, 1, 2]),
        lambda: asyncio.run(m.async_stuff([1, 2])),
        lambda: m.Base().greet(),
        lambda: t.mangled_in_comprehension(),
        lambda: t.super_in_comprehension(),
        lambda: t.class_cell_in_lambda(),
        lambda: t.closure_over_self(),
        lambda: m.Tricky.make(),
        lambda: t.static(7),
        lambda: t.first,
        lambda: list(t.generator()),
        lambda: m.Tricky.Inner().reveal(),
        lambda: m.local_import(3),
        lambda: m.lambda_defaults(3),
        lambda: list(m.try_finally_gen(2)),
        lambda: m.made_adder(1),
        lambda: m.factory(1)[0](1),
    ]
    out = [call() for call in calls]
    counter = m.factory(5)[1]
    out.append((counter(), counter()))
    return out


def identity_patch_text(module: str) -> str:
    """A patch file replacing every target by its own v1 source (decorators dropped, as a
    replacement is written), each with expect= that same source."""
    lines = ["import livepatch", "patch = livepatch.Patch('tricky-identity')", ""]
    for qualname in TARGETS:
        source = v1_def_source("tricky", qualname)
        body = [ln for ln in source.splitlines() if not ln.lstrip().startswith("@")]
        deco = f"@patch.function({module + ':' + qualname!r}, expect={source!r})"
        if "nonlocal k" in source:  # nonlocal needs an enclosing function with k
            lines += ["def _context():", "    k = None", "", "    " + deco]
            lines += ["    " + ln for ln in body]
            lines += ["", "", "_context()", ""]
        else:
            lines += [deco, *body, "", ""]
    return "\n".join(lines)


def test_identity_patch_of_tricky_constructs(env: Env) -> None:
    m = env.module("tricky")
    twin = env.module("tricky")  # never patched: the reference behaviour
    expected = behaviour(twin)
    assert behaviour(m) == expected
    path = env.tmp_path / "identity.py"
    path.write_text(identity_patch_text(m.__name__))
    patch = livepatch.load(path)
    plan = livepatch.plan(patch)
    unverified = [c.target for c in plan.changes if not c.verified]
    assert not unverified, unverified
    livepatch.apply(patch, model=IMM)
    for qualname in TARGETS:  # the new code really is installed, and is what v1 compiles to
        code = function_of(m, qualname).__code__
        assert "[livepatch tricky-identity]" in code.co_filename, qualname
        assert livepatch.fingerprint(code) == livepatch.fingerprint(
            function_of(twin, qualname).__code__), qualname
    assert behaviour(m) == behaviour(twin)
    # globals are the target's, not the patch file's
    before = (m.COUNTER, twin.COUNTER)
    m.uses_global()
    assert (m.COUNTER, twin.COUNTER) == (before[0] + 1, before[1])
    livepatch.revert("tricky-identity", model=IMM)
    assert behaviour(m) == behaviour(twin)


@pytest.mark.parametrize(
    "qualname",
    TARGETS,
)
def test_sha256_of_twin_verifies(env: Env, qualname: str) -> None:
    """expect=livepatch.fingerprint(f) of the same function in an unpatched copy."""
    m = env.module("tricky")
    twin = env.module("tricky")
    flags = function_of(twin, qualname).__code__.co_flags
    header, body = "def", "pass"
    if flags & inspect.CO_COROUTINE:
        header = "async def"
    elif flags & inspect.CO_ASYNC_GENERATOR:
        header, body = "async def", "yield"
    elif flags & inspect.CO_GENERATOR:
        body = "yield"
    text = (
        "import livepatch\npatch = livepatch.Patch('tricky-fp')\n\n"
        f"@patch.function({m.__name__ + ':' + qualname!r}, expect=FP)\n"
        f"{header} replacement(*args, **kwargs):\n    {body}\n"
    )
    patch = livepatch.load(env.patch_text(
        text.replace("FP", repr(livepatch.fingerprint(function_of(twin, qualname)))), m))
    assert livepatch.plan(patch).changes[0].verified
