"""DESIGN.md section 7, "must work": one v1/v2 fixture pair per scenario.

Each test imports v1 as a live module, takes every kind of holder of the patched objects
*before* the patch (module attribute, ``from m import f`` copy, stored bound method,
partial, registry, instance, subclass...), applies the scenario's patch file, checks the
new behaviour through every holder (and against v2 where that is meaningful), reverts, and
checks the old behaviour is back.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import types
import warnings
from collections.abc import Iterator

import pytest

import livepatch

from .conftest import Env

IMM = "immediate"
MODEL = {"current": IMM}


@pytest.fixture(autouse=True, params=[IMM, "default"])
def model(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every scenario runs under the immediate model and under the default model (no
    model= argument; nothing else runs the patched code while the test applies)."""
    MODEL["current"] = request.param
    yield request.param
    MODEL["current"] = IMM


def apply(patch: livepatch.Patch) -> None:
    if MODEL["current"] == "default":
        t = livepatch.apply(patch)
    else:
        t = livepatch.apply(patch, model=IMM)
    assert t.done and t.error is None


def revert(patch: livepatch.Patch) -> None:
    if MODEL["current"] == "default":
        t = livepatch.revert(patch.name)
    else:
        t = livepatch.revert(patch.name, model=IMM)
    assert t.done and t.error is None


def from_import(module: types.ModuleType, *names: str) -> dict[str, object]:
    """What ``from module import names`` binds in another module."""
    ns: dict[str, object] = {}
    exec(f"from {module.__name__} import {', '.join(names)}", ns)
    return ns


# -- plain body, from-import copies, registries --------------------------------------


def test_plain_body(env: Env) -> None:
    m = env.module("plain_body")
    v2 = env.module("plain_body", "v2")
    copy = from_import(m, "price")["price"]
    holders = {
        "module attribute": lambda n: m.price(n),
        "from-import copy": copy,
        "registry": m.REGISTRY["price"],
        "partial": functools.partial(m.price),
        "caller in module": lambda n: m.total([n]),
    }
    for call in holders.values():
        assert call(3) == 30
    patch = env.patch("plain_body", m)
    apply(patch)
    for what, call in holders.items():
        assert call(3) == 31 == v2.price(3), what
        with pytest.raises(ValueError, match="negative quantity"):
            call(-1)
    assert m.price is copy  # never rebound: the same object runs new code
    assert m.price.__globals__ is vars(m)
    revert(patch)
    for what, call in holders.items():
        assert call(3) == 30, what
        assert call(-1) == -10, what


def test_from_import_copy_in_other_module(env: Env) -> None:
    lib = env.module("from_import")
    consumer = env.source_module(
        f"""
        from {lib.__name__} import compute

        def use(x):
            return compute(x)

        saved = [compute]
        """,
        "consumer",
    )
    assert consumer.use(1) == 2
    patch = env.patch("from_import", lib)
    apply(patch)
    assert consumer.use(1) == 101
    assert consumer.compute(1) == 101
    assert consumer.saved[0](1) == 101
    assert lib.compute(1) == 101
    revert(patch)
    assert consumer.use(1) == consumer.saved[0](1) == lib.compute(1) == 2


# -- methods --------------------------------------------------------------------------


def test_bound_methods_stored_as_callbacks(env: Env) -> None:
    m = env.module("bound_callbacks")
    stored = m.alice.greet
    bob = m.Greeter("bob")
    m.bus.subscribe(bob.greet)
    m.bus.subscribe(functools.partial(m.Greeter.greet, bob))
    before = ["alice: hello x", "bob: hello x", "bob: hello x"]
    assert m.bus.emit("x") == before
    patch = env.patch("bound_callbacks", m)
    apply(patch)
    assert m.bus.emit("x") == ["alice: HELLO X", "bob: HELLO X", "bob: HELLO X"]
    assert stored("y") == "alice: HELLO Y"
    assert m.Greeter("carol").greet("z") == "carol: HELLO Z"
    revert(patch)
    assert m.bus.emit("x") == before
    assert stored("y") == "alice: hello y"


def test_functools_partial(env: Env) -> None:
    m = env.module("partial")
    nested = functools.partial(m.double, 5)
    assert (m.double(5), m.triple(5), nested()) == (10, 15, 10)
    patch = env.patch("partial", m)
    apply(patch)
    assert (m.double(5), m.triple(5), nested()) == (1010, 1015, 1010)
    assert m.double.func is m.scale
    revert(patch)
    assert (m.double(5), m.triple(5), nested()) == (10, 15, 10)


def test_methods_of_existing_instances(env: Env) -> None:
    m = env.module("instances")
    a, sub = m.existing, m.existing_sub
    unbound = m.Counter.step
    bound = a.step
    assert a.step() == 1 and sub.step() == 1
    patch = env.patch("instances", m)
    apply(patch)
    assert a.step() == 11  # state of the instance survives, new code runs
    assert bound() == 21
    assert sub.step() == 11  # inherited by the subclass's existing instance
    assert unbound(a) == 31
    assert m.Counter().step() == 10
    assert m.LoudCounter().step() == 10
    revert(patch)
    assert a.step() == 32
    assert sub.step() == 12
    assert bound() == 33


def test_classmethod_and_staticmethod(env: Env) -> None:
    m = env.module("class_static")
    make = m.Shape.make
    sq_make = m.Square.make
    check = m.Shape.check
    inst = m.Square()
    assert make("a") == "Shape(a, sides=0)"
    assert sq_make("b") == "Square(b, sides=4)"
    assert check(0) is False
    patch = env.patch("class_static", m)
    apply(patch)
    assert make("a") == "new Shape(a, sides=0)"
    assert sq_make("b") == "new Square(b, sides=4)"  # cls is still the subclass
    assert inst.make("c") == "new Square(c, sides=4)"
    assert check(0) is True
    assert inst.check(0) is True
    assert m.Square.check(0) is True
    assert isinstance(m.Shape.__dict__["make"], classmethod)
    assert isinstance(m.Shape.__dict__["check"], staticmethod)
    revert(patch)
    assert make("a") == "Shape(a, sides=0)"
    assert inst.make("c") == "Square(c, sides=4)"
    assert check(0) is False


def test_property_getter(env: Env) -> None:
    m = env.module("property")
    box = m.Box(3)
    prop = m.Box.__dict__["size"]
    getter = prop.fget
    assert box.size == 3
    patch = env.patch("property", m, "getter.py")
    apply(patch)
    assert m.Box.__dict__["size"] is prop  # the property object is not replaced
    assert box.size == 6
    assert getter(box) == 6
    assert m.Box(4).size == 8
    box.size = 5  # the setter is untouched and still writes _Box__size
    assert box.size == 10
    revert(patch)
    assert box.size == 5


def test_property_setter_and_deleter(env: Env) -> None:
    m = env.module("property")
    box = m.Box(3)
    prop = m.Box.__dict__["size"]
    assert box.size == 3
    patch = env.patch("property", m)
    apply(patch)
    assert m.Box.__dict__["size"] is prop  # the property object is not replaced
    assert box.size == 6
    box.size = 5
    assert box.log[-1] == ("set2", 5)
    assert box.size == 10
    with pytest.raises(ValueError, match="negative size"):
        box.size = -1
    del box.size
    assert box.log[-1] == ("del2",)
    assert box.size == -2
    revert(patch)
    box.size = 4
    assert box.log[-1] == ("set", 4)
    assert box.size == 4
    box.size = -1  # the old setter accepted it
    del box.size
    assert box.log[-1] == ("del",)
    assert box.size == 0


# -- decorators, caches -----------------------------------------------------------------


def test_decorated_with_functools_wraps(env: Env) -> None:
    m = env.module("decorated_wraps")
    handle, endpoint, svc = m.handle, m.endpoint, m.Service()
    run = svc.run
    assert handle(1) == "handled 1"
    assert endpoint(2) == "[api] endpoint 2"
    assert run(3) == "ran 3"
    m.CALLS.clear()
    patch = env.patch("decorated_wraps", m)
    apply(patch)
    assert m.handle is handle  # the wrapper stays; only the inner body changed
    assert handle(1) == "HANDLED 1"
    assert endpoint(2) == "[api] ENDPOINT 2"  # both decorators keep running
    assert run(3) == "RAN 3"
    assert m.Service().run(4) == "RAN 4"
    assert m.CALLS == ["handle", "endpoint", "run", "run"]
    revert(patch)
    assert handle(1) == "handled 1"
    assert endpoint(2) == "[api] endpoint 2"
    assert run(3) == "ran 3"


def test_decorated_without_wraps_via_closure(env: Env) -> None:
    m = env.module("decorated_nowraps")
    handle, lookup, run = m.handle, m.lookup, m.Service().run
    assert handle(1) == "handled 1"
    with pytest.raises(RuntimeError, match="gave up"):
        lookup({}, "k")
    del m.CALLS[:]
    patch = env.patch("decorated_nowraps", m)
    apply(patch)
    assert handle(1) == "HANDLED 1"
    assert lookup({}, "k") == "default"  # the retry decorator (2 levels deep) still wraps
    assert lookup({"k": 1}, "k") == 1
    assert run(2) == "RAN 2"
    assert len(m.CALLS) == 2  # the counting wrapper still counts
    revert(patch)
    assert handle(1) == "handled 1"
    assert run(2) == "ran 2"
    with pytest.raises(RuntimeError, match="gave up"):
        lookup({}, "k")


def test_lru_cache_is_cleared(env: Env) -> None:
    m = env.module("lru_cache")
    rate, square = m.rate, m.square
    assert rate("usd") == 1.1 and square(3) == 9
    assert rate.cache_info().currsize == 1
    patch = env.patch("lru_cache", m)
    apply(patch)
    assert m.rate is rate
    assert rate.cache_info().currsize == 0
    assert rate("usd") == 1.2  # not the stale cached 1.1
    assert square(3) == 10
    assert m.CALLS == ["usd", "usd"]
    revert(patch)
    assert rate("usd") == 1.1  # not the stale cached 1.2
    assert square(3) == 9


def test_default_arguments(env: Env) -> None:
    m = env.module("defaults")
    greet = m.greet
    fmt = m.Formatter().fmt
    assert greet("ann") == "hello ann!"
    assert fmt(7) == "   7"
    patch = env.patch("defaults", m)
    apply(patch)
    assert greet("ann") == "hi ann?"
    assert greet("ann", "yo", punct=".") == "yo ann."
    assert greet.__defaults__ == ("hi",)
    assert greet.__kwdefaults__ == {"punct": "?"}
    assert fmt(7) == "000007"
    assert fmt(7, 2, fill="*") == "*7"
    revert(patch)
    assert greet("ann") == "hello ann!"
    assert greet.__defaults__ == ("hello",)
    assert greet.__kwdefaults__ == {"punct": "!"}
    assert fmt(7) == "   7"


def test_kwdefaults_mutation_by_patch_does_not_leak_into_original(env: Env) -> None:
    m = env.module("defaults")
    patch = env.patch("defaults", m)
    apply(patch)
    m.greet.__kwdefaults__["punct"] = "#"  # the program scribbles on the live dict
    assert m.greet("x") == "hi x#"
    revert(patch)
    assert m.greet("x") == "hello x!"
    apply(env.patch("defaults", m))
    assert m.greet("x") == "hi x?"  # a fresh apply brings the patch's own defaults


# -- closures, super(), nested functions -------------------------------------------------


def test_closures_with_same_free_variable_names(env: Env) -> None:
    m = env.module("closures")
    add5, tick = m.add5, m.tick
    other = m.make_adder(7)
    assert add5(1) == 6
    assert tick() == 1 and tick() == 2
    patch = env.patch("closures", m)
    apply(patch)
    assert add5(1) == 501  # n is still the live cell (5)
    assert tick() == 12  # count kept its value (2), the cell is shared
    assert tick() == 22
    assert other(1) == 8  # a different closure instance is not the target
    revert(patch)
    assert add5(1) == 6
    assert tick() == 23


def test_zero_argument_super_keeps_live_class(env: Env) -> None:
    m = env.module("super_call")
    child, grand = m.Child(), m.GrandChild()
    hello = child.hello
    assert hello() == "child+base"
    assert grand.hello() == "grand+child+base"
    assert child.size() == 2
    patch = env.patch("super_call", m)
    apply(patch)
    assert hello() == "CHILD+base(Child)"
    assert grand.hello() == "grand+CHILD+base(Child)"
    assert child.size() == 100
    cell = dict(zip(m.Child.hello.__code__.co_freevars, m.Child.hello.__closure__, strict=True))
    assert cell["__class__"].cell_contents is m.Child
    revert(patch)
    assert hello() == "child+base"
    assert grand.hello() == "grand+child+base"
    assert child.size() == 2


def test_nested_functions_existing_and_future_instances(env: Env) -> None:
    m = env.module("nested")
    existing, early = m.existing, m.outer(3)
    w = m.Widget("w")
    f2 = w.formatter()
    assert existing(5) == 10 and early(5) == 15
    assert w.render([1]) == ["w:1"]
    assert f2(1) == "w=1"
    patch = env.patch("nested", m)
    apply(patch)
    assert existing(5) == 1010
    assert early(5) == 1015
    assert m.outer(4)(5) == 1020  # made after the patch
    assert w.render([1]) == ["<w|1>"]
    assert f2(1) == "w==1"
    assert m.Widget("v").formatter()(2) == "v==2"
    revert(patch)
    assert existing(5) == 10 and early(5) == 15
    assert m.outer(4)(5) == 20
    assert w.render([1]) == ["w:1"]
    assert f2(1) == "w=1"


def test_nested_instance_created_while_patched_is_reverted(env: Env) -> None:
    m = env.module("nested")
    patch = env.patch("nested", m)
    apply(patch)
    during = m.outer(2)
    assert during(1) == 1002
    revert(patch)
    assert during(1) == 2


# -- new helpers ----------------------------------------------------------------------------


def test_new_helpers_functions_and_values(env: Env) -> None:
    m = env.module("new_helpers")
    cart = m.Cart()
    assert cart.add("a", 50) == 50
    assert m.weight(50) == 150
    patch = env.patch("new_helpers", m)
    apply(patch)
    assert m.LIMIT == 10
    assert m.Cart.MAX_ITEMS == 2
    assert m._clamp(99) == 10
    assert m._clamp.__globals__ is vars(m)  # helpers run with the target's globals
    assert m._clamp.__module__ == m.__name__
    assert cart.add("a", 1) == 10  # existing instance: new method + helper
    assert cart.add("b", -5) == 0
    with pytest.raises(ValueError, match="cart full"):
        cart.add("c", 1)
    assert m.weight(50) == 30
    applied = livepatch.patches()[-1]
    assert set(applied.added) >= {f"{m.__name__}:_clamp", f"{m.__name__}:Cart._check"}
    revert(patch)
    for name in ("LIMIT", "_clamp"):
        assert not hasattr(m, name), name
    assert "_check" not in vars(m.Cart) and "MAX_ITEMS" not in vars(m.Cart)
    assert cart.add("c", 1) == 1
    assert m.weight(50) == 150


# -- async functions, generators ------------------------------------------------------------


def test_async_functions_and_generators(env: Env, model: str) -> None:
    m = env.module("async_gen")
    stream = m.Stream()

    async def collect(n: int) -> list[int]:
        return [i async for i in m.ticks(n)]

    assert asyncio.run(m.fetch(1)) == 2
    assert asyncio.run(collect(3)) == [0, 1, 2]
    assert list(stream.chunks(["a"])) == ["a"]
    running = pending = None
    if model == IMM:  # the default model waits for these (see test_default_model_waits...)
        running = m.countdown(3)
        assert next(running) == 3
        pending = m.fetch(1)  # a coroutine created before the patch
    patch = env.patch("async_gen", m)
    apply(patch)
    assert asyncio.run(m.fetch(1)) == 101
    assert list(m.countdown(2)) == [20, 10]
    assert asyncio.run(collect(3)) == [0, -1, -2]
    assert list(stream.chunks(["a"])) == ["A"]
    if running is not None and pending is not None:
        # suspended frames keep the code they started with (immediate model: no checks)
        assert list(running) == [2, 1]
        assert asyncio.run(pending) == 2
    revert(patch)
    assert asyncio.run(m.fetch(1)) == 2
    assert list(m.countdown(2)) == [2, 1]
    assert asyncio.run(collect(2)) == [0, 1]
    assert list(stream.chunks(["a"])) == ["a"]


def test_default_model_waits_for_suspended_generators(env: Env, model: str) -> None:
    if model == IMM:
        pytest.skip("about the default model")
    m = env.module("async_gen")
    running = m.countdown(3)
    assert next(running) == 3
    patch = env.patch("async_gen", m)
    before = m.countdown.__code__
    with pytest.raises(livepatch.TransitionTimeout) as info:
        livepatch.apply(patch, timeout=0.3)
    assert "countdown" in str(info.value)
    assert m.countdown.__code__ is before and livepatch.patches() == []
    assert list(running) == [2, 1]  # finished: nothing holds the old code any more
    livepatch.apply(patch, timeout=5)
    assert list(m.countdown(2)) == [20, 10]


# -- name mangling, __future__ ----------------------------------------------------------


def test_name_mangled_private_attributes(env: Env) -> None:
    m = env.module("mangling")
    acct, vault, inner = m.Account(), m._Vault(), m.Outer.Inner()
    assert acct.deposit(5) == 5
    patch = env.patch("mangling", m)
    apply(patch)
    assert acct.deposit(5) == 15  # reads and writes _Account__balance
    assert vars(acct) == {"_Account__balance": 15}
    assert vault.reveal() == "S1"  # _Vault → _Vault__secret (leading underscore stripped)
    assert inner.get() == 42  # innermost class: _Inner__x
    revert(patch)
    assert acct.deposit(1) == 16
    assert vault.reveal() == "s1"
    assert inner.get() == 1


def test_future_annotations_module(env: Env) -> None:
    m = env.module("future_annotations")
    assert m.parse("1.5") == 1.5
    patch = env.patch("future_annotations", m)
    apply(patch)
    assert m.parse(" 1.5 ") == 3.0  # would be NameError if annotations were evaluated
    assert m.Parser().parse("2") == (4, "AlsoUndefined")
    revert(patch)
    assert m.parse("1.5") == 1.5
    assert m.Parser().parse("2") == 2


# -- the default model ----------------------------------------------------------------------


def test_default_model_applies_and_reverts(env: Env) -> None:
    m = env.module("plain_body")
    patch = env.patch("plain_body", m)
    t = livepatch.apply(patch)  # the default model (hybrid); no other thread holds price
    assert t.done
    assert m.price(3) == 31
    assert [p.name for p in livepatch.patches()] == ["plain-body"]
    livepatch.revert(patch.name)
    assert m.price(3) == 30
    assert livepatch.patches() == []


def test_modules_are_isolated(env: Env) -> None:
    a = env.module("plain_body")
    b = env.module("plain_body")
    apply(env.patch("plain_body", a))
    assert a.price(1) == 11
    assert b.price(1) == 10
    assert sys.modules[b.__name__] is b


def test_timeout_advice_fits_the_model(env: Env, model: str) -> None:
    if model == IMM:
        pytest.skip("about the default model")
    m = env.module("async_gen")
    running = m.countdown(3)
    next(running)
    with pytest.raises(livepatch.TransitionTimeout) as info:
        livepatch.apply(env.patch("async_gen", m), model="hybrid", timeout=0.2)
    running.close()
    assert "model='hybrid'" not in str(info.value), str(info.value)


def test_default_model_with_deprecation_warnings_as_errors(env: Env, model: str) -> None:
    """Programs (and test suites) run with -W error: patching a generator or a coroutine
    under the default model must not depend on a deprecated code assignment."""
    if model == IMM:
        pytest.skip("about the default model")
    m = env.module("async_gen")
    before = {name: getattr(m, name).__code__ for name in ("fetch", "countdown", "ticks")}
    patch = env.patch("async_gen", m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            livepatch.apply(patch)
        except Exception:
            # a failure must leave everything as it was
            assert {n: getattr(m, n).__code__ for n in before} == before
            assert livepatch.patches() == []
            raise
    assert list(m.countdown(2)) == [20, 10]
    assert asyncio.run(m.fetch(1)) == 101
