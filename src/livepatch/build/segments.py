"""Segments: the exact source text of a ``def`` or a value, moved to column 0.

A patch file shows the developer's own code, comments and formatting included, so the
builder copies text rather than regenerating it from the syntax tree. Moving a method
(indented in its class) to the top level of the patch file must not change what it
compiles to: lines that begin *inside* a multi-line string keep their leading whitespace,
because there it is part of the string's value (a docstring, an SQL template).
Everything else loses the def's own indentation.
"""

from __future__ import annotations

import ast

from livepatch.build.model import FunctionNode, ModuleModel, protected_lines
from livepatch.build.names import Edit


class SegmentError(Exception):
    """The text cannot be moved without changing its meaning."""


def def_text(
    model: ModuleModel,
    node: FunctionNode | ast.ClassDef,
    edits: list[Edit] = (),  # type: ignore[assignment]
    indent_to: str = "",
) -> str:
    """The ``def`` or ``class`` (decorators left out) at column 0 (or `indent_to`), with
    `edits` applied."""
    first, last = node.lineno, node.end_lineno or node.lineno
    raw = [line.encode("utf-8") for line in model.lines[first - 1 : last]]
    by_line: dict[int, list[Edit]] = {}
    for edit in edits:
        by_line.setdefault(edit.line, []).append(edit)
    for lineno, line_edits in by_line.items():
        index = lineno - first
        data = raw[index]
        for edit in sorted(line_edits, key=lambda e: e.start, reverse=True):
            data = data[: edit.start] + edit.text.encode("utf-8") + data[edit.end :]
        raw[index] = data
    lines = [data.decode("utf-8") for data in raw]
    protected = protected_lines(node)
    indent = lines[0][: node.col_offset]  # col_offset is ascii here: only whitespace
    if indent.strip():
        raise SegmentError("the def does not start its line")
    out = []
    for offset, line in enumerate(lines):
        lineno = first + offset
        if offset and lineno in protected:
            out.append(line)
        elif line.startswith(indent):
            out.append(indent_to + line[len(indent) :])
        elif not line.strip():
            out.append("\n")
        else:
            # inside brackets, after a backslash, or a comment: indentation is free here
            out.append(indent_to + line.lstrip(" \t\f"))
    text = "".join(out)
    if not text.endswith("\n"):
        text += "\n"
    return text


def expr_text(model: ModuleModel, expr: ast.expr, edits: list[Edit] = ()) -> str:  # type: ignore[assignment]
    """The source of an expression, continuation lines kept as written."""
    first, last = expr.lineno, expr.end_lineno or expr.lineno
    raw = [line.encode("utf-8") for line in model.lines[first - 1 : last]]
    if not raw:
        raise SegmentError("expression out of range")
    end = expr.end_col_offset
    if end is None:
        raise SegmentError("expression has no end")
    raw[-1] = raw[-1][:end]
    raw[0] = raw[0][expr.col_offset :]
    shift = {first: expr.col_offset}
    for edit in sorted(edits, key=lambda e: (e.line, e.start), reverse=True):
        index = edit.line - first
        base = shift.get(edit.line, 0)
        data = raw[index]
        raw[index] = data[: edit.start - base] + edit.text.encode("utf-8") + data[edit.end - base :]
    return b"".join(raw).decode("utf-8")
