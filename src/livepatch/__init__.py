"""livepatch: apply a fix to a running Python process without restarting it.

The public API (DESIGN.md section 3). A patch names live functions as
``package.module:Qualified.name`` and replaces their code in place; a transition moves
every thread and asyncio task to the new code at a moment when none of its frames runs
an old version (the consistency model); revert runs the same machinery backwards.
"""

from __future__ import annotations

from livepatch import agent, shadow
from livepatch.build import build
from livepatch.core import AppliedPatch, apply, patches, plan, revert
from livepatch.errors import (
    AlreadyApplied,
    CallbackFailed,
    FingerprintMismatch,
    NotApplied,
    PatchError,
    PatchFileError,
    StateMismatch,
    TargetNotFound,
    TransitionBusy,
    TransitionReversed,
    TransitionTimeout,
    UnsafeChange,
)
from livepatch.fingerprint import fingerprint
from livepatch.patch import Patch, load, loads
from livepatch.transition import Transition, safepoint, transition

__version__ = "0.1.0"

__all__ = [
    "AlreadyApplied",
    "AppliedPatch",
    "CallbackFailed",
    "FingerprintMismatch",
    "NotApplied",
    "Patch",
    "PatchError",
    "PatchFileError",
    "StateMismatch",
    "TargetNotFound",
    "Transition",
    "TransitionBusy",
    "TransitionReversed",
    "TransitionTimeout",
    "UnsafeChange",
    "agent",
    "apply",
    "build",
    "fingerprint",
    "load",
    "loads",
    "patches",
    "plan",
    "revert",
    "safepoint",
    "shadow",
    "transition",
]
