"""Names: which module globals a function reads, and rewriting those reads.

Data dependencies decide what a patch must carry. kpatch follows relocations from a
function to the data it references; our relocations are global-name reads. A function
*uses* a module constant when its body (or a default value) reads the name and no scope
inside the function binds it. A name that is both read and bound somewhere inside is
*ambiguous*: we do not re-derive Python's scoping rules for it, we refuse to rename it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass
class Usage:
    """The global names a ``def`` depends on."""

    reads: set[str] = field(default_factory=set)  # read as globals while the body runs
    def_time: set[str] = field(default_factory=set)  # read when the def executes (defaults)
    ambiguous: set[str] = field(default_factory=set)  # read, but also bound in some scope
    writes: set[str] = field(default_factory=set)  # declared ``global`` inside

    @property
    def all_reads(self) -> set[str]:
        return self.reads | self.def_time


def _arg_names(args: ast.arguments) -> set[str]:
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    every += [a for a in (args.vararg, args.kwarg) if a is not None]
    return {a.arg for a in every}


def _default_nodes(args: ast.arguments) -> list[ast.expr]:
    return [*args.defaults, *(d for d in args.kw_defaults if d is not None)]


def _body_nodes(node: FunctionNode) -> Iterable[ast.AST]:
    """Every node evaluated while the function runs (annotations left out)."""
    stack: list[ast.AST] = list(node.body)
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, ast.AnnAssign):
            # a local annotation is never evaluated inside a function
            stack.extend(n for n in (current.target, current.value) if n is not None)
            continue
        if isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef)):
            stack.extend(current.decorator_list)
            stack.extend(_default_nodes(current.args))
            stack.extend(current.body)
            yield from [*current.args.posonlyargs, *current.args.args, *current.args.kwonlyargs]
            continue
        stack.extend(ast.iter_child_nodes(current))


def usage(node: FunctionNode) -> Usage:
    """The globals `node` reads, at call time and at definition time."""
    loads: set[str] = set()
    bound = _arg_names(node.args)
    declared: set[str] = set()
    for child in _body_nodes(node):
        if isinstance(child, ast.Name):
            if isinstance(child.ctx, ast.Load):
                loads.add(child.id)
            else:
                bound.add(child.id)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(child.name)
            if not isinstance(child, ast.ClassDef):
                bound |= _arg_names(child.args)
        elif isinstance(child, ast.Lambda):
            bound |= _arg_names(child.args)
        elif isinstance(child, ast.alias):
            bound.add((child.asname or child.name).partition(".")[0])
        elif isinstance(child, ast.ExceptHandler) and child.name:
            bound.add(child.name)
        elif isinstance(child, (ast.MatchAs, ast.MatchStar)) and child.name:
            bound.add(child.name)
        elif isinstance(child, ast.MatchMapping) and child.rest:
            bound.add(child.rest)
        elif isinstance(child, ast.Global):
            declared.update(child.names)
        elif isinstance(child, ast.Nonlocal):
            bound.update(child.names)
    result = Usage(writes=declared & bound)
    result.reads = (loads - bound) | (loads & declared)
    result.ambiguous = (loads & bound) - declared
    for default in _default_nodes(node.args):
        result.def_time |= expression_reads(default)
    return result


def expression_reads(expr: ast.AST) -> set[str]:
    """Names an expression reads (comprehension variables and lambda arguments excluded)."""
    loads: set[str] = set()
    bound: set[str] = set()
    for child in ast.walk(expr):
        if isinstance(child, ast.Name):
            (loads if isinstance(child.ctx, ast.Load) else bound).add(child.id)
        elif isinstance(child, ast.Lambda):
            bound |= _arg_names(child.args)
    return loads - bound


@dataclass(frozen=True)
class Edit:
    """Replace the text of one Name node (positions as the ast gives them: utf-8 columns)."""

    line: int
    start: int
    end: int
    text: str


def rename_edits(node: FunctionNode, mapping: dict[str, str]) -> list[Edit]:
    """Edits renaming reads of the globals in `mapping` inside `node` (body and defaults)."""
    edits = []
    roots: list[ast.AST] = [*node.body, *_default_nodes(node.args)]
    for root in roots:
        for child in ast.walk(root):
            if isinstance(child, ast.Name) and child.id in mapping:
                assert child.end_col_offset is not None
                edits.append(
                    Edit(child.lineno, child.col_offset, child.end_col_offset, mapping[child.id])
                )
    return edits


def expression_edits(expr: ast.AST, mapping: dict[str, str]) -> list[Edit]:
    edits = []
    for child in ast.walk(expr):
        if isinstance(child, ast.Name) and child.id in mapping:
            assert child.end_col_offset is not None
            edits.append(
                Edit(child.lineno, child.col_offset, child.end_col_offset, mapping[child.id])
            )
    return edits
