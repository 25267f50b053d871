"""The patch file itself: naming, layout, determinism, the command line, literals.

These tests look at what `livepatch build` writes (and how it refuses) for package
folders, src layouts and namespace packages, and run the built patches against live
imports of the old package. The command is exercised through click's runner — the same
`build_command` object the `livepatch` CLI registers.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import livepatch
from livepatch.build import BuildInputError, BuildRefused, Reason, build, build_result
from livepatch.build.command import build_command
from livepatch.build.emit import string_literal

PACKAGES = Path(__file__).parent / "fixtures" / "packages"
V1, V2 = PACKAGES / "v1" / "lpb_shop", PACKAGES / "v2" / "lpb_shop"


@pytest.fixture
def shop_v1() -> Iterator[object]:
    sys.path.insert(0, str(PACKAGES / "v1"))
    try:
        yield importlib.import_module("lpb_shop.cart")
    finally:
        sys.path.remove(str(PACKAGES / "v1"))
        for name in [n for n in sys.modules if n.startswith("lpb_shop")]:
            del sys.modules[name]
        for applied in livepatch.patches():
            livepatch.revert(applied.name, model="immediate")


def test_package_folders_patch_a_live_package(shop_v1: object) -> None:
    result = build_result(V1, V2)
    assert result.modules == ["lpb_shop.cart", "lpb_shop.util"]
    whats = {c.what: c.kind.name for c in result.changes}
    assert whats == {
        "lpb_shop.cart:Cart.add": "REPLACED",
        "lpb_shop.cart:clamp": "IMPORT",  # the relative import, made absolute
        "lpb_shop.util:money": "REPLACED",
        "lpb_shop.util:clamp": "HELPER",
    }
    notes = {n.what: n.kind.name for n in result.notes}
    assert notes["lpb_shop.reports"] == "NEW_MODULE"
    assert notes["lpb_shop:__version__"] == "METADATA"
    # util.clamp is new: it cannot be imported when the patch file loads, so one callback
    # binds it in both modules at apply time
    assert "from lpb_shop.util import clamp\n" not in result.text
    assert '_lp_imports.append(("lpb_shop.cart", "clamp", clamp, "lpb_shop.util"))' in result.text

    cart_module = shop_v1
    util = sys.modules["lpb_shop.util"]
    cart = cart_module.Cart()  # type: ignore[attr-defined]
    cart.add("a", -3)
    assert cart.lines == {"a": -3} and util.money(-150) == "-2.50"
    patch = livepatch.loads(result.text)
    livepatch.apply(patch, model="immediate")
    cart.add("a", 1)
    assert cart.lines == {"a": 0}  # clamped by the new helper, on the live instance
    assert util.money(-150) == "-1.50"
    assert cart_module.clamp is util.clamp  # type: ignore[attr-defined]
    livepatch.revert(patch.name, model="immediate")
    assert util.money(-150) == "-2.50" and not hasattr(cart_module, "clamp")


def test_output_is_byte_identical_across_processes_and_hash_seeds() -> None:
    script = (
        "import sys; from livepatch.build import build; "
        "sys.stdout.write(build(sys.argv[1], sys.argv[2]))"
    )
    outputs = set()
    for seed in ("1", "2", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-c", script, str(V1), str(V2)],
                              capture_output=True, text=True, env=env, timeout=60, check=True)
        outputs.add(done.stdout)
    assert len(outputs) == 1
    assert outputs == {build(V1, V2)}


def test_src_layout_and_root() -> None:
    old, new = PACKAGES / "src_layout" / "v1", PACKAGES / "src_layout" / "v2"
    by_layout = build_result(old, new)
    assert sorted(c.what for c in by_layout.changes) == ["lpb_src.core:hello", "mod:ping"]
    # a namespace package has no __init__.py to go by: --root names it
    by_root = build_result(old, new, root="src")
    assert sorted(c.what for c in by_root.changes) == ["lpb_ns.mod:ping", "lpb_src.core:hello"]
    with pytest.raises(BuildInputError, match="--root nowhere is not a folder"):
        build_result(old, new, root="nowhere")


def test_single_files_take_their_module_name_from_the_package(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (tmp_path / "mod_v2.py").write_text("def f():\n    return 2\n")
    result = build_result(tmp_path / "pkg" / "mod.py", tmp_path / "mod_v2.py",
                          module="pkg.mod")
    assert [c.what for c in result.changes] == ["pkg.mod:f"]
    result = build_result(tmp_path / "mod_v2.py", tmp_path / "pkg" / "mod.py")
    assert [c.what for c in result.changes] == ["pkg.mod:f"]


def test_new_module_needed_by_the_new_code_is_refused() -> None:
    old = {"app": "def f():\n    return 1\n"}
    new = {"app": "import app_helpers\n\n\ndef f():\n    return app_helpers.one()\n",
           "app_helpers": "def one():\n    return 1\n"}
    with pytest.raises(BuildRefused) as info:
        build(old, new)
    (refusal,) = info.value.refusals
    assert refusal.reason is Reason.NEW_MODULE and refusal.line == 1
    assert "livepatch upgrade" in str(info.value)


def test_syntax_error_is_a_refusal_with_its_line() -> None:
    with pytest.raises(BuildRefused) as info:
        build({"m": "def f():\n    return 1\n"}, {"m": "def f():\n    return (1\n"})
    assert info.value.reason is Reason.SYNTAX
    assert str(info.value).startswith("refused: m.py:2: m:")


def test_docstring_only_edits_are_patched_when_asked() -> None:
    old = {"m": 'def f():\n    """Old."""\n    return 1\n'}
    new = {"m": 'def f():\n    """New."""\n    return 1\n'}
    assert build_result(old, new).changes == []
    asked = build_result(old, new, include_docstrings=True)
    assert [c.what for c in asked.changes] == ["m:f"]


def test_refusals_are_all_listed_in_order() -> None:
    old = {"m": "def a():\n    return 1\n\n\ndef b():\n    return 2\n"}
    new = {"m": "def a():\n    yield 1\n\n\nasync def b():\n    return 2\n"}
    with pytest.raises(BuildRefused) as info:
        build(old, new)
    assert [(r.line, r.reason) for r in info.value.refusals] == [
        (1, Reason.KIND), (5, Reason.KIND)
    ]
    assert str(info.value).endswith("(and 1 more)")


@pytest.mark.parametrize("text", [
    "def f():\n    return '\\\\n'\n",
    'def f():\n    """Doc."""\n    return "\'\'\'"\n',
    "def f():\n    return 1  # ends with a backslash \\\n",
    "def f():\n    return '\\x00\\t'\n",
    "def f():\n    s = '''a'''\n    t = \"\"\"b\"\"\"\n",
])
def test_string_literals_read_back_exactly(text: str) -> None:
    literal = string_literal(text)
    value = ast.literal_eval(literal.strip())
    assert value in (text, "\n" + text)


def test_command_writes_the_file_and_reports_on_stderr(tmp_path: Path) -> None:
    out = tmp_path / "fix.py"
    runner = CliRunner()
    done = runner.invoke(build_command, [str(V1), str(V2), "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert out.read_text() == build(V1, V2)
    assert "lpb_shop.cart:Cart.add: replaced" in done.stderr
    assert f"wrote {out}" in done.stderr and done.stdout == ""


def test_command_json_and_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(build_command, [str(V1), str(V2), "--json"])
    assert done.exit_code == 0
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["text"] == build(V1, V2)
    assert {c["what"] for c in report["changes"]} >= {"lpb_shop.util:money"}

    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "b.py").write_text("def f():\n    yield 1\n")
    refused = runner.invoke(build_command, [str(tmp_path / "a.py"), str(tmp_path / "b.py"),
                                            "--json"])
    assert refused.exit_code == 1
    report = json.loads(refused.stdout)
    assert report["ok"] is False and report["code"] == "build-refused"
    assert report["refusals"][0]["reason"] == "kind"

    usage = runner.invoke(build_command, [str(tmp_path / "a.py")])
    assert usage.exit_code == 2 and "pass OLD and NEW" in usage.stderr
    missing = runner.invoke(build_command, [str(tmp_path / "nope.py"), str(tmp_path / "a.py")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_livepatch_check_loads_a_built_patch_without_the_target(tmp_path: Path) -> None:
    """Values a patch computes at load time (a renamed regex) take the live module's imports
    the same way, not through the target module: the file loads where it is not imported."""
    case = Path(__file__).parent / "fixtures" / "corpus" / "regex_constant_renamed"
    text = build(case / "v1.py", case / "v2.py", module="not_imported_anywhere")
    assert "\nimport re\n" in text and "from not_imported_anywhere import" not in text
    patch = tmp_path / "fix.py"
    patch.write_text(text)
    livepatch_cli = Path(sys.executable).with_name("livepatch")
    if not livepatch_cli.exists():
        pytest.skip("the livepatch console script is not installed in this environment")
    done = subprocess.run([str(livepatch_cli), "check", str(patch)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replaces not_imported_anywhere:valid" in done.stdout


def test_whole_replacement_reports_closures_that_keep_old_code() -> None:
    old = {"m": "def retry(n):\n    def wrapper():\n        return n\n    return wrapper\n"}
    new = {"m": "def retry(n):\n    n = n + 1\n\n    def wrapper():\n        return n * 2\n"
                "    return wrapper\n"}
    result = build_result(old, new)
    assert [c.what for c in result.changes] == ["m:retry"]
    (note,) = result.notes
    assert note.kind.name == "OLD_CLOSURES" and note.detail == "wrapper"
    assert "closures of its nested functions made before the patch keep" in result.text


def test_encodings_and_tab_indentation(tmp_path: Path) -> None:
    """Sources are decoded as the import system decodes them; tab-indented methods move to
    column 0 without touching their strings."""
    old = tmp_path / "old.py"
    new = tmp_path / "new.py"
    old.write_bytes(b"# -*- coding: latin-1 -*-\nclass Greeter:\n\tdef hi(self):\n"
                    b'\t\treturn """caf\xe9\n\t\tbar"""\n')
    new.write_bytes(b"\xef\xbb\xbfclass Greeter:\n\tdef hi(self):\n"
                    b'\t\treturn """caf\xc3\xa9!\n\t\tbar"""\n')
    result = build_result(old, new, module="lpb_tabs")
    assert [c.what for c in result.changes] == ["lpb_tabs:Greeter.hi"]
    (old_copy := tmp_path / "lpb_tabs.py").write_bytes(old.read_bytes())
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("lpb_tabs")
        patch = livepatch.loads(result.text)
        livepatch.apply(patch, model="immediate")
        assert module.Greeter().hi() == "café!\n\t\tbar"
        livepatch.revert(patch.name, model="immediate")
        assert module.Greeter().hi() == "café\n\t\tbar"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lpb_tabs", None)
        old_copy.unlink()
