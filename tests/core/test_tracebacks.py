"""Issue 2 item 11: tracebacks through patched code show the patch file's lines, and the
filename says which patch it is ("<patch file> [livepatch <name>]")."""

from __future__ import annotations

import linecache
import traceback
import types
from pathlib import Path

import pytest

import livepatch

from .conftest import Env

IMM = "immediate"

TARGET = """
class Cart:
    def __init__(self):
        self.__items = []

    def add(self, item):
        self.__items.append(item)
        return len(self.__items)


def price(n):
    return n * 10


def outer(k):
    def inner(x):
        return x * k

    return inner
"""

PATCH = """
import livepatch

patch = livepatch.Patch("NAME")


@patch.new("TARGET_MODULE:_check")
def _check(n):
    if n < 0:
        raise ValueError("helper says negative")  # HELPER-RAISE


@patch.function("TARGET_MODULE:price")
def price(n):
    def nested(v):
        if v > 100:
            raise OverflowError("too big")  # NESTED-RAISE
        return v

    _check(n)
    return nested(n * 20)


@patch.function("TARGET_MODULE:Cart.add")
def add(self, item):
    if item is None:
        raise TypeError("no None items")  # METHOD-RAISE
    self.__items.append(item)
    return len(self.__items)


@patch.function("TARGET_MODULE:outer.<locals>.inner")
def inner(x):
    if x == 0:
        raise ZeroDivisionError("zero")  # INNER-RAISE
    return x * k
"""


def line_of(path: Path, marker: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if marker in line:
            return number
    raise AssertionError(marker)


def last_frame(exc: BaseException) -> traceback.FrameSummary:
    return traceback.extract_tb(exc.__traceback__)[-1]


@pytest.fixture
def m(env: Env) -> types.ModuleType:
    return env.source_module(TARGET, "tb")


def test_tracebacks_show_patch_file_lines(env: Env, m: types.ModuleType) -> None:
    existing = m.outer(2)
    path = env.patch_text(PATCH.replace("NAME", "fix-tb"), m)
    livepatch.apply(livepatch.load(path), model=IMM)
    shown = f"{path.resolve()} [livepatch fix-tb]"
    cases = [
        (lambda: m.price(-1), ValueError, "HELPER-RAISE"),
        (lambda: m.price(50), OverflowError, "NESTED-RAISE"),
        (lambda: m.Cart().add(None), TypeError, "METHOD-RAISE"),
        (lambda: existing(0), ZeroDivisionError, "INNER-RAISE"),
        (lambda: m.outer(3)(0), ZeroDivisionError, "INNER-RAISE"),
    ]
    for call, error, marker in cases:
        with pytest.raises(error) as info:
            call()
        frame = last_frame(info.value)
        assert frame.filename == shown, marker
        assert frame.lineno == line_of(path, marker), marker
        assert frame.line is not None and marker in frame.line
        assert marker in "".join(traceback.format_exception(info.value))
        assert marker in linecache.getline(frame.filename, frame.lineno)
    # the normal path runs too, and the private name is still mangled as in Cart
    assert m.Cart().add("x") == 1


def test_first_line_and_name_of_new_code(env: Env, m: types.ModuleType) -> None:
    path = env.patch_text(PATCH.replace("NAME", "fix-lines"), m)
    livepatch.apply(livepatch.load(path), model=IMM)
    code = m.price.__code__
    assert code.co_filename == f"{path.resolve()} [livepatch fix-lines]"
    assert path.read_text().splitlines()[code.co_firstlineno - 1].startswith(
        ('@patch.function("', "def price")
    )
    assert code.co_qualname == "price"
    assert m.Cart.add.__code__.co_qualname == "Cart.add"


def test_each_patch_names_itself(env: Env, m: types.ModuleType) -> None:
    first = env.patch_text(PATCH.replace("NAME", "first"), m)
    livepatch.apply(livepatch.load(first), model=IMM)
    second_text = """
        import livepatch

        patch = livepatch.Patch("second")


        @patch.function("TARGET_MODULE:Cart.add")
        def add(self, item):
            raise KeyError(item)  # SECOND-RAISE
    """
    second = env.patch_text(second_text, m)
    livepatch.apply(livepatch.load(second), model=IMM)
    with pytest.raises(KeyError) as info:
        m.Cart().add("x")
    frame = last_frame(info.value)
    assert frame.filename == f"{second.resolve()} [livepatch second]"
    assert frame.lineno == line_of(second, "SECOND-RAISE")
    livepatch.revert("second", model=IMM)
    with pytest.raises(TypeError) as info2:
        m.Cart().add(None)
    assert last_frame(info2.value).filename == f"{first.resolve()} [livepatch first]"
    livepatch.revert("first", model=IMM)
    m.Cart().add(None)  # v1 accepted None
    with pytest.raises(TypeError) as info3:
        m.price(None)
    assert last_frame(info3.value).filename == m.__file__


def test_traceback_survives_patch_file_changing_on_disk(env: Env, m: types.ModuleType) -> None:
    path = env.patch_text(PATCH.replace("NAME", "ondisk"), m)
    livepatch.apply(livepatch.load(path), model=IMM)
    expected = line_of(path, "METHOD-RAISE")
    path.write_text("# rewritten after loading\n" * 80)
    linecache.checkcache()
    with pytest.raises(TypeError) as info:
        m.Cart().add(None)
    frame = last_frame(info.value)
    assert frame.lineno == expected
    assert frame.line is not None and "METHOD-RAISE" in frame.line


def test_reapplied_edited_patch_shows_its_new_lines(env: Env, m: types.ModuleType) -> None:
    """Apply fix.py, revert, edit it (same patch name, other layout), apply again: the
    traceback shows the edited file's lines, not the first version's."""
    first = """
        import livepatch
        patch = livepatch.Patch("same-name")

        @patch.function("TARGET_MODULE:price")
        def price(n):
            raise ValueError("first version")  # FIRST
    """
    path = env.patch_text(first, m, "fix.py")
    livepatch.apply(livepatch.load(path), model=IMM)
    with pytest.raises(ValueError, match="first version"):
        m.price(1)
    livepatch.revert("same-name", model=IMM)
    second = first.replace("# FIRST", "# SECOND").replace(
        '    raise ValueError("first version")',
        '    n = n + 1\n            raise ValueError("second version")',
    )
    path.write_text(env.patch_text(second, m, "tmp.py").read_text())
    livepatch.apply(livepatch.load(path), model=IMM)
    with pytest.raises(ValueError, match="second version") as info:
        m.price(1)
    frame = last_frame(info.value)
    assert frame.lineno == line_of(path, "SECOND")
    assert frame.line is not None and "SECOND" in frame.line, frame.line


def test_inspect_getsource_shows_the_replacement(env: Env, m: types.ModuleType) -> None:
    import inspect

    path = env.patch_text(PATCH.replace("NAME", "getsource"), m)
    livepatch.apply(livepatch.load(path), model=IMM)
    source = inspect.getsource(m.Cart.add)
    assert "METHOD-RAISE" in source and source.lstrip().startswith(("@patch", "def add"))
    livepatch.revert("getsource", model=IMM)
    assert "METHOD-RAISE" not in inspect.getsource(m.Cart.add)


def test_lines_follow_the_text_each_apply_loads(env: Env, m: types.ModuleType) -> None:
    """The line cache entry is written once per patch, not per function: it must still
    follow a patch edited and applied again under the same name, and come back after
    linecache.clearcache()."""
    path = env.patch_text(PATCH.replace("NAME", "fix-again"), m)
    patch = livepatch.load(path)
    livepatch.apply(patch, model=IMM)
    livepatch.revert("fix-again", model=IMM)
    linecache.clearcache()
    livepatch.apply(patch, model=IMM)  # the same text again
    with pytest.raises(OverflowError) as info:
        m.price(50)
    assert "NESTED-RAISE" in linecache.getline(*_where(last_frame(info.value)))
    livepatch.revert("fix-again", model=IMM)
    edited = PATCH.replace("NAME", "fix-again").replace("# NESTED-RAISE", "# EDITED-RAISE")
    path = env.patch_text(edited, m)
    patch = livepatch.load(path)
    linecache.clearcache()
    livepatch.apply(patch, model=IMM)
    with pytest.raises(OverflowError) as info:
        m.price(50)
    frame = last_frame(info.value)
    assert frame.filename == f"{path.resolve()} [livepatch fix-again]"
    assert "EDITED-RAISE" in linecache.getline(frame.filename, frame.lineno)


def _where(frame: traceback.FrameSummary) -> tuple[str, int]:
    assert frame.lineno is not None
    return frame.filename, frame.lineno
