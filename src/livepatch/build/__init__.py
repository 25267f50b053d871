"""livepatch build: a patch file from two versions of the source (kpatch-build's role).

Nobody should hand-write a patch for an ordinary fix. Given the source a process runs and
the fixed source, `build` writes the patch file — the same format as a hand-written one,
readable and reviewable — or refuses, naming each change that cannot be applied live
(``file:line``, the function, the reason) and the tool to use instead.

The pipeline: `sources` reads both versions (files, folders, git revisions) and names
their modules; `model` cuts each changed module into functions, classes, data, imports and
statements; `compare` and `analysis` decide what is replaced, added, left alone or
refused; `emit` writes the file; `builder` ties them together and checks its own output.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from livepatch.build.analysis import ChangeKind, Item, NoteKind
    from livepatch.build.builder import BuildResult, build_git, build_result
    from livepatch.build.refusal import BuildInputError, BuildRefused, Hint, Reason, Refusal

# `import livepatch` (every CLI call, every process started with the agent) must stay
# cheap, so the builder's modules load on first use.
_LAZY = {
    "ChangeKind": "analysis", "Item": "analysis", "NoteKind": "analysis",
    "BuildResult": "builder", "build_git": "builder", "build_result": "builder",
    "BuildInputError": "refusal", "BuildRefused": "refusal", "Hint": "refusal",
    "Reason": "refusal", "Refusal": "refusal",
}


def build(old: Any, new: Any, **options: Any) -> str:
    """The text of a patch file that turns `old` into `new` (files, folders or
    ``{module: source}`` dicts); raises BuildRefused naming each unsafe change."""
    from livepatch.build.builder import build as _build

    return _build(old, new, **options)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'livepatch.build' has no attribute {name!r}")
    return getattr(importlib.import_module(f"livepatch.build.{module}"), name)


__all__ = [
    "BuildInputError",
    "BuildRefused",
    "BuildResult",
    "ChangeKind",
    "Hint",
    "Item",
    "NoteKind",
    "Reason",
    "Refusal",
    "build",
    "build_git",
    "build_result",
]
