"""expect=: the engine proves the live code is the code a patch was built against."""

from __future__ import annotations

import logging

import pytest

import livepatch

from .conftest import FIXTURES, Env, v1_def_source

IMM = "immediate"

SCENARIOS = sorted(p.name for p in FIXTURES.iterdir() if (p / "patch.py").exists())

# targets whose v1 def has another name or place than the target's qualname
V1_DEFS = {
    ("closures", "add5"): "make_adder.add",
    ("closures", "tick"): "make_counter.tick",
}

XFAIL: dict[str, str] = {}  # FINDINGS #1 fixed


def expect_v1(patch: livepatch.Patch, scenario: str) -> None:
    for spec in patch.functions:
        qualname = spec.target.partition(":")[2]
        spec.expect = v1_def_source(scenario, V1_DEFS.get((scenario, qualname), qualname))


def expect_v2(patch: livepatch.Patch, scenario: str) -> None:
    for spec in patch.functions:
        qualname = spec.target.partition(":")[2]
        where = V1_DEFS.get((scenario, qualname), qualname)
        spec.expect = v1_def_source(scenario, where, version="v2")


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(s, marks=pytest.mark.xfail(reason=XFAIL[s], strict=True))
        if s in XFAIL else s
        for s in SCENARIOS
    ],
)
def test_expect_v1_source_verifies(env: Env, scenario: str) -> None:
    m = env.module(scenario)
    patch = env.patch(scenario, m)
    expect_v1(patch, scenario)
    plan = livepatch.plan(patch)
    assert plan.changes and all(c.verified for c in plan.changes), plan.changes
    assert not plan.notes
    livepatch.apply(patch, model=IMM)
    assert [p.name for p in livepatch.patches()] == [patch.name]


@pytest.mark.parametrize(
    "scenario",
    SCENARIOS,
)
def test_expect_v2_source_is_refused(env: Env, scenario: str) -> None:
    m = env.module(scenario)
    patch = env.patch(scenario, m)
    expect_v2(patch, scenario)
    with pytest.raises(livepatch.FingerprintMismatch) as info:
        livepatch.plan(patch)
    assert m.__name__ in str(info.value)
    with pytest.raises(livepatch.FingerprintMismatch):
        livepatch.apply(patch, model=IMM)
    assert livepatch.patches() == []


def test_sha256_fingerprint_of_live_code_verifies(env: Env) -> None:
    m = env.module("plain_body")
    twin = env.module("plain_body")  # same source, another module: same fingerprint
    fp = livepatch.fingerprint(twin.price)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fp == livepatch.fingerprint(m.price)
    assert fp != livepatch.fingerprint(m.total)
    patch = env.patch("plain_body", m)
    patch.functions[0].expect = fp
    plan = livepatch.plan(patch)
    assert plan.changes[0].verified
    livepatch.apply(patch, model=IMM)
    assert m.price(1) == 11


def test_sha256_fingerprint_of_decorated_method_is_the_inner_body(env: Env) -> None:
    m = env.module("decorated_wraps")
    patch = env.patch("decorated_wraps", m)
    inner = m.Service.run.__wrapped__
    by_target = {
        f"{m.__name__}:handle": m.handle.__wrapped__,
        f"{m.__name__}:endpoint": m.endpoint.__wrapped__.__wrapped__,
        f"{m.__name__}:Service.run": inner,
    }
    for spec in patch.functions:
        spec.expect = livepatch.fingerprint(by_target[spec.target])
    assert all(c.verified for c in livepatch.plan(patch).changes)
    patch.functions[2].expect = livepatch.fingerprint(m.Service.run)  # the wrapper's
    with pytest.raises(livepatch.FingerprintMismatch, match="Service.run"):
        livepatch.plan(patch)


def test_wrong_sha256_fingerprint_is_refused(env: Env) -> None:
    m = env.module("plain_body")
    patch = env.patch("plain_body", m)
    patch.functions[0].expect = "sha256:" + "0" * 64
    with pytest.raises(livepatch.FingerprintMismatch) as info:
        livepatch.apply(patch, model=IMM)
    message = str(info.value)
    assert f"{m.__name__}:price" in message and "sha256:" + "0" * 64 in message
    assert "\n" not in message
    assert m.price(1) == 10


def test_fingerprint_ignores_line_numbers_and_indentation(env: Env) -> None:
    m = env.module("instances")
    patch = env.patch("instances", m)
    source = v1_def_source("instances", "Counter.step")
    moved = "\n\n\n" + "\n".join("        " + line for line in source.splitlines())
    patch.functions[0].expect = moved
    assert livepatch.plan(patch).changes[0].verified


def test_fingerprint_distinguishes_constants_of_equal_value(env: Env) -> None:
    m = env.source_module(
        """
        def f():
            return 1
        """
    )
    patch = livepatch.Patch("consts")

    @patch.function(f"{m.__name__}:f", expect="def f():\n    return 1.0\n")
    def f() -> int:
        return 2

    with pytest.raises(livepatch.FingerprintMismatch):
        livepatch.plan(patch)
    patch.functions[0].expect = "def f():\n    return True\n"
    with pytest.raises(livepatch.FingerprintMismatch):
        livepatch.plan(patch)
    patch.functions[0].expect = "def f():\n    return 1\n"
    assert livepatch.plan(patch).changes[0].verified


def test_no_expect_applies_and_plan_says_not_verified(env: Env) -> None:
    m = env.module("plain_body")
    patch = env.patch("plain_body", m)
    plan = livepatch.plan(patch)
    assert [c.verified for c in plan.changes] == [False]
    assert "not verified" in plan.changes[0].note
    assert any("not verified" in n for n in plan.notes)
    assert m.price(1) == 10  # plan changes nothing
    livepatch.apply(patch, model=IMM)
    assert m.price(1) == 11


def test_second_patch_may_expect_the_first_patchs_source(env: Env) -> None:
    m = env.module("plain_body")
    first = env.patch("plain_body", m)
    livepatch.apply(first, model=IMM)
    text = f"""
        import livepatch
        patch = livepatch.Patch("second")

        @patch.function("{m.__name__}:price", expect='''
        def price(n):
            if n < 0:
                raise ValueError("negative quantity")
            return n * RATE + 1
        ''')
        def price(n):
            return n * RATE + 2
    """
    second = livepatch.load(env.patch_text(text, m))
    assert livepatch.plan(second).changes[0].verified
    livepatch.apply(second, model=IMM)
    assert m.price(1) == 12


def test_apply_without_expect_says_nothing_was_verified(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    m = env.module("plain_body")
    patch = env.patch("plain_body", m)
    with caplog.at_level(logging.INFO, logger="livepatch"):
        livepatch.apply(patch, model=IMM)
    assert m.price(1) == 11
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "not verified" in text, text
    assert "verified 1 function" not in text, text  # would claim the opposite


def test_the_log_line_names_a_few_unverified_functions(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    m = env.source_module("".join(f"def price{i}(x):\n    return x + {i}\n" for i in range(12)))
    lines = ["import livepatch", "patch = livepatch.Patch('many')"]
    for i in range(12):
        lines += [f"@patch.function('{m.__name__}:price{i}')", f"def price{i}(x):",
                  "    return x", ""]
    patch = livepatch.loads("\n".join(lines))
    with caplog.at_level(logging.INFO, logger="livepatch"):
        livepatch.apply(patch, model=IMM)
    try:
        line = next(r.getMessage() for r in caplog.records if "not verified" in r.getMessage())
        assert f"{m.__name__}:price4 and 7 more" in line, line
        assert f"{m.__name__}:price5" not in line, line
        view = next(v for v in livepatch.patches() if v.name == "many")
        assert len(view.unverified) == 12
    finally:
        livepatch.revert("many", model=IMM)


def test_apply_with_expect_says_verified(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    m = env.module("plain_body")
    patch = env.patch("plain_body", m)
    expect_v1(patch, "plain_body")
    with caplog.at_level(logging.INFO, logger="livepatch"):
        livepatch.apply(patch, model=IMM)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "verified" in text and "not verified" not in text, text


# replacement names differ from the v2 def names here (closure instances bound to module
# names), so their code objects differ in co_name only
SAME_AS_V2 = [s for s in SCENARIOS if s != "closures"]
# v2 drops super() here: the live function keeps its __class__ cell (by design), so the
# installed code still lists __class__ as a free variable where v2's code does not
PADDED = {"super_call:Child.size"}


@pytest.mark.parametrize("scenario", SAME_AS_V2)
def test_patched_code_is_what_v2_compiles_to(env: Env, scenario: str) -> None:
    """After apply, each target runs exactly the code compiling v2.py produces (same
    class context, mangling, free variables, flags): the patch file is v2, recompiled in
    v1's live context."""
    from livepatch import locate

    m = env.module(scenario)
    v2 = env.module(scenario, "v2")
    patch = env.patch(scenario, m)
    livepatch.apply(patch, model=IMM)
    for spec in patch.functions:
        qualname = spec.target.partition(":")[2]
        if f"{scenario}:{qualname}" in PADDED:
            assert "__class__" in locate.resolve(spec.target).code.co_freevars
            continue
        live = locate.resolve(spec.target).code
        want = locate.resolve(f"{v2.__name__}:{qualname}").code
        assert livepatch.fingerprint(live) == livepatch.fingerprint(want), spec.target


@pytest.mark.parametrize(
    "expect",
    ["def price(n:\n    return 1\n", "def price(n):\n    return n\n\ndef other():\n    pass\n",
     "x = 1\n", "sha256:nothex", ""],
    ids=["syntax", "two-defs", "no-def", "bad-fingerprint", "empty"],
)
def test_malformed_expect_is_refused_with_the_target(env: Env, expect: str) -> None:
    m = env.module("plain_body")
    patch = env.patch("plain_body", m)
    patch.functions[0].expect = expect
    with pytest.raises(livepatch.PatchError) as info:
        livepatch.apply(patch, model=IMM)
    message = str(info.value)
    assert f"{m.__name__}:price" in message or "price" in message, message
    assert "\n" not in message
    assert m.price(1) == 10 and livepatch.patches() == []
