"""Fixtures for the CLI tests: the agent tests' harness (tests/agent/lp_harness.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))

from lp_harness import lp, make_target, target  # noqa: E402, F401 - pytest fixtures
