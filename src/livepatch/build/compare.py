"""Comparing two versions of one function or class.

The question kpatch-build asks of every section — "did this change, and if so, can the
change be made live?" — asked of a ``def``. Comparison is on syntax trees without
positions, so a body that only moved is unchanged (kpatch's ``__LINE__`` rule) and an edit
to comments or layout is not a change. Edits that the compiled code does not see —
docstrings and annotations — are classified separately so they can be reported rather
than patched.

What makes a changed function unpatchable is decided from the compiled code objects: a
change of kind (function, generator, coroutine) or new free variables cannot be put into
a live function object, whose callers and closure cells are already fixed.
"""

from __future__ import annotations

import ast
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from livepatch.build.model import FunctionNode, FunctionUnit, is_docstring
from livepatch.fingerprint import same_code

_KIND_FLAGS = 0x20 | 0x80 | 0x100 | 0x200
_KIND_NAMES = {0: "function", 0x20: "generator", 0x80: "coroutine", 0x200: "async generator"}


class Status(enum.Enum):
    SAME = "unchanged"
    FORMATTING = "formatting or comments only"
    DOCSTRING = "docstring only"
    ANNOTATIONS = "annotations only"
    CHANGED = "changed"


def dump(node: ast.AST | Sequence[ast.AST] | None) -> str:
    if node is None:
        return ""
    if not isinstance(node, ast.AST):
        return "[" + ", ".join(ast.dump(n) for n in node) + "]"
    return ast.dump(node)


def canon(
    node: ast.AST | None,
    *,
    decorators: bool = True,
    docstrings: bool = True,
    annotations: bool = True,
    blank: frozenset[int] = frozenset(),
    rename: dict[str, str] | None = None,
) -> str:
    """A position-free text form of `node`, like ``ast.dump``, optionally leaving out the
    top node's decorators, every docstring, what a function never evaluates of its
    annotations (its own, and those of local variables), and the bodies of the defs whose
    ids are in `blank`; `rename` maps global names to new ones. Built directly, without
    copying the tree."""
    out: list[str] = []
    top = node

    def visit(current: object) -> None:
        if isinstance(current, ast.AST):
            out.append(type(current).__name__)
            out.append("(")
            for name in current._fields:
                value = getattr(current, name, None)
                if rename and name == "id" and isinstance(current, ast.Name):
                    value = rename.get(current.id, current.id)
                if current is top and name == "decorator_list" and not decorators:
                    continue
                if not annotations and name in ("annotation", "returns"):
                    if current is top or _is_arg_of(current, top) or isinstance(
                        current, ast.AnnAssign
                    ):
                        out.append(f"{name}=_,")
                        continue
                if name == "body" and isinstance(value, list):
                    if id(current) in blank:
                        out.append("body=[Pass],")
                        continue
                    if not docstrings and value and is_docstring(value[0]) and isinstance(
                        current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
                    ):
                        value = value[1:]
                out.append(f"{name}=")
                visit(value)
                out.append(",")
            out.append(")")
        elif isinstance(current, list):
            out.append("[")
            for item in current:
                visit(item)
                out.append(",")
            out.append("]")
        else:
            out.append(repr(current))

    visit(node)
    return "".join(out)


def _is_arg_of(node: ast.AST, func: ast.AST | None) -> bool:
    if not isinstance(node, ast.arg) or not isinstance(func, (ast.FunctionDef,
                                                              ast.AsyncFunctionDef)):
        return False
    args = func.args
    return any(node is a for a in [*args.posonlyargs, *args.args, *args.kwonlyargs,
                                    args.vararg, args.kwarg])


@dataclass(frozen=True)
class Verdict:
    status: Status
    problem: str | None = None  # why a change cannot be made live (kind, free variables)
    problem_kind: str | None = None  # "kind" | "freevars" | "decorator" | "signature"


def kind_name(unit: FunctionUnit) -> str:
    if unit.code is None:
        return "async function" if isinstance(unit.node, ast.AsyncFunctionDef) else "function"
    return _KIND_NAMES.get(unit.code.co_flags & _KIND_FLAGS, "function")


def compare_functions(old: FunctionUnit, new: FunctionUnit) -> Verdict:
    """Classify the change from `old` to `new` and name what makes it unpatchable."""
    if dump(old.node.decorator_list) != dump(new.node.decorator_list):
        return Verdict(
            Status.CHANGED,
            "its decorators changed, and the live decorator keeps running",
            "decorator",
        )
    if (
        old.code is not None
        and new.code is not None
        and same_code(old.code, new.code)
        and canon(old.node.args) == canon(new.node.args)
        and canon(old.node.returns) == canon(new.node.returns)
    ):
        # the compiler made the same code (line numbers aside) from the same signature:
        # only layout or comments moved — cheaper to learn than comparing whole trees
        return Verdict(Status.SAME)
    if canon(old.node, decorators=False) == canon(new.node, decorators=False):
        return Verdict(Status.SAME)
    if type(old.node) is not type(new.node) or kind_name(old) != kind_name(new):
        return Verdict(
            Status.CHANGED,
            f"it changed from a {kind_name(old)} to a {kind_name(new)}, and live callers "
            "depend on the kind",
            "kind",
        )
    if old.code is not None and new.code is not None:
        added = sorted(set(new.code.co_freevars) - set(old.code.co_freevars))
        if added:
            return Verdict(
                Status.CHANGED,
                f"the new code closes over {', '.join(added)}, which the live function "
                "does not: a live closure cannot gain cells",
                "freevars",
            )
    if canon(old.node, decorators=False, docstrings=False) == canon(
        new.node, decorators=False, docstrings=False
    ):
        return Verdict(Status.DOCSTRING)
    if canon(old.node, decorators=False, docstrings=False, annotations=False) == canon(
        new.node, decorators=False, docstrings=False, annotations=False
    ):
        return Verdict(Status.ANNOTATIONS)
    problem = signature_problem(old.node.args, new.node.args)
    if problem:
        return Verdict(Status.CHANGED, problem, "signature")
    return Verdict(Status.CHANGED)


def signature_problem(old: ast.arguments, new: ast.arguments) -> str | None:
    """Why callers written for `old` could break with `new`; None when every call still binds.

    Allowed: new parameters with defaults, new ``*args``/``**kwargs``, a positional-only
    parameter becoming positional-or-keyword, a new default. Everything else is a break.
    """
    old_pos = [*old.posonlyargs, *old.args]
    new_pos = [*new.posonlyargs, *new.args]
    old_first_default = len(old_pos) - len(old.defaults)
    new_first_default = len(new_pos) - len(new.defaults)
    if len(new_pos) < len(old_pos):
        removed = ", ".join(a.arg for a in old_pos[len(new_pos) :])
        return f"positional parameter(s) {removed} removed"
    for i, before in enumerate(old_pos):
        after = new_pos[i]
        old_posonly = i < len(old.posonlyargs)
        new_posonly = i < len(new.posonlyargs)
        if not old_posonly and (new_posonly or before.arg != after.arg):
            return f"parameter {before.arg!r} renamed or made positional-only"
        if i >= old_first_default and i < new_first_default:
            return f"parameter {before.arg!r} lost its default"
    for i in range(len(old_pos), len(new_pos)):
        if i < new_first_default:
            return f"new parameter {new_pos[i].arg!r} has no default"
        if old.vararg is not None:
            return f"new positional parameter {new_pos[i].arg!r} would take *{old.vararg.arg}"
    if old.vararg is not None and new.vararg is None:
        return f"*{old.vararg.arg} removed"
    if old.kwarg is not None and new.kwarg is None:
        return f"**{old.kwarg.arg} removed"
    new_kw = {a.arg: d for a, d in zip(new.kwonlyargs, new.kw_defaults, strict=True)}
    new_named = {a.arg for a in new.args} | set(new_kw)
    for arg, default in zip(old.kwonlyargs, old.kw_defaults, strict=True):
        if arg.arg not in new_named:
            return f"keyword parameter {arg.arg!r} removed"
        if default is not None and arg.arg in new_kw and new_kw[arg.arg] is None:
            return f"keyword parameter {arg.arg!r} lost its default"
    old_kw = {a.arg for a in old.kwonlyargs}
    for arg, default in zip(new.kwonlyargs, new.kw_defaults, strict=True):
        if arg.arg not in old_kw and default is None and arg.arg not in {a.arg for a in old_pos}:
            return f"new keyword parameter {arg.arg!r} has no default"
        if arg.arg in {a.arg for a in old_pos}:
            return f"parameter {arg.arg!r} became keyword-only"
    return None


def skeleton(node: FunctionNode, nested: list[FunctionNode]) -> str:
    """The function with the bodies of its nested defs blanked: equal skeletons mean only
    nested functions changed, so they can be patched on their own."""
    return canon(node, decorators=False, blank=frozenset(id(n) for n in nested))
