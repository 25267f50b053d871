"""Fixtures for the agent tests: see lp_harness."""

from lp_harness import lp, make_target, target  # noqa: F401 - pytest fixtures
