"""Top-level statements parsed piece by piece give what a parse of the whole text gives.

``livepatch.toplevel`` finds a module's top-level imports and ``__future__`` flags without
parsing the whole module in one C call (which held the GIL for 10 to 60 ms on big modules).
Its pieces are cut at lines at column 0, and some of those sit inside strings, brackets
and continuations: each case here puts such a line where a wrong cut would see a fake
import, or lose a real one.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livepatch import toplevel


def parsed_whole(text: str) -> tuple[tuple[str, ...], int] | None:
    """Imports and future flags from one parse of all of `text` (what planning did)."""
    try:
        body = [n for n in ast.parse(text).body if not isinstance(n, toplevel._SKIPPED)]
    except (SyntaxError, ValueError):
        return None
    names: set[str] = set()
    toplevel._collect(body, names)
    flags = 0
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                flags |= getattr(__import__("__future__"), alias.name).compiler_flag
    return tuple(sorted(names)), flags


def by_pieces(text: str) -> tuple[tuple[str, ...], int] | None:
    names, flags = toplevel.imported_names(text), toplevel.future_flags(text)
    if names is None or flags is None:
        return None
    return names, flags


CASES = {
    "plain": "import os\nfrom a.b import c as d, e\nimport x.y\n",
    "string with a line at column 0 that looks like an import": (
        'x = """\nimport fake\n"""\nimport real\n'
    ),
    "def whose string has an import line at column 0": (
        "def f():\n    s = '''\nimport fake\n'''\n    return s\nimport real\n"
    ),
    "class whose strings run over several candidates": (
        "class A:\n    a = '''\nimport fake1\n'''\n    b = \"\"\"\nimport fake2\nx = (\n\"\"\"\n"
        "from real import thing\n"
    ),
    "bracket with lines at column 0": "x = [\n1,\n2,\n]\nimport real\n",
    "def with an open bracket down to column 0": (
        "def f(a=[\n1], b=2):\n    import inner\nimport real\n"
    ),
    "string in a bracket": 'x = (\n"import fake"\n)\nimport real\n',
    "backslash continuation": "x = 1 + \\\n2\nimport real\n",
    "decorator on its own line": "@dec\ndef f():\n    import inner\nimport real\n",
    "else and except at column 0": (
        "try:\n    import a\nexcept ImportError:\n    import b\nelse:\n    import c\n"
        "finally:\n    pass\nif x:\n    import d\nelif y:\n    import e\nelse:\n    import f\n"
    ),
    "semicolon": "x = 1; import real\n",
    "with and loops": "with x:\n    import a\nfor i in y:\n    import b\nwhile 0:\n    import c\n",
    "match": "match x:\n    case 1:\n        import a\n    case _:\n        import b\n",
    "imports inside defs and classes do not count": (
        "def f():\n    import a\nclass C:\n    import b\n    def m(self):\n        import c\n"
        "async def g():\n    import d\n"
    ),
    "future flags": '"""doc"""\nfrom __future__ import annotations, generator_stop\nimport os\n',
    "comment holding quotes": "# it's \"odd\" '''\nimport real\nx = 1  # don't\nimport more\n",
    "escaped quotes": "x = 'it\\'s'\ny = \"\\\"\"\nz = '''a\\'''b'''\nimport real\n",
    "raw and byte strings": "x = r'\\d'\ny = rb'''\nimport fake\n'''\nimport real\n",
    "name ending in a prefix letter": 'if"x":\n    import a\nelif"y":\n    import b\n',
    "f-string with a field": 'x = f"{a}{{b}}"\ny = f"""\nimport fake {c}\n"""\nimport real\n',
    "empty": "",
    "no newline at the end": "import os",
}
if sys.version_info >= (3, 12):  # PEP 701: fields may hold the f-string's own quote, lines
    CASES["f-string field over lines"] = 'x = f"{1 +\n2}"\nimport real\n'
    CASES["f-string field with its own quote"] = (
        'x = f"{d["k"]}"\ny = f"""{f"""\nimport fake\n"""}"""\nimport real\n'
    )


@pytest.mark.parametrize("text", CASES.values(), ids=CASES.keys())
def test_pieces_give_what_the_whole_text_gives(text: str) -> None:
    assert by_pieces(text) == parsed_whole(text)


def test_the_cases_find_real_imports_and_no_fake_ones() -> None:
    """The comparison above could pass by both being empty: it is not."""
    found = {name: toplevel.imported_names(text) for name, text in CASES.items()}
    assert found["string with a line at column 0 that looks like an import"] == ("real",)
    assert found["class whose strings run over several candidates"] == ("thing",)
    assert found["def with an open bracket down to column 0"] == ("real",)
    assert found["else and except at column 0"] == ("a", "b", "c", "d", "e", "f")
    assert found["imports inside defs and classes do not count"] == ()
    assert toplevel.future_flags(CASES["future flags"]) != 0


def test_a_syntax_error_gives_nothing_where_it_is_parsed() -> None:
    """A module's source that no longer parses (edited on disk since it was imported):
    an error in a statement that is read gives nothing, as a whole parse did; one in a
    def or class, which is never read, leaves the imports of the rest."""
    assert toplevel.imported_names("import os\nimport (\n") is None
    assert toplevel.imported_names("import os\ndef broken(:\n    pass\n") == ("os",)
    assert parsed_whole("import os\ndef broken(:\n    pass\n") is None


def stdlib_files() -> list[Path]:
    """The standard library's own modules and packages (not its tests or test data)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "site-packages", "tkinter"}
    return sorted(
        p for p in root.rglob("*.py")
        if not skip.intersection(p.relative_to(root).parts[:-1])
    )


def test_every_stdlib_module_gives_what_a_whole_parse_gives() -> None:
    files = stdlib_files()
    assert len(files) > 500
    differ = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        whole = parsed_whole(text)
        if whole is not None and by_pieces(text) != whole:
            differ.append(str(path))
    assert differ == []


def test_no_piece_of_a_big_module_is_parsed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of it all: argparse (2,600 lines, 21 ms to parse at once here) is read in
    pieces of a few lines, not one long C call."""
    import argparse

    text = Path(argparse.__file__).read_text(encoding="utf-8")
    lengths: list[int] = []
    parse = ast.parse

    def measured(source: str, *args: object, **kwargs: object) -> ast.Module:
        lengths.append(len(source))
        return parse(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(toplevel.ast, "parse", measured)
    assert "_re" in (toplevel.imported_names(text) or ())
    assert lengths and max(lengths) < 2_000 < len(text) // 40


def test_pieces_are_cut_at_column_0_only() -> None:
    text = textwrap.dedent("""\
        import a
        class C:
            x = 1
        import b
    """)
    assert toplevel.imported_names(text) == ("a", "b")


SOURCES = {
    "plain": b"import os\nx = 1\n",
    "no line break at the end": b"import os\nx = 1",
    "empty": b"",
    "crlf and a lone cr": b"import os\r\nx = 1\ry = 2\r\n",
    "form feed and vertical tab inside lines": b"import os\n\x0c\nx = '\x0b'\n",
    "byte-order mark": b"\xef\xbb\xbfimport os\n",
    "coding cookie": b"# -*- coding: latin-1 -*-\nname = '\xe9'\n",
    "long": b"".join(b"x%d = %d  # %s\n" % (i, i, b"-" * 60) for i in range(5000)),
}


@pytest.mark.parametrize("data", SOURCES.values(), ids=SOURCES.keys())
def test_source_lines_are_what_linecache_reads(tmp_path: Path, data: bytes) -> None:
    import linecache
    import types

    path = tmp_path / "target_source.py"
    path.write_bytes(data)
    linecache.checkcache(str(path))
    linecache.cache.pop(str(path), None)
    expected = linecache.getlines(str(path))
    linecache.cache.pop(str(path), None)
    module = types.ModuleType("target_source")
    module.__file__ = str(path)
    assert toplevel.source_lines(module) == expected
    # it is linecache's entry now: tracebacks and later lookups read the same lines
    assert linecache.cache[str(path)][2] == expected
    assert linecache.getlines(str(path)) == expected


def test_source_lines_of_stdlib_modules_are_what_linecache_reads() -> None:
    import linecache
    import types

    for path in stdlib_files()[:300]:
        linecache.cache.pop(str(path), None)
        expected = linecache.getlines(str(path))
        linecache.cache.pop(str(path), None)
        module = types.ModuleType("m")
        module.__file__ = str(path)
        assert toplevel.source_lines(module) == expected, path


# -- property: random texts built from the shapes that make cutting hard --------------

FRAGMENTS = [
    "import real_{n}\n",
    "from pkg_{n} import name_{n} as alias_{n}\n",
    "x_{n} = {n}\n",
    "s_{n} = '''\nimport fake_{n}\n'''\n",
    's_{n} = """\ndef fake_{n}():\n    import fake_{n}\n"""\n',
    "t_{n} = (\n'import fake_{n}',\n{n},\n)\n",
    "u_{n} = [\n{n},\n]; import after_{n}\n",
    "v_{n} = 1 + \\\n{n}\n",
    "def f_{n}(a=[\n{n}]):\n    import inner_{n}\n    return '''\nimport fake_{n}\n'''\n",
    "@decorate_{n}\nclass C_{n}:\n    '''doc\nimport fake_{n}\n'''\n    import inner_{n}\n",
    "if cond_{n}:\n    import branch_{n}\nelif other_{n}:\n    pass\nelse:\n    import other_{n}\n",
    "try:\n    import tried_{n}\nexcept ImportError:\n    tried_{n} = None\nfinally:\n    pass\n",
    "# a comment with 'quotes' and \"\"\" in it\n",
    "w_{n} = f'{{{n}}}{{x_{n}}}'  # don't\n",
    "async def g_{n}():\n    import inner_{n}\n",
    "\n",
]
if sys.version_info >= (3, 12):
    FRAGMENTS.append('y_{n} = f"{{1 +\n{n}}}"\n')


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(range(len(FRAGMENTS))), max_size=25))
def test_random_texts_read_in_pieces_as_in_one_parse(picks: list[int]) -> None:
    text = "".join(FRAGMENTS[k].format(n=i) for i, k in enumerate(picks))
    whole = ast.parse(text)
    expected_names: set[str] = set()
    toplevel._collect(whole.body, expected_names)
    assert toplevel.imported_names(text) == tuple(sorted(expected_names))
    pieces = toplevel.parse_in_pieces(text, "<random>")
    # the same statements at the same places: what tracebacks and source lookups see
    assert [ast.dump(n, include_attributes=True) for t in pieces for n in t.body] == [
        ast.dump(n, include_attributes=True) for n in whole.body
    ]
