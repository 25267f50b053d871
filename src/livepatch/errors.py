"""Errors: every refusal says what was refused, why, and what to do instead.

A `PatchError` is raised *before* anything changes, or after everything that changed has
been put back: a refused or failed patch never leaves a process half-patched. Messages
are one line, so the CLI and the agent can show them as they are.
"""

from __future__ import annotations

from typing import Any


class PatchError(Exception):
    """Base class: the patch was refused or failed and nothing in the process changed."""

    #: stable machine-readable code, used by the agent protocol and `--json` output
    code = "patch-error"

    def __init__(self, message: str = "", *args: object) -> None:
        # one line, always: messages embed text from user code and exceptions
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        super().__init__(" / ".join(lines), *args)
        #: what the message says, for programs (JSON-ready): a timeout's ``blockers``,
        #: the agent's final ``transition``; sent in the agent's error frame, printed by
        #: ``--json``
        self.details: dict[str, Any] = {}


class PatchFileError(PatchError):
    """A patch file could not be loaded (missing, syntax error, no or several patches)."""

    code = "bad-patch-file"


class TargetNotFound(PatchError):
    """A `module:qualname` target does not exist in this process."""

    code = "target-not-found"


class FingerprintMismatch(PatchError):
    """The live code is not the code the patch was built against."""

    code = "fingerprint-mismatch"


class UnsafeChange(PatchError):
    """The change cannot be applied to live code safely (kind, free variables, C code...)."""

    code = "unsafe-change"


class CallbackFailed(PatchError):
    """A pre_patch/pre_unpatch callback raised: the operation was vetoed."""

    code = "callback-failed"


class StateMismatch(PatchError):
    """A cumulative patch drops or downgrades a `patch.state` of a patch it supersedes."""

    code = "state-mismatch"


class TransitionTimeout(PatchError):
    """Some task never reached a safe point in time; the transition was reversed.

    ``details["blockers"]``: each blocker when it timed out, as
    ``{"task": ..., "frames": [...]}`` (the message shows the first five)."""

    code = "transition-timeout"

    def __init__(self, message: str, blockers: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.details["blockers"] = list(blockers or [])


class TransitionReversed(PatchError):
    """A revert turned the transition around before it completed: nothing changed."""

    code = "transition-reversed"


class TransitionBusy(PatchError):
    """Another transition is in flight; only one runs at a time."""

    code = "transition-busy"


class NotApplied(PatchError):
    """`revert` named a patch that is not applied."""

    code = "not-applied"


class AlreadyApplied(PatchError):
    """A patch with this name is applied already."""

    code = "already-applied"
