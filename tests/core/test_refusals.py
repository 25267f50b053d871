"""DESIGN.md section 7, "must refuse": each refusal names the target and the reason, is one
line, and changes nothing."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

import livepatch

from .conftest import Env, assert_same_snapshot, snapshot

IMM = "immediate"

TARGETS = """
import functools
import os


def plain(x):
    return x + 1


def make(k, j):
    def inner(x):
        return x * k

    return inner


existing = make(2, 3)


def gen(n):
    yield n


async def coro(n):
    return n


async def agen(n):
    yield n


square = lambda x: x * x  # noqa: E731

getcwd = os.getcwd
half = functools.partial(plain, 1)


class Base:
    def inherited(self):
        return "base"

    def plain_method(self):
        return "plain"


class Child(Base):
    def own(self):
        return "own"
"""


def refuse(patch: livepatch.Patch, error: type[Exception], *needles: str) -> str:
    """Apply must raise `error`; the message must be one line and contain `needles`."""
    with pytest.raises(error) as info:
        livepatch.apply(patch, model=IMM)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert livepatch.patches() == []
    return message


def one(env: Env, m: types.ModuleType, target: str, body: str, **kw: str) -> livepatch.Patch:
    """A patch file replacing `target` (a qualname in `m`) with the def in `body`."""
    expect = kw.get("expect")
    extra = f", expect={expect!r}" if expect else ""
    text = (
        "import livepatch\n"
        "patch = livepatch.Patch('refuse-me')\n\n"
        f"@patch.function('TARGET_MODULE:{target}'{extra})\n"
        + body.strip("\n").replace("\n    ", "\n    ")
        + "\n"
    )
    return livepatch.load(env.patch_text(text, m))


@pytest.fixture
def m(env: Env) -> types.ModuleType:
    return env.source_module(TARGETS, "targets")


def test_free_variables_changed(env: Env, m: types.ModuleType) -> None:
    # `nonlocal`/closures can only be written inside a function: the replacement closes
    # over j (a local of make) where the live inner closes over k only
    text = """
        import livepatch
        patch = livepatch.Patch("freevars")

        def _context():
            k = j = None

            @patch.function("TARGET_MODULE:make.<locals>.inner")
            def inner(x):
                return x * j

        _context()
    """
    patch = livepatch.load(env.patch_text(text, m))
    before = snapshot(m.existing, m.make)
    msg = refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:make.<locals>.inner", "j")
    assert "closes over" in msg
    assert_same_snapshot(before, snapshot(m.existing, m.make))
    assert m.existing(5) == 10


def test_free_variables_changed_top_level_replacement(env: Env, m: types.ModuleType) -> None:
    # v2 of make() has inner use j instead of k; written as a top-level def in the patch
    # file, j is not free there, but it names a local of the enclosing function
    patch = one(env, m, "make.<locals>.inner", "def inner(x):\n    return x * j\n")
    before = snapshot(m.existing, m.make)
    try:
        refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:make.<locals>.inner", "j")
    finally:
        broken = None
        try:
            m.existing(5)
        except NameError as exc:
            broken = exc
        assert broken is None, f"the patch installed code that raises {broken!r}"
    assert_same_snapshot(before, snapshot(m.existing, m.make))


def test_free_variable_dropped_is_allowed(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "make.<locals>.inner", "def inner(x):\n    return x * 100\n")
    livepatch.apply(patch, model=IMM)
    assert m.existing(5) == 500
    assert m.make(7, 0)(1) == 100
    livepatch.revert(patch.name, model=IMM)
    assert m.existing(5) == 10


@pytest.mark.parametrize(
    ("target", "body", "new_kind", "old_kind"),
    [
        ("plain", "def plain(x):\n    yield x\n", "generator", "function"),
        ("gen", "def gen(n):\n    return n\n", "function", "generator"),
        ("coro", "def coro(n):\n    return n\n", "function", "coroutine"),
        ("plain", "async def plain(x):\n    return x\n", "coroutine", "function"),
        ("agen", "async def agen(n):\n    return n\n", "coroutine", "async generator"),
        ("coro", "async def coro(n):\n    yield n\n", "async generator", "coroutine"),
        ("gen", "async def gen(n):\n    yield n\n", "async generator", "generator"),
    ],
)
def test_kind_changes_are_refused(
    env: Env, m: types.ModuleType, target: str, body: str, new_kind: str, old_kind: str
) -> None:
    patch = one(env, m, target, body)
    func = getattr(m, target)
    code = func.__code__
    msg = refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:{target}")
    assert f"is a {new_kind}" in msg and f"is a {old_kind}" in msg, msg
    assert func.__code__ is code


@pytest.mark.parametrize("target", ["os:getcwd", "builtins:len", "TARGET_MODULE:getcwd"])
def test_c_callables_are_refused(env: Env, m: types.ModuleType, target: str) -> None:
    target = target.replace("TARGET_MODULE", m.__name__)
    patch = livepatch.Patch("c-callable")

    def replacement() -> str:
        return "/nowhere"

    patch.functions.append(
        livepatch.patch.FunctionSpec(target, replacement, None)  # type: ignore[arg-type]
    )
    msg = refuse(patch, livepatch.UnsafeChange, target, "C callable")
    assert "Python functions only" in msg
    assert os.getcwd() != "/nowhere"


def test_lambda_targeted_directly(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "square", "def square(x):\n    return x * x * x\n")
    refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:square", "lambda")
    assert m.square(2) == 4


def test_partial_targeted_directly(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "half", "def half(x):\n    return x\n")
    refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:half", "partial")


def test_main_without_source(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    main = types.ModuleType("__main__")
    exec("def job():\n    return 1\n", main.__dict__)
    monkeypatch.setitem(sys.modules, "__main__", main)
    patch = livepatch.Patch("main")

    @patch.function("__main__:job")
    def job() -> int:
        return 2

    refuse(patch, livepatch.TargetNotFound, "__main__:job", "no source file")
    assert main.job() == 1


def test_main_with_source_is_allowed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    main = env.source_module("def job():\n    return 1\n", "fake_main")
    monkeypatch.setitem(sys.modules, "__main__", main)
    patch = livepatch.Patch("main-ok")

    @patch.function("__main__:job")
    def job() -> int:
        return 2

    livepatch.apply(patch, model=IMM)
    assert main.job() == 2
    livepatch.revert("main-ok", model=IMM)
    assert main.job() == 1


def test_unknown_module(env: Env) -> None:
    patch = livepatch.Patch("nomod")

    @patch.function("no_such_module_lpcore:f")
    def f() -> None: ...

    refuse(patch, livepatch.TargetNotFound, "no_such_module_lpcore:f", "not imported")


def test_unknown_attribute(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "Child.nothing", "def nothing(self):\n    pass\n")
    refuse(patch, livepatch.TargetNotFound, f"{m.__name__}:Child.nothing", "'nothing'")
    patch = one(env, m, "missing", "def missing():\n    pass\n")
    refuse(patch, livepatch.TargetNotFound, f"{m.__name__}:missing", "'missing'")


def test_inherited_method_names_the_base_class(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "Child.inherited", "def inherited(self):\n    return 'x'\n")
    msg = refuse(patch, livepatch.TargetNotFound, f"{m.__name__}:Child.inherited")
    assert f"{m.__name__}:Base" in msg and "inherited" in msg
    assert m.Child().inherited() == "base"


@pytest.mark.parametrize("target", ["no-colon", "mod:", ":name", "mod:a b"])
def test_malformed_target_names(env: Env, target: str) -> None:
    patch = livepatch.Patch("malformed")

    @patch.function(target)
    def f() -> None: ...

    refuse(patch, livepatch.TargetNotFound, "package.module:Qualified.name")


def test_class_is_not_a_function(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "Child", "def Child():\n    pass\n")
    refuse(patch, livepatch.TargetNotFound, f"{m.__name__}:Child", "not a function")


def test_replacement_with_extra_decorators(env: Env, m: types.ModuleType) -> None:
    text = """
        import livepatch
        patch = livepatch.Patch("extra-deco")

        def audited(fn):
            return fn

        @patch.function("TARGET_MODULE:plain")
        @audited
        def plain(x):
            return x + 2
    """
    patch = livepatch.load(env.patch_text(text, m))
    refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:plain", "decorators")
    assert m.plain(1) == 2


def test_replacement_with_wrapping_decorator_fails_at_load(env: Env, m: types.ModuleType) -> None:
    text = """
        import functools
        import livepatch
        patch = livepatch.Patch("extra-deco")

        @patch.function("TARGET_MODULE:plain")
        @functools.lru_cache
        def plain(x):
            return x + 2
    """
    with pytest.raises(livepatch.PatchFileError, match="must decorate a plain def"):
        livepatch.load(env.patch_text(text, m))


def test_replacement_closing_over_a_local(env: Env, m: types.ModuleType) -> None:
    bonus = 40
    patch = livepatch.Patch("closes-over")

    @patch.function(f"{m.__name__}:plain")
    def plain(x: int) -> int:
        return x + bonus

    msg = refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:plain", "bonus")
    assert "patch.new" in msg
    assert m.plain(1) == 2


def test_super_added_where_live_function_has_no_class_cell(
    env: Env, m: types.ModuleType
) -> None:
    patch = one(
        env, m, "Child.own", "def own(self):\n    return super().inherited() + '!'\n"
    )
    refuse(patch, livepatch.UnsafeChange, "Child.own", "__class__", "super(Class, self)")
    assert m.Child().own() == "own"


def test_new_name_clash(env: Env, m: types.ModuleType) -> None:
    patch = livepatch.Patch("clash")
    patch.new(f"{m.__name__}:plain", 42)
    refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:plain", "exists already")
    assert callable(m.plain)
    patch = livepatch.Patch("clash-class")
    patch.new(f"{m.__name__}:Child.own", 42)
    refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:Child.own", "exists already")


def test_new_helper_closing_over_a_local(env: Env, m: types.ModuleType) -> None:
    secret = 7
    patch = livepatch.Patch("helper-closure")

    @patch.new(f"{m.__name__}:helper")
    def helper() -> int:
        return secret

    refuse(patch, livepatch.UnsafeChange, f"{m.__name__}:helper", "secret")
    assert not hasattr(m, "helper")


def test_same_function_under_two_names(env: Env, m: types.ModuleType) -> None:
    m.alias = m.plain
    text = """
        import livepatch
        patch = livepatch.Patch("twice")

        @patch.function("TARGET_MODULE:plain")
        def plain(x):
            return x + 2

        @patch.function("TARGET_MODULE:alias")
        def alias(x):
            return x + 3
    """
    patch = livepatch.load(env.patch_text(text, m))
    refuse(patch, livepatch.UnsafeChange, "same function")
    assert m.plain(1) == 2


def test_already_applied_and_not_applied(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "plain", "def plain(x):\n    return x + 2\n")
    livepatch.apply(patch, model=IMM)
    again = one(env, m, "plain", "def plain(x):\n    return x + 3\n")
    with pytest.raises(livepatch.AlreadyApplied, match="refuse-me"):
        livepatch.apply(again, model=IMM)
    assert m.plain(1) == 3
    livepatch.revert("refuse-me", model=IMM)
    with pytest.raises(livepatch.NotApplied, match="refuse-me"):
        livepatch.revert("refuse-me", model=IMM)


def test_unknown_model(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "plain", "def plain(x):\n    return x + 2\n")
    with pytest.raises(livepatch.PatchError, match="unknown model"):
        livepatch.apply(patch, model="yolo")
    assert m.plain(1) == 2 and livepatch.patches() == []


# -- patch files ---------------------------------------------------------------------


def load_error(path: Path) -> str:
    with pytest.raises(livepatch.PatchFileError) as info:
        livepatch.load(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_patch_file_missing(tmp_path: Path) -> None:
    msg = load_error(tmp_path / "nope.py")
    assert "nope.py" in msg and "does not exist" in msg


def test_patch_file_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.py"
    path.write_text("import livepatch\n\ndef broken(:\n    pass\n")
    msg = load_error(path)
    assert "bad.py:3" in msg and "syntax error" in msg


def test_patch_file_without_patch(tmp_path: Path) -> None:
    path = tmp_path / "empty.py"
    path.write_text("import livepatch\nX = 1\n")
    assert "defines no livepatch.Patch" in load_error(path)


def test_patch_file_with_two_patches(tmp_path: Path) -> None:
    path = tmp_path / "two.py"
    path.write_text(
        "import livepatch\na = livepatch.Patch('one')\nb = livepatch.Patch('two')\n"
    )
    msg = load_error(path)
    assert "2 patches" in msg and "one" in msg and "two" in msg


def test_same_patch_bound_twice_is_one_patch(tmp_path: Path) -> None:
    path = tmp_path / "alias.py"
    path.write_text("import livepatch\na = livepatch.Patch('one')\nb = a\n")
    assert livepatch.load(path).name == "one"


def test_patch_file_that_raises(tmp_path: Path) -> None:
    path = tmp_path / "raises.py"
    path.write_text("import livepatch\npatch = livepatch.Patch('x')\n\nraise KeyError('boom')\n")
    msg = load_error(path)
    assert "raises.py:4" in msg and "KeyError" in msg and "boom" in msg


def test_patch_file_raising_a_multiline_message_gives_one_line(tmp_path: Path) -> None:
    path = tmp_path / "raises2.py"
    path.write_text("import livepatch\n\nraise ValueError('first\\nsecond')\n")
    msg = load_error(path)
    assert "raises2.py:3" in msg and "ValueError" in msg and "first" in msg


def test_patch_file_that_exits(tmp_path: Path) -> None:
    path = tmp_path / "exits.py"
    path.write_text("import sys\nsys.exit(3)\n")
    assert "exit" in load_error(path)


def test_patch_file_with_bad_patch_name(tmp_path: Path) -> None:
    path = tmp_path / "name.py"
    path.write_text("import livepatch\npatch = livepatch.Patch('two words')\n")
    assert "two words" in load_error(path)


def test_patch_file_replacing_a_target_twice(tmp_path: Path) -> None:
    path = tmp_path / "dup.py"
    path.write_text(
        "import livepatch\npatch = livepatch.Patch('dup')\n"
        "@patch.function('m:f')\ndef f(): pass\n"
        "@patch.function('m:f')\ndef g(): pass\n"
    )
    assert "replaced twice" in load_error(path)


def test_apply_accepts_a_path(env: Env) -> None:
    m = env.module("plain_body")
    path = env.patch_file("plain_body", m)
    t = livepatch.apply(path, model=IMM)
    assert t.done and m.price(1) == 11
    applied = livepatch.patches()[0]
    assert applied.source == str(path.resolve())
    assert applied.sha256 and len(applied.sha256) == 64


def test_signature_change_is_reported_by_plan(env: Env, m: types.ModuleType) -> None:
    patch = one(env, m, "plain", "def plain(x, y):\n    return x + y\n")
    plan = livepatch.plan(patch)
    assert "signature" in plan.changes[0].note, plan.changes[0].note
    same = one(env, m, "plain", "def plain(x):\n    return x + 2\n")
    assert "signature" not in livepatch.plan(same).changes[0].note


def test_patch_file_with_utf8_bom_loads(tmp_path: Path) -> None:
    """Python runs a file saved with a UTF-8 byte-order mark; so must load()."""
    path = tmp_path / "bom.py"
    path.write_bytes(b"\xef\xbb\xbf" + b"import livepatch\npatch = livepatch.Patch('bom')\n")
    assert livepatch.load(path).name == "bom"


def test_patch_file_with_coding_cookie_loads(tmp_path: Path) -> None:
    path = tmp_path / "latin.py"
    path.write_bytes(
        b"# -*- coding: latin-1 -*-\nimport livepatch\n"
        b"patch = livepatch.Patch('latin', description='caf\xe9')\n"
    )
    assert livepatch.load(path).description == "caf\u00e9"


def test_replacement_using_a_patch_file_global_is_caught(env: Env, m: types.ModuleType) -> None:
    """A common mistake: the replacement calls a helper (or an import) defined in the patch
    file without patch.new. Replacements run with the target's globals, so the first call
    would raise NameError in production: plan/apply must say so before anything changes."""
    text = """
        import re
        import livepatch
        patch = livepatch.Patch("uses-patch-globals")

        def _helper(x):
            return x * 2

        @patch.function("TARGET_MODULE:plain")
        def plain(x):
            return _helper(x) + len(re.findall("a", "aa"))
    """
    patch = livepatch.load(env.patch_text(text, m))
    try:
        plan = livepatch.plan(patch)
    except livepatch.PatchError as exc:
        assert "_helper" in str(exc) and "re" in str(exc), str(exc)
        return
    said = plan.changes[0].note + " ".join(plan.notes)
    assert "_helper" in said and "patch.new" in said, said


def test_patch_file_globals_check_has_no_false_positives(env: Env) -> None:
    m = env.source_module(
        """
        import os

        LIMIT = 3

        def plain(x):
            return x
        """,
        "globals_ok",
    )
    text = """
        import os
        import livepatch
        patch = livepatch.Patch("globals-ok")

        LIMIT = 99  # the patch file's own value; the target's LIMIT is what runs

        @patch.new("TARGET_MODULE:_twice")
        def _twice(x):
            return x * 2

        @patch.function("TARGET_MODULE:plain")
        def plain(x):
            return len(os.sep) + _twice(x) + LIMIT
    """
    patch = livepatch.load(env.patch_text(text, m))
    plan = livepatch.plan(patch)
    said = plan.changes[0].note + " ".join(plan.notes)
    for name in ("os", "_twice", "len"):
        assert f" {name}" not in said.replace(",", " "), said
    livepatch.apply(patch, model=IMM)
    assert m.plain(1) == 1 + 2 + 3


def test_loads_text_with_a_bom(tmp_path: Path) -> None:
    """The agent receives patch text, not files: a BOM at its start is no syntax error."""
    patch = livepatch.loads("\ufeffimport livepatch\npatch = livepatch.Patch('bom-text')\n",
                            filename=str(tmp_path / "sent.py"))
    assert patch.name == "bom-text"


def test_helper_using_a_patch_file_global_is_caught(env: Env, m: types.ModuleType) -> None:
    """The same mistake one level down: a patch.new helper uses a patch-file constant."""
    text = """
        import livepatch
        patch = livepatch.Patch("helper-globals")

        CAP = 10

        @patch.new("TARGET_MODULE:_cap")
        def _cap(x):
            return min(x, CAP)

        @patch.function("TARGET_MODULE:plain")
        def plain(x):
            return _cap(x)
    """
    patch = livepatch.load(env.patch_text(text, m))
    try:
        plan = livepatch.plan(patch)
    except livepatch.PatchError as exc:
        assert "CAP" in str(exc), str(exc)
        return
    said = " ".join([*(c.note for c in plan.changes), *plan.notes])
    assert "CAP" in said, said


def test_nested_code_using_a_patch_file_global_is_caught(env: Env, m: types.ModuleType) -> None:
    """The global is used inside a comprehension / nested def of the replacement."""
    text = """
        import livepatch
        patch = livepatch.Patch("nested-globals")

        def _double(v):
            return v * 2

        @patch.function("TARGET_MODULE:plain")
        def plain(x):
            def inner(y):
                return _double(y)

            return sum(inner(v) for v in range(x))
    """
    patch = livepatch.load(env.patch_text(text, m))
    try:
        plan = livepatch.plan(patch)
    except livepatch.PatchError as exc:
        assert "_double" in str(exc), str(exc)
        return
    said = " ".join([*(c.note for c in plan.changes), *plan.notes])
    assert "_double" in said, said
