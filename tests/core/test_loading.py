"""A patch file is compiled piece by piece and still behaves as one compile of it would.

The agent loads patch files inside the target, so ``livepatch.loads`` parses and compiles
a patch one top-level statement at a time, handing the GIL over between them, instead of
one ``compile`` of the whole text (2.5 ms for a 100-function patch, one C call). What one
compile gave must hold: the docstring, ``__future__`` flags for every def, a string
statement further down that is no docstring, line numbers, syntax errors reported where
they are, and nothing run when any part fails to compile.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
import types
from pathlib import Path

import pytest

import livepatch
from livepatch import toplevel
from livepatch.errors import PatchFileError

HEADER = "import livepatch\npatch = livepatch.Patch('loading')\n"


def namespace_of(patch: livepatch.Patch) -> dict[str, object]:
    replacement = patch.functions[0].replacement
    return replacement.__globals__


def test_future_flags_reach_every_def_and_the_docstring_stays_the_only_one() -> None:
    text = (
        '"""The patch."""\nfrom __future__ import annotations\n' + HEADER
        + "\n@patch.function('json:dumps')\ndef dumps(obj: Undefined, **kw) -> Nope:\n"
        "    return 'x'\n\n'not a docstring'\n\nLATER: Missing = 1\n"
    )
    patch = livepatch.loads(text, filename="<loading-future>")
    namespace = namespace_of(patch)
    assert namespace["__doc__"] == "The patch."
    # postponed evaluation: the annotations stay strings (they would raise otherwise)
    assert patch.functions[0].replacement.__annotations__ == {
        "obj": "Undefined", "return": "Nope"
    }
    assert namespace["__annotations__"] == {"LATER": "Missing"}


def test_line_numbers_are_those_of_the_file() -> None:
    text = HEADER + "\n\n\n@patch.function('json:dumps')\ndef dumps(obj, **kw):\n    return 1\n"
    patch = livepatch.loads(text, filename="<loading-lines>")
    spec = patch.functions[0]
    assert spec.replacement.__code__.co_firstlineno == 6
    assert spec.source is not None and spec.source.node is not None
    assert spec.source.node.lineno == 7


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (HEADER + "x = (\n1,\n\ndef broken(:\n    pass\n", ":"),
        (HEADER + "\ndef f():\n    return 1\nreturn 2\n", ":6:"),
        (HEADER + "x = 1\nfrom __future__ import annotations\n", ":4:"),
        (HEADER + "from __future__ import braces\n", ":3:"),
        ("1\nfrom __future__ import annotations\n" + HEADER, ":2:"),
    ],
    ids=["parse error", "return outside function", "late future import", "unknown feature",
         "future import after a number"],
)
def test_errors_are_reported_as_one_compile_reports_them(text: str, where: str) -> None:
    with pytest.raises(SyntaxError) as expected:
        compile(text, "<loading-error>", "exec", dont_inherit=True)
    with pytest.raises(PatchFileError) as got:
        livepatch.loads(text, filename="<loading-error>")
    assert f"<loading-error>:{expected.value.lineno}: syntax error in patch file" in str(
        got.value
    )
    assert where in str(got.value)


def test_a_syntax_error_names_the_python_that_read_the_patch() -> None:
    # a patch written for a newer Python (generics are 3.12 syntax) fails to load in an
    # older target: the error says which Python judged it
    text = HEADER + "\ndef first[T](items: list[T]) -> T:\n    return items[0]\n"
    if sys.version_info >= (3, 12):
        text += "x = (\n"  # a syntax error in every version
    version = ".".join(map(str, sys.version_info[:3]))
    with pytest.raises(PatchFileError, match=f"read by Python {re.escape(version)}; a patch "
                       "must be written in the syntax of the Python it patches"):
        livepatch.loads(text, filename="<newer-syntax>")


def test_nothing_runs_when_a_later_statement_does_not_compile() -> None:
    marker = "__livepatch_loading_ran__"
    text = f"import builtins\nbuiltins.{marker} = True\n" + HEADER + "return 1\n"
    with pytest.raises(PatchFileError, match="syntax error in patch file"):
        livepatch.loads(text, filename="<loading-nothing-runs>")
    assert not hasattr(builtins, marker)


def test_a_null_byte_is_a_patch_file_error() -> None:
    with pytest.raises(PatchFileError, match="null bytes") as got:
        livepatch.loads(HEADER + "x = 1\0\n", filename="<loading-null>")
    assert "None" not in str(got.value)


def test_a_big_patch_is_parsed_and_compiled_in_small_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = "".join(
        f"\n@patch.function('json:f{i}')\ndef f{i}(obj, **kw):\n    '''v{i}'''\n"
        f"    return {i}\n" for i in range(300)
    )
    text = HEADER + body
    sizes: list[int] = []
    parse, compile_ = ast.parse, builtins.compile

    def parsed(source: str, *args: object, **kwargs: object) -> ast.Module:
        sizes.append(len(source.lstrip("\n")))
        return parse(source, *args, **kwargs)  # type: ignore[arg-type]

    def compiled(source: object, *args: object, **kwargs: object) -> types.CodeType:
        if isinstance(source, str):  # the line breaks before a piece only number its lines
            sizes.append(len(source.lstrip("\n")))
        return compile_(source, *args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(toplevel.ast, "parse", parsed)
    monkeypatch.setattr(builtins, "compile", compiled)
    patch = livepatch.loads(text, filename="<loading-big>")
    assert len(patch.functions) == 300
    assert sizes and max(sizes) < 200 < len(text) // 50


def test_the_patch_namespace_is_the_same_module_throughout() -> None:
    text = HEADER + "A = 1\n\ndef helper():\n    return A + B\n\nB = 2\n" + (
        "\n@patch.function('json:dumps')\ndef dumps(obj, **kw):\n    return helper()\n"
    )
    patch = livepatch.loads(text, filename="<loading-namespace>")
    assert namespace_of(patch)["helper"]() == 3  # type: ignore[operator]


@pytest.mark.skipif(sys.platform != "linux", reason="reads the repository's examples")
def test_the_example_patches_load_as_before() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "src" / "livepatch" / "_demo").rglob("*patch*.py")):
        text = path.read_text()
        if "livepatch.Patch(" not in text:
            continue
        patch = livepatch.loads(text, filename=str(path))
        assert patch.functions or patch.news, path


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "lone cr"])
def test_other_line_breaks_keep_their_line_numbers(newline: str) -> None:
    """Python reads a lone carriage return as a line break too: a file that mixes them
    with newlines must not shift the lines of what follows."""
    text = HEADER.replace("\n", newline) + (
        "x = 1\n\n@patch.function('json:dumps')\ndef dumps(obj, **kw):\n    return 1\n"
    )
    patch = livepatch.loads(text, filename=f"<loading-{len(newline)}>")
    spec = patch.functions[0]
    assert spec.replacement.__code__.co_firstlineno == 5
    assert spec.source is not None and spec.source.node is not None
    assert spec.source.node.lineno == 6


def test_a_docstring_after_leading_comments_is_the_docstring() -> None:
    """The first piece of a file holds only comments here (a piece ends where the next
    statement starts): the docstring is in the second, and still the file's."""
    text = "# Copyright\n# a patch\n\n'''The patch.'''\nfrom __future__ import annotations\n"
    text += HEADER + "\n@patch.function('json:dumps')\ndef dumps(obj: Undefined, **kw):\n"
    text += "    return 'x'\n"
    patch = livepatch.loads(text, filename="<loading-comments-first>")
    assert namespace_of(patch)["__doc__"] == "The patch."
    assert patch.functions[0].replacement.__annotations__ == {"obj": "Undefined"}
