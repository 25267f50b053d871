"""Random edits to random modules never crash `livepatch build`.

Hypothesis assembles a module from typical pieces (functions, generators, coroutines,
closures, classes with properties and ``super()``, constants, regexes, mutable tables),
applies one to three random text edits (numbers, operators, inserted or deleted lines,
``yield``, decorators, renamed parameters, new imports and helpers, broken syntax) and
builds a patch. Whatever the edit, the outcome must be one of two: a patch that the real
engine applies to a live import of the old version (and reverts), or a `BuildRefused`
whose every refusal names a file:line, a reason and a hint. Any other exception — or an
engine refusal of a built patch — is a builder bug.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import livepatch
from livepatch.build import BuildRefused, build_result

PIECES = {
    "const": "LIMIT = 10\n",
    "regex": 'import re\n\n_PAT = re.compile(r"^[a-z]+$")\n',
    "area": "def area(w, h):\n    return w * h + 1\n",
    "gen": "def evens(n):\n    for i in range(n):\n        if i % 2 == 0:\n            yield i\n",
    "cart": (
        "class Cart:\n"
        '    """A cart."""\n'
        "\n"
        "    rate = 2\n"
        "\n"
        "    def __init__(self):\n"
        "        self.items = {}\n"
        "\n"
        "    def add(self, item, qty=1):\n"
        "        self.items[item] = self.items.get(item, 0) + qty * self.rate\n"
        "        return self.items[item]\n"
        "\n"
        "    @property\n"
        "    def size(self):\n"
        "        return len(self.items)\n"
    ),
    "child": (
        "class Base:\n"
        "    def hello(self):\n"
        '        return "base"\n'
        "\n"
        "\n"
        "class Child(Base):\n"
        "    def hello(self):\n"
        '        return super().hello() + "!"\n'
    ),
    "closure": "def make(step):\n    def bump(x):\n        return x + step\n    return bump\n",
    "check": "def check(name):\n    return bool(_PAT.match(name)) and len(name) < LIMIT\n",
    "coro": "async def fetch(x):\n    return x * 2\n",
    "table": 'TABLE = {"a": 1}\n\n\ndef look(k):\n    return TABLE.get(k, 0)\n',
    "wrapped": (
        "import functools\n"
        "\n"
        "\n"
        "def logged(fn):\n"
        "    @functools.wraps(fn)\n"
        "    def wrapper(*args):\n"
        "        return fn(*args)\n"
        "    return wrapper\n"
        "\n"
        "\n"
        "@logged\n"
        "def shout(text):\n"
        "    return text.upper() + '!' * 2\n"
    ),
    "static": (
        "class Money:\n"
        "    @staticmethod\n"
        "    def parse(text):\n"
        "        return int(text) * 100\n"
        "\n"
        "    @classmethod\n"
        "    def zero(cls):\n"
        "        return cls()\n"
        "\n"
        "    class Inner:\n"
        "        def f(self, x=3):\n"
        "            return x + 1\n"
    ),
    "sentinel": (
        "_missing = object()\n"
        "\n"
        "\n"
        "def get(d, k, default=_missing):\n"
        "    return d.get(k, default)\n"
    ),
}
ORDER = list(PIECES)
NEW_HELPER = "\n\nimport hashlib\n\n\ndef digest(x):\n    return hashlib.md5(x).hexdigest()\n"
_counter = itertools.count()


@st.composite
def modules(draw: st.DrawFn) -> str:
    chosen = draw(st.sets(st.sampled_from(ORDER), min_size=2, max_size=6))
    if "check" in chosen:
        chosen |= {"const", "regex"}
    return "\n\n".join(PIECES[name] for name in ORDER if name in chosen)


def _edit(text: str, data: st.DataObject) -> str:
    lines = text.splitlines(keepends=True)
    kind = data.draw(st.sampled_from(
        ["number", "operator", "insert", "delete", "duplicate", "yield", "decorator",
         "rename", "helper", "string", "syntax", "super"]
    ))
    index = data.draw(st.integers(0, max(0, len(lines) - 1)))
    line = lines[index] if lines else ""
    indent = line[: len(line) - len(line.lstrip())]
    if kind == "number" and re.search(r"\d+", text):
        spots = list(re.finditer(r"\d+", text))
        spot = spots[data.draw(st.integers(0, len(spots) - 1))]
        return text[: spot.start()] + str(data.draw(st.integers(0, 99))) + text[spot.end() :]
    if kind == "operator":
        return text.replace(" + ", " - ", 1) if " + " in text else text.replace(" * ", " + ", 1)
    if kind == "insert":
        lines.insert(index, indent + data.draw(st.sampled_from(
            ["pass\n", "x = 1\n", "print('hi')\n", "return None\n", "global LIMIT\n"])))
    elif kind == "delete" and lines:
        del lines[index]
    elif kind == "duplicate" and lines:
        lines.insert(index, line)
    elif kind == "yield":
        lines.insert(index + 1, indent + "    yield 1\n" if line.rstrip().endswith(":")
                     else indent + "yield 1\n")
    elif kind == "decorator":
        defs = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(("def ", "async def"))]
        if defs:
            at = defs[index % len(defs)]
            pad = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
            lines.insert(at, pad + data.draw(st.sampled_from(
                ["@staticmethod\n", "@functools.lru_cache\n", "@classmethod\n"])))
    elif kind == "rename":
        return text.replace("(self, item, qty=1)", "(self, thing, qty=1)").replace(
            "item]", "thing]").replace("(w, h)", "(width, h)").replace("w * h", "width * h")
    elif kind == "helper":
        return text.replace("return w * h", "return len(digest(b'x')) + w * h") + NEW_HELPER
    elif kind == "string":
        return text.replace('"base"', '"BASE"').replace("[a-z]", "[a-z0-9]")
    elif kind == "syntax":
        lines.insert(index, "def broken(:\n")
    elif kind == "super":
        return text.replace("return len(self.items)", "return super().__sizeof__()")
    return "".join(lines)


def _import(name: str, path: Path) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=modules(), data=st.data())
def test_random_edits_give_an_applicable_patch_or_a_reasoned_refusal(
    old: str, data: st.DataObject
) -> None:
    new = old
    for _ in range(data.draw(st.integers(1, 3))):
        new = _edit(new, data)
    name = f"lp_fuzz_{next(_counter)}"
    try:
        result = build_result({name: old}, {name: new})
    except BuildRefused as exc:
        assert exc.refusals
        for refusal in exc.refusals:
            assert refusal.line >= 1 and refusal.reason and refusal.hint
            assert f"{name}.py:{refusal.line}:" in refusal.message()
        assert "\n" not in str(exc)
        return
    assert build_result({name: old}, {name: new}).text == result.text
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.py"
        path.write_text(old)
        try:
            _import(name, path)
            patch = livepatch.loads(result.text, filename=f"<fuzz {name}>")
            livepatch.apply(patch, model="immediate")
            livepatch.revert(patch.name, model="immediate")
        finally:
            sys.modules.pop(name, None)


UTIL = (
    "LIMIT = 10\n"
    "\n"
    "\n"
    "def clip(n):\n"
    "    return min(n, LIMIT)\n"
)
APP = (
    "from .util import clip\n"
    "\n"
    "\n"
    "def handle(n):\n"
    "    return clip(n) * 2\n"
)
PACKAGE_EDITS = {
    "util-body": ("util", "return min(n, LIMIT)", "return max(0, min(n, LIMIT))"),
    "util-const": ("util", "LIMIT = 10", "LIMIT = 7"),
    "app-body": ("app", "return clip(n) * 2", "return clip(n) * 3"),
    "shared-helper": ("util", "", "\n\ndef double(n):\n    return 2 * n\n"),
    "use-shared": ("app", "from .util import clip\n", "from .util import clip, double\n"),
    "call-shared": ("app", "return clip(n) * 2", "return double(clip(n))"),
    "new-module-import": ("app", "from .util import clip\n", "from .extra import clip\n"),
    "util-generator": ("util", "return min(n, LIMIT)", "yield min(n, LIMIT)"),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.sets(st.sampled_from(sorted(PACKAGE_EDITS)), min_size=1, max_size=4))
def test_random_package_edits_apply_or_refuse(edits: set[str]) -> None:
    if "call-shared" in edits:  # the new version must be a working program itself
        edits = edits | {"use-shared", "shared-helper"}
    if "use-shared" in edits:
        edits = edits | {"shared-helper"}
    package = f"lp_fuzzpkg_{next(_counter)}"
    old = {package: "", f"{package}.util": UTIL, f"{package}.app": APP}
    new = dict(old)
    for edit in sorted(edits):
        module, before, after = PACKAGE_EDITS[edit]
        key = f"{package}.{module}"
        new[key] = new[key] + after if not before else new[key].replace(before, after, 1)
    try:
        result = build_result(old, new)
    except BuildRefused as exc:
        assert all(r.line >= 1 and r.hint for r in exc.refusals)
        return
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / package
        root.mkdir()
        (root / "__init__.py").write_text("")
        (root / "util.py").write_text(UTIL)
        (root / "app.py").write_text(APP)
        sys.path.insert(0, folder)
        try:
            app = importlib.import_module(f"{package}.app")
            patch = livepatch.loads(result.text, filename=f"<fuzz {package}>")
            livepatch.apply(patch, model="immediate")
            assert isinstance(app.handle(5), int)  # type: ignore[attr-defined]
            livepatch.revert(patch.name, model="immediate")
            assert app.handle(50) == 20  # type: ignore[attr-defined]
        finally:
            sys.path.remove(folder)
            for name in [n for n in sys.modules if n.startswith(package)]:
                del sys.modules[name]
