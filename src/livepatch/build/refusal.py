"""Refusals: the changes `livepatch build` will not turn into a live patch, and why.

kpatch-build stops when a change touches something a function-level patch cannot carry
(changed data, changed initialisers, a changed struct layout) and tells the developer what
to use instead. We do the same for Python: each refusal names the place (``file:line``),
the function or value, the reason, and the tool that fits — shadow variables for new
per-object state, callbacks for one-time migrations, ``--allow-data`` or
``--allow-signature-change`` to accept a reviewed risk, or ``livepatch upgrade`` when the
change needs a fresh process.

A build collects every refusal before it raises, so one run lists them all; the
exception's one-line message names the first and counts the rest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from livepatch.errors import PatchError, UnsafeChange


class Reason(enum.Enum):
    """Why a change was refused; the value is the phrase used in messages."""

    SYNTAX = "the source does not compile"
    FREE_VARIABLES = "free variables changed"
    KIND = "function kind changed"
    DECORATOR = "decorators changed"
    BASES = "class bases changed"
    METACLASS = "metaclass changed"
    SLOTS = "__slots__ changed"
    FIELDS = "dataclass fields changed"
    INSTANCE_STATE = "new instance attribute"
    ENUM = "enum members changed"
    SIDE_EFFECT = "module-level statement changed"
    MUTABLE_DATA = "mutable data changed"
    CLASS_DATA = "class attribute changed"
    SIGNATURE = "signature changed incompatibly"
    NEW_CLASS = "new class needed"
    NEW_MODULE = "new module needed"
    IMPORT_CHANGED = "import changed"
    LAMBDA = "lambda changed"
    NOT_UNDERSTOOD = "change not understood"


class Hint(enum.Enum):
    """The tool that fits a refused change; the value is the advice printed."""

    SHADOW = "keep new per-object state in shadow variables (livepatch.shadow)"
    INSTANCE_DEFAULT = (
        "give the class a default for it (a class attribute), read it with "
        "getattr(self, name, default), or keep it in a shadow variable (livepatch.shadow)"
    )
    CALLBACK = "migrate it in a reviewed post_patch callback"
    ALLOW_DATA = "rebuild with --allow-data to emit a reviewable post_patch callback"
    ALLOW_SIGNATURE = "rebuild with --allow-signature-change to accept it with a warning"
    UPGRADE = "use livepatch upgrade (a new process) for this change"
    FIX_SOURCE = "fix the source and rebuild"
    SUPER = "call super(Class, self) explicitly, or use livepatch upgrade"


@dataclass(frozen=True)
class Refusal:
    """One change the builder will not patch live."""

    path: str
    line: int
    what: str  # "pkg.mod:Class.method", or the value's name
    reason: Reason
    detail: str
    hint: Hint

    def message(self) -> str:
        return (
            f"{self.path}:{self.line}: {self.what}: {self.reason.value}: {self.detail}; "
            f"{self.hint.value}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "line": self.line,
            "what": self.what,
            "reason": self.reason.name.lower(),
            "detail": self.detail,
            "hint": self.hint.value,
            "message": self.message(),
        }


class BuildRefused(UnsafeChange):
    """`livepatch build` found changes it cannot carry live; nothing was written."""

    code = "build-refused"

    def __init__(self, refusals: list[Refusal]) -> None:
        ordered = sorted(refusals, key=lambda r: (r.path, r.line, r.what, r.reason.name))
        self.refusals = ordered
        first = ordered[0]
        more = f" (and {len(ordered) - 1} more)" if len(ordered) > 1 else ""
        super().__init__(f"refused: {first.message()}{more}")

    @property
    def reason(self) -> Reason:
        return self.refusals[0].reason


class BuildInputError(PatchError):
    """The inputs of a build cannot be read (missing path, unknown git revision...)."""

    code = "build-input"
