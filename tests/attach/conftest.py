"""Fixtures of the attach tests: isolated agent directories and target programs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_targets import TARGET, Target, find_python


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Agent sockets and state of this test only, for the targets and for us alike."""
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    values = {
        "LIVEPATCH_SOCKET_DIR": str(sockets),
        "LIVEPATCH_STATE_DIR": str(tmp_path / "state"),
        "LIVEPATCH_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LIVEPATCH"))}
    env.update(values)
    return env


@pytest.fixture
def spawn(isolated_env: dict[str, str]) -> Iterator:  # type: ignore[type-arg]
    """spawn(version, mode, *args, env=...) starts the target program on that Python."""
    started: list[Target] = []

    def start(
        version: str,
        mode: str,
        *args: str,
        env: dict[str, str] | None = None,
        options: tuple[str, ...] = (),
        python: str | None = None,
    ) -> Target:
        python = python or find_python(version)
        if python is None:
            pytest.skip(f"python{version} is not installed")
        argv = [python, *options, str(TARGET), mode, *args]
        target = Target(argv, {**isolated_env, **(env or {})})
        started.append(target)
        return target

    yield start
    for target in started:
        target.stop()
