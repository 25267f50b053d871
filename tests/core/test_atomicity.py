"""Issue 2 item 10: any refusal or failure leaves every function, module and class exactly
as before — code objects, defaults, kwdefaults, module and class namespaces, the applied
list and the version stacks."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest

import livepatch

from .conftest import Env, assert_same_snapshot, snapshot

IMM = "immediate"

SOURCE = """
import functools


class BadCache:
    # a caching decorator whose cache_clear is broken (e.g. a third-party cache)
    def __init__(self, fn):
        self.__wrapped__ = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        return self.__wrapped__(*args)

    def cache_clear(self):
        if BROKEN:
            raise RuntimeError("cache backend unavailable")


BROKEN = [True]


def a(x, y=1, *, z=2):
    return ("a", x, y, z)


def b(x):
    return ("b", x)


def c(x):
    return ("c", x)


def gen(n):
    yield n


@BadCache
def cached(x):
    return ("cached", x)


class K:
    def m(self, x=5):
        return ("m", x)

    @staticmethod
    def s(x):
        return ("s", x)
"""

PATCH = """
import livepatch

patch = livepatch.Patch("NAME", cumulative=CUMULATIVE)


@patch.function("TARGET_MODULE:a")
def a(x, y=10, *, z=20):
    return ("A", x, y, z)


@patch.function("TARGET_MODULE:K.m")
def m(self, x=50):
    return ("M", x)


@patch.function("TARGET_MODULE:b")
def b(x):
    return ("B", x)


patch.new("TARGET_MODULE:NEW_VALUESUFFIX", 1)
patch.new("TARGET_MODULE:K.new_attrSUFFIX", 2)

LAST
"""


@pytest.fixture
def m(env: Env) -> types.ModuleType:
    return env.source_module(SOURCE, "atomic")


def make(env: Env, m: types.ModuleType, last: str = "", name: str = "atomic",
         cumulative: bool = False, suffix: str = "") -> livepatch.Patch:
    text = PATCH.replace("NAME", name).replace("CUMULATIVE", str(cumulative))
    text = text.replace("SUFFIX", suffix)
    text = text.replace("LAST", last)
    return livepatch.load(env.patch_text(text, m))


def everything(m: types.ModuleType) -> dict[str, Any]:
    funcs = [m.a, m.b, m.c, m.gen, m.cached.__wrapped__, m.K.__dict__["m"], m.K.s]
    snap = snapshot(*funcs, m, m.K)
    snap["applied"] = [(p.name, p.state, tuple(p.functions)) for p in livepatch.patches()]
    return snap


def behaviour(m: types.ModuleType) -> tuple[Any, ...]:
    return (m.a(0), m.b(0), m.c(0), m.K().m(), m.K.s(0), m.cached(0))


def assert_untouched(m: types.ModuleType, apply: Callable[[], Any],
                     error: type[Exception]) -> pytest.ExceptionInfo[Any]:
    before, calls = everything(m), behaviour(m)
    with pytest.raises(error) as info:
        apply()
    assert_same_snapshot(before, everything(m))
    assert behaviour(m) == calls
    return info


LAST_TARGET_FAILURES = {
    "unknown attribute": (
        '@patch.function("TARGET_MODULE:K.nothing")\ndef nothing(self):\n    pass\n',
        livepatch.TargetNotFound,
    ),
    "kind change": (
        '@patch.function("TARGET_MODULE:gen")\ndef gen(n):\n    return n\n',
        livepatch.UnsafeChange,
    ),
    "fingerprint": (
        '@patch.function("TARGET_MODULE:c", expect="def c(x):\\n    return 0\\n")\n'
        "def c(x):\n    return 1\n",
        livepatch.FingerprintMismatch,
    ),
    "new name clash": ('patch.new("TARGET_MODULE:K.s", 3)\n', livepatch.UnsafeChange),
    "new name on unknown class": ('patch.new("TARGET_MODULE:Nope.x", 3)\n',
                                  livepatch.TargetNotFound),
    "new name install fails": ('patch.new("builtins:int.lpcore_x", 3)\n', livepatch.PatchError),
}


@pytest.mark.parametrize("case", sorted(LAST_TARGET_FAILURES))
def test_failure_in_last_target_changes_nothing(env: Env, m: types.ModuleType,
                                                case: str) -> None:
    last, error = LAST_TARGET_FAILURES[case]
    patch = make(env, m, last)
    assert_untouched(m, lambda: livepatch.apply(patch, model=IMM), error)
    assert not hasattr(int, "lpcore_x")


def stack_two(env: Env, m: types.ModuleType) -> None:
    livepatch.apply(make(env, m, name="base-1"), model=IMM)
    text = """
        import livepatch
        patch = livepatch.Patch("base-2")
        patch.state("fmt", 2)

        @patch.function("TARGET_MODULE:c")
        def c(x):
            return ("C2", x)
    """
    livepatch.apply(livepatch.load(env.patch_text(text, m)), model=IMM)


@pytest.mark.parametrize("case", sorted(LAST_TARGET_FAILURES))
def test_failure_over_applied_patches_changes_nothing(env: Env, m: types.ModuleType,
                                                      case: str) -> None:
    """The same failures, with patches already stacked on the targets."""
    stack_two(env, m)
    last, error = LAST_TARGET_FAILURES[case]
    patch = make(env, m, last, name="failing", suffix="_2")
    assert_untouched(m, lambda: livepatch.apply(patch, model=IMM), error)


CUMULATIVE_XFAIL: dict[str, str] = {}  # FINDINGS #5 fixed


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(reason=CUMULATIVE_XFAIL[c], strict=True))
        if c in CUMULATIVE_XFAIL else c
        for c in sorted(LAST_TARGET_FAILURES)
    ],
)
def test_failing_cumulative_patch_changes_nothing(env: Env, m: types.ModuleType,
                                                  case: str) -> None:
    """A failing atomic replace: it carries (re-adds) the names base-1 added."""
    stack_two(env, m)
    last, error = LAST_TARGET_FAILURES[case]
    last += '\npatch.state("fmt", 2)\n'
    patch = make(env, m, last, name="failing", cumulative=True)
    assert_untouched(m, lambda: livepatch.apply(patch, model=IMM), error)
    assert m.NEW_VALUE == 1 and m.K.new_attr == 2


def test_pre_patch_veto_changes_nothing(env: Env, m: types.ModuleType) -> None:
    ran: list[str] = []
    patch = make(env, m)

    @patch.pre_patch
    def first() -> None:
        ran.append("first")

    @patch.pre_patch
    def veto() -> None:
        ran.append("veto")
        raise RuntimeError("not today")

    @patch.post_patch
    def post() -> None:
        ran.append("post")

    @patch.post_unpatch
    def post_unpatch() -> None:
        ran.append("post_unpatch")

    info = assert_untouched(m, lambda: livepatch.apply(patch, model=IMM),
                            livepatch.CallbackFailed)
    assert "not today" in str(info.value) and "veto" in str(info.value)
    assert ran == ["first", "veto"]


def test_state_mismatch_changes_nothing(env: Env, m: types.ModuleType) -> None:
    text = """
        import livepatch
        patch = livepatch.Patch("stateful")
        patch.state("fmt", 3)

        @patch.function("TARGET_MODULE:c")
        def c(x):
            return ("C3", x)
    """
    livepatch.apply(livepatch.load(env.patch_text(text, m)), model=IMM)
    downgrade = make(env, m, 'patch.state("fmt", 2)\n', name="downgrade")
    info = assert_untouched(m, lambda: livepatch.apply(downgrade, model=IMM),
                            livepatch.StateMismatch)
    assert "fmt" in str(info.value) and "stateful" in str(info.value)
    drops = make(env, m, name="drops", cumulative=True)
    assert_untouched(m, lambda: livepatch.apply(drops, model=IMM), livepatch.StateMismatch)


def test_failed_install_of_new_name_runs_post_unpatch(env: Env, m: types.ModuleType) -> None:
    ran: list[str] = []
    patch = make(env, m, 'patch.new("builtins:int.lpcore_x", 3)\n')
    patch.pre_patch(lambda: ran.append("pre"))
    patch.post_patch(lambda: ran.append("post"))
    patch.post_unpatch(lambda: ran.append("post_unpatch"))
    assert_untouched(m, lambda: livepatch.apply(patch, model=IMM), livepatch.PatchError)
    assert ran == ["pre", "post_unpatch"]  # the kernel's pairing: pre_patch ran, so unpatch


def test_failure_while_installing_changes_nothing(env: Env, m: types.ModuleType) -> None:
    """The install itself fails (an lru_cache-like wrapper whose cache_clear raises)."""
    last = '@patch.function("TARGET_MODULE:cached")\ndef cached(x):\n    return ("CACHED", x)\n'
    patch = make(env, m, last)
    ran: list[str] = []
    patch.post_unpatch(lambda: ran.append("post_unpatch"))
    try:
        assert_untouched(m, lambda: livepatch.apply(patch, model=IMM), livepatch.PatchError)
        assert ran == ["post_unpatch"]
    finally:
        m.BROKEN.clear()  # let the cleanup revert whatever was left applied


def test_plan_changes_nothing(env: Env, m: types.ModuleType) -> None:
    patch = make(env, m)
    before = everything(m)
    plan = livepatch.plan(patch)
    assert len(plan.changes) == 3
    assert_same_snapshot(before, everything(m))
