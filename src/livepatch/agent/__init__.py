"""The agent: a control socket inside a running process (placeholder)."""

from __future__ import annotations


def start() -> None:
    """Start the agent in this process (placeholder)."""
    raise NotImplementedError("livepatch.agent.start is not implemented yet")
