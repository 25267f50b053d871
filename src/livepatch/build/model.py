"""Module models: one version of a module, cut into the pieces a live patch can touch.

kpatch-build compares object files section by section — one section per function, per
data object — so a change is attributed to exactly the symbol it touched. A Python module
is cut the same way here:

* **functions**: every ``def`` reachable through classes only (``f``, ``Cart.add``,
  ``Outer.Inner.m``), plus the ``def``\\ s nested in them (``f.<locals>.g``), which the engine
  can patch too; property setters and deleters are ``Cart.x.fset`` / ``.fdel``;
* **classes**: bases, keywords, decorators, class-level data and statements;
* **data**: ``NAME = value`` at module or class level;
* **imports**: one binding per imported name;
* **statements**: everything else that runs at import time (calls, ``if``/``try`` blocks,
  ``for`` loops) — the initialisers a live patch cannot re-run.

Each function also carries the code object the compiler made for it, so kinds
(generator, coroutine) and free variables come from CPython itself rather than from a
re-implementation of its rules.
"""

from __future__ import annotations

import ast
import enum
from dataclasses import dataclass, field
from types import CodeType

from livepatch.build.refusal import Hint, Reason, Refusal
from livepatch.build.sources import SourceFile

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef
LOCALS = "<locals>"


class Guard(enum.Enum):
    """Module-level blocks whose contents never run in a live process's import."""

    TYPE_CHECKING = "if TYPE_CHECKING"
    MAIN = 'if __name__ == "__main__"'


@dataclass
class FunctionUnit:
    """A ``def`` the engine can target by name."""

    qualname: str  # code qualname: "Cart.add", "f.<locals>.g"
    target: str  # target name: qualname, or "Cart.x.fset" for property accessors
    node: FunctionNode
    code: CodeType | None
    classes: tuple[str, ...]  # enclosing class qualnames, outermost first
    parent: str | None  # target of the enclosing function, for nested defs
    duplicate: bool = False  # the same target is defined more than once

    @property
    def line(self) -> int:
        return self.node.lineno

    @property
    def nested(self) -> bool:
        return self.parent is not None


@dataclass
class DataUnit:
    """``NAME = value`` (or ``NAME: T = value``) at module or class level."""

    name: str
    owner: str  # "" for the module, else the class qualname
    stmt: ast.Assign | ast.AnnAssign
    value: ast.expr

    @property
    def line(self) -> int:
        return self.stmt.lineno


@dataclass
class ImportBinding:
    """One name bound by an import statement, with what it refers to."""

    name: str
    stmt: ast.Import | ast.ImportFrom
    module: str  # absolute module imported
    attr: str | None  # ``from module import attr``; None for ``import module``
    binds_top: bool  # ``import a.b`` binds ``a``

    @property
    def line(self) -> int:
        return self.stmt.lineno

    def key(self) -> tuple[str, str | None, bool]:
        return (self.module, self.attr, self.binds_top)


@dataclass
class ClassUnit:
    qualname: str
    node: ast.ClassDef
    data: dict[str, DataUnit] = field(default_factory=dict)
    fields: list[ast.AnnAssign] = field(default_factory=list)  # annotations without value
    statements: list[ast.stmt] = field(default_factory=list)
    duplicate: bool = False

    @property
    def line(self) -> int:
        return self.node.lineno


@dataclass
class ModuleModel:
    """One version of one module, cut into units."""

    source: SourceFile
    tree: ast.Module
    lines: list[str]
    functions: dict[str, FunctionUnit] = field(default_factory=dict)
    classes: dict[str, ClassUnit] = field(default_factory=dict)
    data: dict[str, DataUnit] = field(default_factory=dict)
    imports: dict[str, ImportBinding] = field(default_factory=dict)
    statements: list[ast.stmt] = field(default_factory=list)
    guarded: dict[Guard, list[ast.stmt]] = field(default_factory=dict)
    docstring: str | None = None
    star_import: bool = False
    bindings: dict[str, str] = field(default_factory=dict)  # module name → kind
    future_flags: frozenset[str] = frozenset()
    @property
    def import_names(self) -> tuple[str, ...]:
        """Names bound by an import anywhere at module level (inside ``if``/``try`` too):
        CPython compiles ``name.attr(...)`` differently for those."""
        names: set[str] = set()
        stack: list[ast.AST] = list(self.tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update(
                    (a.asname or a.name.partition(".")[0]) for a in node.names if a.name != "*"
                )
                continue
            stack.extend(
                c for c in ast.iter_child_nodes(node)
                if isinstance(c, (ast.stmt, ast.ExceptHandler))
            )
        return tuple(sorted(names))

    @property
    def name(self) -> str:
        return self.source.module

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def package(self) -> str:
        if self.path.endswith("__init__.py"):
            return self.name
        return self.name.rpartition(".")[0]


class ParseFailed(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message())
        self.refusal = refusal


def parse_module(source: SourceFile) -> ModuleModel:
    """Cut `source` into units; raise ParseFailed if it does not compile."""
    try:
        tree = ast.parse(source.text, source.path)
        top = compile(tree, source.path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None) or 1
        msg = getattr(exc, "msg", None) or str(exc)
        raise ParseFailed(
            Refusal(source.path, line, source.module, Reason.SYNTAX, msg, Hint.FIX_SOURCE)
        ) from None
    model = ModuleModel(
        source=source,
        tree=tree,
        lines=source.text.splitlines(keepends=True),
    )
    codes = _codes_by_position(top)
    _Cutter(model, codes).module(tree)
    return model


def _codes_by_position(top: CodeType) -> dict[tuple[str, int], CodeType]:
    found: dict[tuple[str, int], CodeType] = {}
    stack = [top]
    while stack:
        code = stack.pop()
        for const in code.co_consts:
            if isinstance(const, CodeType):
                found[(const.co_qualname, const.co_firstlineno)] = const
                stack.append(const)
    return found


def protected_lines(node: ast.AST) -> set[int]:
    """Lines inside `node` that begin within a string literal: there, leading white space is
    part of the string's value. (A line inside an implicitly concatenated string may be
    included too; keeping its indentation is harmless.)"""
    protected: set[int] = set()
    for child in ast.walk(node):
        if isinstance(child, (ast.Constant, ast.JoinedStr)):
            end = child.end_lineno or child.lineno
            if end > child.lineno and (
                isinstance(child, ast.JoinedStr) or isinstance(child.value, (str, bytes))
            ):
                protected.update(range(child.lineno + 1, end + 1))
    return protected


def decorator_name(node: ast.expr) -> str:
    """``functools.lru_cache(maxsize=2)`` → ``functools.lru_cache``."""
    if isinstance(node, ast.Call):
        node = node.func
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _guard_of(stmt: ast.stmt) -> Guard | None:
    if not isinstance(stmt, ast.If):
        return None
    test = stmt.test
    if decorator_name(test).split(".")[-1] == "TYPE_CHECKING" and not stmt.orelse:
        return Guard.TYPE_CHECKING
    if (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    ):
        return Guard.MAIN
    return None


def is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


class _Cutter:
    def __init__(self, model: ModuleModel, codes: dict[tuple[str, int], CodeType]) -> None:
        self.model = model
        self.codes = codes

    def _code(self, qualname: str, node: FunctionNode) -> CodeType | None:
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        return self.codes.get((qualname, first))

    def _bind(self, name: str, kind: str) -> None:
        bindings = self.model.bindings
        bindings[name] = kind if name not in bindings else "several"

    def module(self, tree: ast.Module) -> None:
        model = self.model
        body = tree.body
        if body and is_docstring(body[0]):
            model.docstring = ast.literal_eval(body[0].value)  # type: ignore[attr-defined]
            body = body[1:]
        for stmt in body:
            if isinstance(stmt, FunctionNode):
                if not _is_overload(stmt):  # typing.overload stubs bind nothing lasting
                    self._bind(stmt.name, "function")
                self.function(stmt, stmt.name, stmt.name, (), None)
            elif isinstance(stmt, ast.ClassDef):
                self._bind(stmt.name, "class")
                self.klass(stmt, stmt.name, ())
            elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
                self.imports(stmt)
            elif (data := _data_of(stmt, "")) is not None:
                for unit in data:
                    self._bind(unit.name, "data")
                    if unit.name in model.data:
                        model.statements.append(stmt)  # assigned twice: not a simple value
                    model.data[unit.name] = unit
            elif (guard := _guard_of(stmt)) is not None:
                model.guarded.setdefault(guard, []).append(stmt)
            elif _is_bare_constant(stmt):
                continue  # an attribute docstring: no effect
            else:
                for name in _stored_names(stmt):
                    self._bind(name, "statement")
                model.statements.append(stmt)
        for name, kind in model.bindings.items():
            if kind == "several":
                model.data.pop(name, None)
                model.imports.pop(name, None)
                for func in model.functions.values():
                    if func.target == name:
                        func.duplicate = True
                if name in model.classes:
                    model.classes[name].duplicate = True

    def imports(self, stmt: ast.Import | ast.ImportFrom) -> None:
        model = self.model
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                top = alias.name.partition(".")[0]
                name = alias.asname or top
                binds_top = alias.asname is None and "." in alias.name
                self._bind(name, "import")
                model.imports[name] = ImportBinding(name, stmt, alias.name, None, binds_top)
            return
        base = stmt.module or ""
        if stmt.level:
            package = model.package.split(".") if model.package else []
            if stmt.level - 1 > len(package):
                package = []
            else:
                package = package[: len(package) - (stmt.level - 1)]
            base = ".".join([*package, *([stmt.module] if stmt.module else [])])
        if base == "__future__":
            model.future_flags = model.future_flags | {a.name for a in stmt.names}
            return
        for alias in stmt.names:
            if alias.name == "*":
                model.star_import = True
                model.statements.append(stmt)
                continue
            name = alias.asname or alias.name
            self._bind(name, "import")
            model.imports[name] = ImportBinding(name, stmt, base, alias.name, False)

    def klass(self, node: ast.ClassDef, qualname: str, classes: tuple[str, ...]) -> None:
        model = self.model
        unit = ClassUnit(qualname, node)
        if qualname in model.classes:
            model.classes[qualname].duplicate = True
            unit.duplicate = True
        model.classes[qualname] = unit
        inner = (*classes, qualname)
        body = node.body[1:] if node.body and is_docstring(node.body[0]) else node.body
        seen: dict[str, int] = {}
        for stmt in body:
            if isinstance(stmt, FunctionNode):
                if _is_overload(stmt):
                    continue
                role = _accessor_role(stmt)
                member = mangle(qualname, stmt.name)
                target = f"{qualname}.{member}" + (f".{role}" if role else "")
                seen[target] = seen.get(target, 0) + 1
                self.function(stmt, f"{qualname}.{stmt.name}", target, inner, None)
            elif isinstance(stmt, ast.ClassDef):
                self.klass(stmt, f"{qualname}.{stmt.name}", inner)
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is None:
                unit.fields.append(stmt)
            elif (data := _data_of(stmt, qualname)) is not None:
                for item in data:
                    if item.name in unit.data:
                        unit.statements.append(stmt)
                    unit.data[item.name] = item
            elif not isinstance(stmt, ast.Pass) and not _is_bare_constant(stmt):
                unit.statements.append(stmt)
        for target, count in seen.items():
            if count > 1 and target in model.functions:
                model.functions[target].duplicate = True

    def function(
        self,
        node: FunctionNode,
        qualname: str,
        target: str,
        classes: tuple[str, ...],
        parent: str | None,
    ) -> None:
        model = self.model
        if _is_overload(node):
            return  # typing.overload stubs are replaced by the implementation that follows
        unit = FunctionUnit(qualname, target, node, self._code(qualname, node), classes, parent)
        if target in model.functions:
            unit.duplicate = True
        model.functions[target] = unit
        for child in _direct_defs(node):
            child_qual = f"{qualname}.{LOCALS}.{child.name}"
            self.function(child, child_qual, child_qual, classes, target)


def mangle(class_qualname: str, name: str) -> str:
    """The key a class body stores `name` under: ``__x`` in ``class Cart`` is ``_Cart__x``."""
    if not name.startswith("__") or name.endswith("__"):
        return name
    owner = class_qualname.rpartition(".")[2].lstrip("_")
    return f"_{owner}{name}" if owner else name


def _is_bare_constant(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def _is_overload(node: FunctionNode) -> bool:
    return any(decorator_name(d).split(".")[-1] == "overload" for d in node.decorator_list)


def _accessor_role(node: FunctionNode) -> str | None:
    for dec in node.decorator_list:
        if isinstance(dec, ast.Attribute) and dec.attr in ("setter", "deleter"):
            return "fset" if dec.attr == "setter" else "fdel"
    return None


def _direct_defs(node: FunctionNode) -> list[FunctionNode]:
    """The defs nested directly in `node`'s body (not inside nested classes or defs)."""
    found: list[FunctionNode] = []
    stack: list[ast.AST] = list(node.body)
    while stack:
        child = stack.pop(0)
        if isinstance(child, FunctionNode):
            found.append(child)
        elif isinstance(child, (ast.ClassDef, ast.Lambda)):
            continue
        else:
            stack.extend(c for c in ast.iter_child_nodes(child) if isinstance(c, ast.stmt))
    return found


def _data_of(stmt: ast.stmt, owner: str) -> list[DataUnit] | None:
    if isinstance(stmt, ast.Assign):
        if all(isinstance(t, ast.Name) for t in stmt.targets):
            return [DataUnit(t.id, owner, stmt, stmt.value) for t in stmt.targets]  # type: ignore[attr-defined]
        return None
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        if isinstance(stmt.target, ast.Name) and stmt.simple:
            return [DataUnit(stmt.target.id, owner, stmt, stmt.value)]
    return None


def _stored_names(stmt: ast.stmt) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).partition(".")[0])
    return names
