"""The Linux livepatch selftests' shapes (tools/testing/selftests/livepatch): basic
patch/unpatch, stacked patches, atomic replace, callbacks and their pairing, states."""

from __future__ import annotations

import logging
import sys
import time
import types

import pytest

import livepatch

from .conftest import Env

IMM = "immediate"

TARGET = """
def f():
    return "f0"


def g():
    return "g0"


def h():
    return "h0"
"""


@pytest.fixture
def m(env: Env) -> types.ModuleType:
    return env.source_module(TARGET, "selftest")


def mk(env: Env, m: types.ModuleType, name: str, funcs: dict[str, str],
       cumulative: bool = False, states: dict[str, int] | None = None) -> livepatch.Patch:
    """A patch file where each function in `funcs` returns the given string."""
    lines = ["import livepatch", f"patch = livepatch.Patch({name!r}, cumulative={cumulative})"]
    for state, version in (states or {}).items():
        lines.append(f"patch.state({state!r}, {version})")
    for fn, value in funcs.items():
        lines += ["", f"@patch.function('TARGET_MODULE:{fn}')", f"def {fn}():",
                  f"    return {value!r}"]
    return livepatch.load(env.patch_text("\n".join(lines) + "\n", m, f"{name}.py"))


def now(m: types.ModuleType) -> tuple[str, str, str]:
    return (m.f(), m.g(), m.h())


def names() -> list[str]:
    return [p.name for p in livepatch.patches()]


def test_basic_patch_unpatch(env: Env, m: types.ModuleType) -> None:
    before = time.time()
    t = livepatch.apply(mk(env, m, "basic", {"f": "f1"}), model=IMM)
    assert t.done and t.error is None
    info = t.to_dict()
    assert info["patch"] == "basic" and info["direction"] == "patch"
    assert info["state"] == "complete" and info["model"] == IMM
    assert info["functions"] == [f"{m.__name__}:f"]
    assert livepatch.transition() is None  # nothing in flight afterwards
    assert now(m) == ("f1", "g0", "h0")
    (applied,) = livepatch.patches()
    assert applied.name == "basic" and applied.state == "applied"
    assert applied.functions == [f"{m.__name__}:f"]
    assert before <= applied.applied_at <= time.time()
    assert applied.model == IMM and not applied.forced and not applied.cumulative
    assert applied.to_dict()["functions"] == [f"{m.__name__}:f"]
    t = livepatch.revert("basic", model=IMM)
    assert t.done
    assert now(m) == ("f0", "g0", "h0")
    assert livepatch.patches() == []


@pytest.mark.parametrize("order", [("p1", "p2"), ("p2", "p1")])
def test_stacked_patches_reverted_in_either_order(env: Env, m: types.ModuleType,
                                                  order: tuple[str, str]) -> None:
    livepatch.apply(mk(env, m, "p1", {"f": "f1", "g": "g1"}), model=IMM)
    livepatch.apply(mk(env, m, "p2", {"f": "f2"}), model=IMM)
    assert now(m) == ("f2", "g1", "h0")
    assert names() == ["p1", "p2"]
    first, second = order
    livepatch.revert(first, model=IMM)
    remaining = {"p1": ("f1", "g1", "h0"), "p2": ("f2", "g0", "h0")}[second]
    assert now(m) == remaining  # the newest remaining version runs
    assert names() == [second]
    livepatch.revert(second, model=IMM)
    assert now(m) == ("f0", "g0", "h0")


def test_three_stacked_patches_revert_middle(env: Env, m: types.ModuleType) -> None:
    for i in (1, 2, 3):
        livepatch.apply(mk(env, m, f"p{i}", {"f": f"f{i}"}), model=IMM)
    livepatch.revert("p2", model=IMM)
    assert m.f() == "f3"
    livepatch.revert("p3", model=IMM)
    assert m.f() == "f1"
    livepatch.apply(mk(env, m, "p4", {"f": "f4"}), model=IMM)
    assert m.f() == "f4"
    livepatch.revert("p4", model=IMM)
    assert m.f() == "f1"
    livepatch.revert("p1", model=IMM)
    assert m.f() == "f0"


def test_atomic_replace_over_three_patches(env: Env, m: types.ModuleType) -> None:
    ran: list[str] = []
    patches = [
        mk(env, m, "p1", {"f": "f1", "g": "g1"}),
        mk(env, m, "p2", {"g": "g2", "h": "h2"}),
        mk(env, m, "p3", {"h": "h3"}),
    ]
    for p in patches:
        for kind in ("pre_unpatch", "post_unpatch"):
            getattr(p, kind)(lambda p=p, kind=kind: ran.append(f"{p.name}:{kind}"))
        livepatch.apply(p, model=IMM)
    assert now(m) == ("f1", "g2", "h3")
    replace = mk(env, m, "replace", {"f": "fR"}, cumulative=True)
    replace.pre_patch(lambda: ran.append("replace:pre_patch"))
    replace.post_patch(lambda: ran.append("replace:post_patch"))
    livepatch.apply(replace, model=IMM)
    assert now(m) == ("fR", "g0", "h0")  # functions it does not name go back to original
    assert names() == ["replace"]
    assert livepatch.patches()[0].cumulative
    assert ran == ["replace:pre_patch", "replace:post_patch"]  # no unpatch of superseded
    with pytest.raises(livepatch.NotApplied):
        livepatch.revert("p1", model=IMM)
    livepatch.revert("replace", model=IMM)
    assert now(m) == ("f0", "g0", "h0")
    assert livepatch.patches() == []
    # the superseded patches can be applied again afterwards
    livepatch.apply(mk(env, m, "p1", {"f": "f1", "g": "g1"}), model=IMM)
    assert now(m) == ("f1", "g1", "h0")


def test_patch_on_top_of_cumulative(env: Env, m: types.ModuleType) -> None:
    livepatch.apply(mk(env, m, "c1", {"f": "fc", "g": "gc"}, cumulative=True), model=IMM)
    livepatch.apply(mk(env, m, "p", {"g": "gp"}), model=IMM)
    assert now(m) == ("fc", "gp", "h0")
    livepatch.revert("c1", model=IMM)
    assert now(m) == ("f0", "gp", "h0")
    livepatch.apply(mk(env, m, "c2", {"h": "hc"}, cumulative=True), model=IMM)
    assert now(m) == ("f0", "g0", "hc")
    assert names() == ["c2"]


# -- callbacks ----------------------------------------------------------------------


def test_callback_order_and_pairing(env: Env, m: types.ModuleType) -> None:
    seen: list[tuple[str, str]] = []
    patch = mk(env, m, "cb", {"f": "f1"})
    for kind in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch"):
        getattr(patch, kind)(lambda kind=kind: seen.append((kind, m.f())))
    livepatch.apply(patch, model=IMM)
    assert seen == [("pre_patch", "f0"), ("post_patch", "f1")]
    livepatch.revert("cb", model=IMM)
    assert seen[2:] == [("pre_unpatch", "f1"), ("post_unpatch", "f0")]


def test_pre_patch_veto(env: Env, m: types.ModuleType) -> None:
    seen: list[str] = []
    patch = mk(env, m, "veto", {"f": "f1"})
    patch.pre_patch(lambda: seen.append("pre"))

    @patch.pre_patch
    def refuse() -> None:
        raise RuntimeError("device busy")

    patch.post_patch(lambda: seen.append("post"))
    patch.post_unpatch(lambda: seen.append("post_unpatch"))
    with pytest.raises(livepatch.CallbackFailed) as info:
        livepatch.apply(patch, model=IMM)
    assert "veto" in str(info.value) and "device busy" in str(info.value)
    assert seen == ["pre"]
    assert m.f() == "f0" and livepatch.patches() == []


def test_pre_unpatch_veto_keeps_the_patch(env: Env, m: types.ModuleType) -> None:
    patch = mk(env, m, "stay", {"f": "f1"})
    allow = [False]

    @patch.pre_unpatch
    def gate() -> None:
        if not allow[0]:
            raise RuntimeError("still in use")

    seen: list[str] = []
    patch.post_unpatch(lambda: seen.append("post_unpatch"))
    livepatch.apply(patch, model=IMM)
    with pytest.raises(livepatch.CallbackFailed, match="still in use"):
        livepatch.revert("stay", model=IMM)
    assert m.f() == "f1" and names() == ["stay"] and seen == []
    assert livepatch.patches()[0].state == "applied"
    allow[0] = True
    livepatch.revert("stay", model=IMM)
    assert m.f() == "f0" and seen == ["post_unpatch"]


def test_a_pre_unpatch_that_always_vetoes_says_the_way_out_which_works(
    env: Env, m: types.ModuleType
) -> None:
    patch = mk(env, m, "pinned", {"f": "f1"})

    @patch.pre_unpatch
    def broken() -> None:
        raise RuntimeError("bug in the callback")

    livepatch.apply(patch, model=IMM)
    for force in (False, True):  # force is about transitions: it does not skip a veto
        with pytest.raises(livepatch.CallbackFailed, match="cumulative=True supersedes"):
            livepatch.revert("pinned", model=IMM, force=force)
    assert m.f() == "f1" and names() == ["pinned"]
    livepatch.apply(mk(env, m, "way-out", {"f": "f0"}, cumulative=True), model=IMM)
    assert m.f() == "f0" and names() == ["way-out"]
    livepatch.revert("way-out", model=IMM)
    assert m.f() == "f0" and names() == []


def test_failing_post_patch_is_reported_not_fatal(env: Env, m: types.ModuleType) -> None:
    patch = mk(env, m, "post-fails", {"f": "f1"})

    @patch.post_patch
    def broken() -> None:
        raise ValueError("metrics down")

    livepatch.apply(patch, model=IMM)
    assert m.f() == "f1"
    (applied,) = livepatch.patches()
    assert any("metrics down" in e for e in applied.callback_errors)


# -- states ---------------------------------------------------------------------------


def test_cumulative_must_carry_every_state(env: Env, m: types.ModuleType) -> None:
    livepatch.apply(mk(env, m, "s1", {"f": "f1"}, states={"fmt": 2, "cache": 1}), model=IMM)
    livepatch.apply(mk(env, m, "s2", {"g": "g1"}, states={"lock": 1}), model=IMM)
    drops = mk(env, m, "drops", {"f": "fx"}, cumulative=True, states={"fmt": 2, "cache": 1})
    with pytest.raises(livepatch.StateMismatch, match="lock"):
        livepatch.apply(drops, model=IMM)
    lower = mk(env, m, "lower", {"f": "fx"}, cumulative=True,
               states={"fmt": 1, "cache": 1, "lock": 1})
    with pytest.raises(livepatch.StateMismatch, match="fmt"):
        livepatch.apply(lower, model=IMM)
    assert names() == ["s1", "s2"] and now(m) == ("f1", "g1", "h0")
    ok = mk(env, m, "ok", {"f": "fx"}, cumulative=True,
            states={"fmt": 3, "cache": 1, "lock": 1, "extra": 1})
    livepatch.apply(ok, model=IMM)
    assert names() == ["ok"] and now(m) == ("fx", "g0", "h0")
    assert livepatch.patches()[0].states == {"fmt": 3, "cache": 1, "lock": 1, "extra": 1}


def test_non_cumulative_may_not_downgrade(env: Env, m: types.ModuleType) -> None:
    livepatch.apply(mk(env, m, "s1", {"f": "f1"}, states={"fmt": 2}), model=IMM)
    with pytest.raises(livepatch.StateMismatch, match="fmt"):
        livepatch.apply(mk(env, m, "down", {"g": "g1"}, states={"fmt": 1}), model=IMM)
    livepatch.apply(mk(env, m, "omits", {"g": "g1"}), model=IMM)  # may leave it out
    livepatch.apply(mk(env, m, "same", {"h": "h1"}, states={"fmt": 2}), model=IMM)
    assert now(m) == ("f1", "g1", "h1")


def test_state_version_must_be_a_non_negative_int() -> None:
    patch = livepatch.Patch("bad-state")
    with pytest.raises(livepatch.PatchFileError):
        patch.state("fmt", -1)
    with pytest.raises(livepatch.PatchFileError):
        patch.state("fmt", "2")  # type: ignore[arg-type]


def test_atomic_replace_and_new_names(env: Env, m: types.ModuleType) -> None:
    p1 = mk(env, m, "n1", {"f": "f1"})
    p1.new(f"{m.__name__}:KEPT", "from n1")
    p1.new(f"{m.__name__}:DROPPED", "from n1")
    livepatch.apply(p1, model=IMM)
    assert (m.KEPT, m.DROPPED) == ("from n1", "from n1")
    replace = mk(env, m, "nR", {"g": "gR"}, cumulative=True)
    replace.new(f"{m.__name__}:KEPT", "from nR")
    livepatch.apply(replace, model=IMM)
    assert m.KEPT == "from nR"
    assert not hasattr(m, "DROPPED")  # superseded patch's helper goes with it
    assert now(m) == ("f0", "gR", "h0")
    livepatch.revert("nR", model=IMM)
    assert not hasattr(m, "KEPT")


def test_patches_reports_when_new_code_first_ran(env: Env, m: types.ModuleType) -> None:
    livepatch.apply(mk(env, m, "ex", {"f": "f1", "g": "g1"}), model=IMM)
    (view,) = livepatch.patches()
    if sys.version_info < (3, 12):
        assert view.exercised is None  # documented: unknown on 3.11
        return
    keys = {f"{m.__name__}:f", f"{m.__name__}:g"}
    assert view.exercised == dict.fromkeys(keys)
    t0 = time.time()
    assert m.f() == "f1"
    (view,) = livepatch.patches()
    assert view.exercised is not None
    ran = view.exercised[f"{m.__name__}:f"]
    assert ran is not None and t0 - 1 <= ran <= time.time()
    assert view.exercised[f"{m.__name__}:g"] is None


def test_what_callbacks_see_in_patches(env: Env, m: types.ModuleType) -> None:
    seen: dict[str, list[tuple[str, str]]] = {}
    patch = mk(env, m, "views", {"f": "f1"})

    def record(kind: str) -> None:
        seen[kind] = [(p.name, p.state) for p in livepatch.patches()]

    for kind in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch"):
        getattr(patch, kind)(lambda kind=kind: record(kind))
    livepatch.apply(patch, model=IMM)
    livepatch.revert("views", model=IMM)
    assert seen["pre_patch"] == []
    assert seen["post_patch"] == [("views", "applied")]
    assert seen["pre_unpatch"] == [("views", "applied")]
    assert seen["post_unpatch"] == []


def test_plan_of_atomic_replace_says_what_goes_back(env: Env, m: types.ModuleType) -> None:
    livepatch.apply(mk(env, m, "p1", {"f": "f1", "g": "g1"}), model=IMM)
    livepatch.apply(mk(env, m, "p2", {"h": "h2"}), model=IMM)
    replace = mk(env, m, "replace", {"f": "fR"}, cumulative=True)
    plan = livepatch.plan(replace)
    said = " ".join([*(c.target + " " + c.note for c in plan.changes), *plan.notes])
    # a dry run must show that g and h go back to their original code, and p1/p2 go away
    for name in (f"{m.__name__}:g", f"{m.__name__}:h", "p1", "p2"):
        assert name in said, (name, said)
    assert now(m) == ("f1", "g1", "h2")


_AUDIT: list[tuple[str, tuple[object, ...]]] | None = None


def _audit_hook(event: str, args: tuple[object, ...]) -> None:
    if _AUDIT is not None and event.startswith("livepatch."):
        _AUDIT.append((event, args))


def test_audit_events_for_apply_revert_and_refusal(env: Env, m: types.ModuleType) -> None:
    global _AUDIT
    if not getattr(sys, "_lpcore_audit_installed", False):
        sys.addaudithook(_audit_hook)  # cannot be removed: it records only while _AUDIT is set
        sys._lpcore_audit_installed = True  # type: ignore[attr-defined]
    _AUDIT = []
    try:
        patch = mk(env, m, "audited", {"f": "f1"})
        livepatch.apply(patch, model=IMM)
        livepatch.revert("audited", model=IMM)
        bad = mk(env, m, "refused-one", {"nothing": "x"})
        with pytest.raises(livepatch.TargetNotFound):
            livepatch.apply(bad, model=IMM)
        events = list(_AUDIT)
    finally:
        _AUDIT = None
    kinds = [e for e, _ in events]
    assert kinds == ["livepatch.apply", "livepatch.revert", "livepatch.refused"], events
    assert events[0][1][0] == "audited" and events[0][1][1] == patch.sha256
    assert events[1][1][0] == "audited"
    refused = events[2][1]
    assert refused[0] == "refused-one" and "target-not-found" in refused
    assert any("nothing" in str(a) for a in refused)


def test_reverted_patch_does_not_keep_target_alive(env: Env) -> None:
    import gc
    import weakref

    m = env.source_module(TARGET, "leak")
    patch = mk(env, m, "leaky", {"f": "f1", "g": "g1"})
    livepatch.apply(patch, model=IMM)
    livepatch.revert("leaky", model=IMM)
    refs = [weakref.ref(m), weakref.ref(m.f), weakref.ref(m.g)]
    name = m.__name__
    del m, patch
    sys.modules.pop(name)
    env.modules.remove(name)
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, [getattr(a, "__name__", a) for a in alive]


def test_reverted_nested_patch_does_not_keep_target_alive(env: Env) -> None:
    import gc
    import weakref

    m = env.source_module(
        "def outer(k):\n    def inner(x):\n        return x * k\n    return inner\n\n"
        "made = outer(2)\n",
        "leak_nested",
    )
    text = """
        import livepatch
        patch = livepatch.Patch("leaky-nested")

        @patch.function("TARGET_MODULE:outer.<locals>.inner")
        def inner(x):
            return x * k + 1
    """
    livepatch.apply(livepatch.load(env.patch_text(text, m)), model=IMM)
    assert m.made(1) == 3
    livepatch.revert("leaky-nested", model=IMM)
    refs = [weakref.ref(m), weakref.ref(m.outer), weakref.ref(m.made)]
    name = m.__name__
    del m
    sys.modules.pop(name)
    env.modules.remove(name)
    gc.collect()
    assert all(r() is None for r in refs)


def test_log_records_do_not_hold_exceptions(env: Env, m: types.ModuleType,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """A refusal is logged; a buffering handler (MemoryHandler, a queue, pytest's capture)
    keeps the record. Its args must not hold the exception: its traceback holds the
    engine's frames, and they hold the target module and functions."""
    refused = livepatch.Patch("refused")
    refused.new(f"{m.__name__}:f", 1)
    with caplog.at_level(logging.INFO, logger="livepatch"):
        with pytest.raises(livepatch.UnsafeChange):
            livepatch.apply(refused, model=IMM)
    held = [a for r in caplog.records for a in (r.args or ()) if isinstance(a, BaseException)]
    assert not held, held


def test_revert_of_a_patch_whose_helper_a_later_patch_uses(env: Env,
                                                          m: types.ModuleType) -> None:
    """fix-2 (applied on top) calls a helper fix-1 added. Reverting fix-1 alone must not
    leave fix-2's code calling a name that is gone: refuse, or keep it working."""
    first = """
        import livepatch
        patch = livepatch.Patch("fix-1")

        @patch.new("TARGET_MODULE:_suffix")
        def _suffix(s):
            return s + "!"

        @patch.function("TARGET_MODULE:f")
        def f():
            return _suffix("f1")
    """
    second = """
        import livepatch
        patch = livepatch.Patch("fix-2")

        @patch.function("TARGET_MODULE:g")
        def g():
            return _suffix("g2")
    """
    livepatch.apply(livepatch.load(env.patch_text(first, m)), model=IMM)
    livepatch.apply(livepatch.load(env.patch_text(second, m)), model=IMM)
    assert (m.f(), m.g()) == ("f1!", "g2!")
    try:
        livepatch.revert("fix-1", model=IMM)
    except livepatch.PatchError as exc:
        assert "fix-2" in str(exc) and "_suffix" in str(exc), str(exc)
        assert (m.f(), m.g()) == ("f1!", "g2!")
        return
    assert m.g() == "g2!"  # still works after fix-1 is gone
    assert m.f() == "f0"
    livepatch.revert("fix-2", model=IMM)
    assert m.g() == "g0"
    assert not hasattr(m, "_suffix")  # nothing applied any more: the helper is gone too


def test_empty_cumulative_patch_reverts_everything(env: Env, m: types.ModuleType) -> None:
    """The kernel's way to drop every livepatch at once: an atomic replace naming nothing."""
    livepatch.apply(mk(env, m, "p1", {"f": "f1", "g": "g1"}, states={"fmt": 1}), model=IMM)
    livepatch.apply(mk(env, m, "p2", {"h": "h2"}), model=IMM)
    empty = mk(env, m, "nothing", {}, cumulative=True, states={"fmt": 1})
    livepatch.apply(empty, model=IMM)
    assert now(m) == ("f0", "g0", "h0")
    assert names() == ["nothing"]
    livepatch.revert("nothing", model=IMM)
    assert livepatch.patches() == []


def test_cumulative_patch_using_a_helper_it_does_not_carry(env: Env,
                                                          m: types.ModuleType) -> None:
    """fix-1 added _suffix; an atomic replace calls _suffix but does not re-add it. After
    the replace, fix-1 (and its helper) are gone: refuse, or keep the code working."""
    first = """
        import livepatch
        patch = livepatch.Patch("fix-1")

        @patch.new("TARGET_MODULE:_suffix")
        def _suffix(s):
            return s + "!"

        @patch.function("TARGET_MODULE:f")
        def f():
            return _suffix("f1")
    """
    replace = """
        import livepatch
        patch = livepatch.Patch("replace", cumulative=True)

        @patch.function("TARGET_MODULE:g")
        def g():
            return _suffix("gR")
    """
    livepatch.apply(livepatch.load(env.patch_text(first, m)), model=IMM)
    cumulative = livepatch.load(env.patch_text(replace, m))
    try:
        livepatch.apply(cumulative, model=IMM)
    except livepatch.PatchError as exc:
        assert "_suffix" in str(exc), str(exc)
        assert m.f() == "f1!" and [p.name for p in livepatch.patches()] == ["fix-1"]
        return
    assert m.g() == "gR!"
