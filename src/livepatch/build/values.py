"""Values: is a changed module-level value immutable data, mutable data, or code?

kpatch's rule for changed data is that it becomes a *new symbol*, referenced only by new
code, so code that still runs the old version keeps seeing the old value. That is only
sound for values nobody mutates: str, bytes, numbers, tuples, frozensets, compiled
regular expressions of literal patterns. Those are recognised here from the syntax alone —
nothing from the target is imported or run at build time. Lists, dicts and sets, and any
value built by calling code, are mutable or unknown: changing them in a live process
needs a reviewed callback.
"""

from __future__ import annotations

import ast
import enum
from collections.abc import Callable

_IMMUTABLE_BUILDERS = {"frozenset", "tuple", "bytes", "str", "int", "float", "complex", "bool"}
_MUTABLE_BUILDERS = {"list", "dict", "set", "bytearray", "defaultdict", "OrderedDict", "deque"}
_RE_CALLS = {"compile"}


class ValueKind(enum.Enum):
    IMMUTABLE = "immutable constant"
    MUTABLE = "mutable value"
    CODE = "lambda"
    UNKNOWN = "value computed by a call"


def classify(
    expr: ast.expr,
    resolve: Callable[[str], ValueKind | None],
    re_names: set[str],
    refs: frozenset[str] = frozenset(),
) -> ValueKind:
    """The kind of value `expr` builds.

    `resolve` gives the kind of another module-level name (None: not a known constant);
    `re_names` are the names the module binds to the ``re`` module; `refs` are names bound
    to functions, classes and imports: a reference to one of those (``nodes.Body``) is
    not data of ours, and a tuple of references is as immutable as a tuple of numbers.
    """
    return _classify(expr, resolve, re_names, refs)


def _classify(
    expr: ast.expr,
    resolve: Callable[[str], ValueKind | None],
    re_names: set[str],
    refs: frozenset[str],
) -> ValueKind:
    def sub(e: ast.expr) -> ValueKind:
        return _classify(e, resolve, re_names, refs)

    if isinstance(expr, ast.Constant):
        return ValueKind.IMMUTABLE
    if isinstance(expr, ast.Lambda):
        return ValueKind.CODE
    if isinstance(expr, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        return ValueKind.MUTABLE
    if isinstance(expr, ast.Tuple):
        return _all(sub(e) for e in expr.elts)
    if isinstance(expr, ast.UnaryOp):
        return _all([sub(expr.operand)])
    if isinstance(expr, ast.BinOp):
        return _all([sub(expr.left), sub(expr.right)])
    if isinstance(expr, ast.BoolOp):
        return _all(sub(e) for e in expr.values)
    if isinstance(expr, ast.JoinedStr):
        parts = [v.value for v in expr.values if isinstance(v, ast.FormattedValue)]
        return _all(sub(e) for e in parts)
    if isinstance(expr, ast.Name):
        if expr.id in refs:
            return ValueKind.IMMUTABLE
        known = resolve(expr.id)
        return known if known is not None else ValueKind.UNKNOWN
    if isinstance(expr, ast.Attribute) and _is_re_flag(expr, re_names):
        return ValueKind.IMMUTABLE
    if isinstance(expr, ast.Attribute) and _root(expr) in refs:
        return ValueKind.IMMUTABLE
    if isinstance(expr, ast.Call):
        return _classify_call(expr, sub, re_names)
    return ValueKind.UNKNOWN


def _all(kinds: object) -> ValueKind:
    seen = list(kinds)  # type: ignore[call-overload]
    if all(k is ValueKind.IMMUTABLE for k in seen):
        return ValueKind.IMMUTABLE
    if any(k is ValueKind.CODE for k in seen):
        return ValueKind.CODE
    return ValueKind.UNKNOWN


def _root(expr: ast.Attribute) -> str | None:
    node: ast.expr = expr
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_re_flag(expr: ast.Attribute, re_names: set[str]) -> bool:
    return (
        isinstance(expr.value, ast.Name)
        and expr.value.id in re_names
        and expr.attr.isupper()
    )


def _classify_call(
    call: ast.Call, sub: Callable[[ast.expr], ValueKind], re_names: set[str]
) -> ValueKind:
    func = call.func
    if isinstance(func, ast.Name) and func.id in _MUTABLE_BUILDERS:
        return ValueKind.MUTABLE
    if isinstance(func, ast.Name) and func.id in _IMMUTABLE_BUILDERS:
        # frozenset(["a", "b"]): a literal container turned into an immutable value
        args = list(call.args)
        if call.keywords or len(args) > 1:
            return ValueKind.UNKNOWN
        if not args:
            return ValueKind.IMMUTABLE
        arg = args[0]
        if isinstance(arg, (ast.List, ast.Set, ast.Tuple)):
            return _all(sub(e) for e in arg.elts)
        return sub(arg)
    if (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id in re_names
        and func.attr in _RE_CALLS
    ):
        flags = [k.value for k in call.keywords if k.arg == "flags"]
        if not call.args or len(call.args) + len(call.keywords) > 2 or len(flags) != len(
            call.keywords
        ):
            return ValueKind.UNKNOWN
        if flags and sub(flags[0]) is not ValueKind.IMMUTABLE:
            return ValueKind.UNKNOWN
        pattern = call.args[0]
        if not (isinstance(pattern, ast.Constant) and isinstance(pattern.value, (str, bytes))):
            if sub(pattern) is not ValueKind.IMMUTABLE:
                return ValueKind.UNKNOWN
        if len(call.args) == 2 and sub(call.args[1]) is not ValueKind.IMMUTABLE:
            return ValueKind.UNKNOWN
        return ValueKind.IMMUTABLE
    return ValueKind.UNKNOWN
