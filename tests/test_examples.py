"""The README's example and the public-name contract, run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_and_patches() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "patched: qty must be >= 0" in out
    assert "['fix-1234']" in out
    assert "reverted: -5" in out


def test_readme_example_is_the_example_file() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text().split('"""\n\n', 1)[1]
    assert example in readme


def test_design_contract_names_exist() -> None:
    contract = ROOT.parent / "shared" / "checks" / "contract.py"
    if not contract.exists():
        pytest.skip("../shared/checks/contract.py is not beside this checkout")
    result = subprocess.run(
        [sys.executable, str(contract)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "contract: 0 missing" in result.stdout
