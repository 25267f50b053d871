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

from livepatch.build.analysis import ChangeKind, Item, NoteKind
from livepatch.build.builder import BuildResult, build, build_git, build_result
from livepatch.build.refusal import BuildInputError, BuildRefused, Hint, Reason, Refusal

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
