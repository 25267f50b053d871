"""Code generation: compiling a replacement as if it had been written in the target's file.

A replacement written at the top level of a patch file differs from the function it
replaces in three ways that matter to CPython:

* *free variables* — a method using zero-argument ``super()`` has a ``__class__`` cell; a
  nested function closes over its parent's locals. ``func.__code__ = new`` is refused
  unless the new code has exactly the target's free variables, and the live cells must be
  kept (the ``__class__`` cell must stay bound to the live class);
* *private-name mangling* — ``self.__x`` inside ``class Cart`` means ``self._Cart__x``;
* *future flags* — ``from __future__ import annotations`` in the target module.

So a replacement is recompiled from its source inside a synthetic context that
reproduces those three things — an enclosing function defining the target's free variable
names and, for methods, a class of the target's class name — and the code object of the
function is taken from the compiled constants (nothing is executed). When the new body no
longer uses a free variable the old one had, a dead ``if 0: (name,)`` keeps the name free,
so the cell layout still matches.

A replacement that needs none of that (a def at the top level of the patch file, no free
variables on either side, the same future flags and imports, and for a method nothing a
class changes) compiles in the context to its own code, so :func:`compiled_already` hands
that code over without compiling.

The same context compiles ``expect=`` source for fingerprint checks.
"""

from __future__ import annotations
import __future__

import ast
import copy
import linecache
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from types import CodeType, FunctionType, ModuleType
from typing import Any, TypedDict

from livepatch import toplevel
from livepatch.errors import PatchError, UnsafeChange

_CONTEXT_NAME = "__livepatch_context__"
_FUTURE_MASK = 0
for _feature in __future__.all_feature_names:
    _FUTURE_MASK |= getattr(__future__, _feature).compiler_flag

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True)
class Context:
    """What a function's code depends on besides its own source."""

    qualname: str  # the target's qualified name; the new code gets it too
    freevars: tuple[str, ...]  # the target's co_freevars
    class_name: str | None  # innermost enclosing class, for private-name mangling
    flags: int  # __future__ flags of the target's module
    #: names the target module binds by import at top level: CPython compiles
    #: ``name.attr(...)`` differently (no LOAD_METHOD) when `name` came from an import
    imports: tuple[str, ...] = ()

    @classmethod
    def of(cls, code: CodeType, qualname: str, module: ModuleType | None = None) -> Context:
        return cls(
            qualname=qualname,
            freevars=code.co_freevars,
            class_name=enclosing_class(qualname),
            flags=code.co_flags & _FUTURE_MASK,
            imports=module_imports(module) if module is not None else (),
        )


#: file name → (the lines linecache gave, or a patch captured; the hash of their text;
#: its imports). Every function of a module or a patch asks: while the same list is
#: asked about nothing is joined, hashed or parsed again, and a list read again with the
#: same text is not parsed again. Holding the list keeps its identity from being reused.
_imports: dict[str, tuple[Sequence[str], int, tuple[str, ...]]] = {}


def module_future_flags(module: ModuleType) -> int:
    """The ``from __future__`` compiler flags of `module`: from its source, else from
    any function defined in it."""
    lines = toplevel.source_lines(module)
    if lines:
        flags = toplevel.future_flags("".join(lines))
        if flags is not None:
            return flags
    for value in vars(module).values():
        code = getattr(value, "__code__", None)
        if isinstance(code, CodeType) and getattr(value, "__module__", None) == module.__name__:
            return code.co_flags & _FUTURE_MASK
    return 0


def module_imports(module: ModuleType) -> tuple[str, ...]:
    """Names bound by ``import`` statements at the top level of `module`'s source."""
    filename = getattr(module, "__file__", None)
    lines = toplevel.source_lines(module)
    if not filename or not lines:
        # no source: names bound to modules are the imports we can still see
        return tuple(sorted(k for k, v in vars(module).items() if isinstance(v, ModuleType)))
    return imports_in(filename, lines)


def imports_in(filename: str, lines: Sequence[str]) -> tuple[str, ...]:
    """Names bound by ``import`` statements at the top level of the text `lines`."""
    seen = _imports.get(filename)
    if seen is not None and seen[0] is lines:
        return seen[2]
    text = "".join(lines)
    digest = hash(text)
    if seen is not None and seen[1] == digest:
        found = seen[2]
    else:
        names = toplevel.imported_names(text)  # parsed piece by piece: see toplevel
        if names is None:
            return ()
        found = names
    _imports[filename] = (lines, digest, found)
    return found


def enclosing_class(qualname: str) -> str | None:
    """The innermost class in a qualified name: ``A.m.<locals>.f`` → ``A``."""
    parts = qualname.split(".")
    found = None
    for i, part in enumerate(parts[:-1]):
        if part != "<locals>" and parts[i + 1] != "<locals>":
            found = part
    return found


def compile_function(node: FunctionNode, ctx: Context, filename: str) -> CodeType:
    """Compile a ``def`` node in `ctx`; the result can be assigned to the target's __code__."""
    code = _compile(node, ctx, filename, pad=())
    if code.co_freevars != ctx.freevars:
        extra = sorted(set(code.co_freevars) - set(ctx.freevars))
        if extra:
            raise UnsafeChange(_free_variable_message(ctx, extra))
        missing = tuple(n for n in ctx.freevars if n not in code.co_freevars)
        code = _compile(node, ctx, filename, pad=missing)
        if code.co_freevars != ctx.freevars:
            raise UnsafeChange(
                f"{ctx.qualname}: free variables {code.co_freevars} cannot be made to match "
                f"the live function's {ctx.freevars}; use livepatch upgrade for this change"
            )
    return code


def _free_variable_message(ctx: Context, extra: list[str]) -> str:
    if extra == ["__class__"]:
        return (
            f"{ctx.qualname}: the use of super() or __class__ entails the __class__ free "
            "variable, and the live function has no __class__ cell; call "
            "super(Class, self) explicitly"
        )
    names = ", ".join(extra)
    return (
        f"{ctx.qualname}: the new code closes over {names}, which the live function does "
        f"not (its free variables are {list(ctx.freevars)}); free variables cannot be "
        "added to a live closure — keep the same free-variable names or use livepatch upgrade"
    )


def compile_plain(node: FunctionNode, ctx: Context, filename: str) -> CodeType:
    """Compile a ``def`` node in `ctx` as written (no free-variable padding): for expect=."""
    return _compile(node, ctx, filename, pad=())


def compile_expected(node: FunctionNode, ctx: Context, filename: str) -> CodeType:
    """What `node` compiles to in `ctx`, for comparing with live code (:func:`same_code
    <livepatch.fingerprint.same_code>`): :func:`compile_plain`'s code up to its qualified
    name, its line numbers (a decorator's line may come first) and the flag saying it was
    nested, none of which that comparison looks at.

    Every function of a built patch gives its old source as ``expect=``, and compiling
    each in the synthetic context was two thirds of planning such a patch. Most need none
    of the context, by the rule of :func:`compiled_already`: then the def compiled alone
    at the top level of a module is the same code, for a third of the cost.
    """
    alone = _compile_alone(node, ctx, filename)
    return alone if alone is not None else compile_plain(node, ctx, filename)


def _compile_alone(node: FunctionNode, ctx: Context, filename: str) -> CodeType | None:
    """`node` compiled as the only statement of a module, if the target's context could
    not change its code (else None: see :func:`_needs_context`)."""
    if ctx.freevars or getattr(node, "type_params", None):
        return None
    try:
        module = compile(
            ast.Module(body=[node], type_ignores=[]), filename, "exec", flags=ctx.flags,
            dont_inherit=True,
        )
    except (SyntaxError, TypeError, ValueError):
        return None  # compile_plain says what is wrong
    code = next(
        (c for c in module.co_consts if isinstance(c, CodeType) and c.co_name == node.name),
        None,
    )
    if code is None or _needs_context(code, ctx, source_imports=()):
        return None
    return code


def compiled_already(
    code: CodeType, ctx: Context, source_imports: tuple[str, ...], filename: str
) -> CodeType | None:
    """The replacement's own code, made ready to install, when compiling its source in
    `ctx` would give the same code; else None (then :func:`compile_function` it).

    Compiling is two thirds of planning a patch (``benchmarks/bench_transition.py``
    section 3), and most replacements need none of the context: a function at the top
    level of its file, replacing a function with no free variables, with the same
    ``__future__`` flags — and for a method, using nothing a class changes (see
    :func:`_needs_its_class`). What is left to match is how the compiler treats a name
    that the file's top level imports (``mod.attr()`` becomes a plain attribute load):
    every name the code uses must be imported in both files or in neither. Then the
    code differs from the compiled one only where CPython itself makes it differ: its
    first line is the decorator's (``@patch.function``), as for any decorated def, not
    the ``def``'s. ``tests/core/test_codegen.py`` compares the two for a range of
    functions and methods, ``tests/test_fingerprint_stdlib.py`` for every function and
    method of sixteen stdlib modules that this takes (1,148 of 1,306).
    """
    if code.co_qualname != code.co_name or _needs_context(code, ctx, source_imports):
        return None
    return _rehome(code, code.co_qualname, ctx.qualname, filename).replace(
        co_flags=code.co_flags | _CO_NESTED
    )


#: compiled in the synthetic context, the def is nested in a function; the flag says so
_CO_NESTED = 0x10


def _needs_context(code: CodeType, ctx: Context, source_imports: tuple[str, ...]) -> bool:
    """Whether compiling `code`'s source in `ctx` could give other code than compiling it
    in a file whose top level imports `source_imports`: free variables on either side,
    something a class changes, other ``__future__`` flags, or a name imported in one file
    and not the other."""
    if ctx.freevars or code.co_freevars:
        return True
    if ctx.class_name and _needs_its_class(code):
        return True
    if code.co_flags & _FUTURE_MASK != ctx.flags:
        return True
    if ctx.imports or source_imports:
        theirs, ours = set(ctx.imports), set(source_imports)
        return any((n in theirs) != (n in ours) for n in _names(code))
    return False


def _names(code: CodeType) -> set[str]:
    """Every name `code` and the code nested in it use, in whatever scope."""
    names = {*code.co_names, *code.co_varnames, *code.co_cellvars, *code.co_freevars}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names(const)
    return names


def _needs_its_class(code: CodeType) -> bool:
    """Whether compiling `code` inside a class would change it: a private name the class
    mangles (``__x``, in any name or string constant, keyword names included), or
    ``super()`` and ``__class__``, which get a ``__class__`` cell there."""
    texts = set(_names(code)) | _strings(code)
    return bool(texts & {"super", "__class__"}) or any(
        t.startswith("__") and not t.endswith("__") for t in texts
    )


def _strings(code: CodeType) -> set[str]:
    """Every string constant of `code` and the code nested in it (the keyword names of a
    call are a constant tuple)."""
    found: set[str] = set()
    todo: list[Any] = list(code.co_consts)
    while todo:
        const = todo.pop()
        if isinstance(const, str):
            found.add(const)
        elif isinstance(const, (tuple, frozenset)):
            todo.extend(const)
        elif isinstance(const, CodeType):
            todo.extend(const.co_consts)
    return found


def _compile(
    node: FunctionNode, ctx: Context, filename: str, pad: tuple[str, ...], located: bool = False
) -> CodeType:
    # A shallow copy: compile() leaves a tree as it is, so the copy shares every node of
    # the patch source and owns only what changes here (decorators, the body list).
    # Deep-copying made up most of the engine's planning time (a third of a ms a function).
    func = copy.copy(node)
    func.decorator_list = []
    func.body = list(node.body)
    line = func.lineno
    at = _Position(lineno=line, col_offset=0, end_lineno=line, end_col_offset=0)
    # every node made here gets the def's line as it is made (tracebacks stay on the patch
    # file's lines): walking the tree afterwards to fill them in cost a fifth of planning
    if pad:
        # keep otherwise-unused free variables free: the symbol table sees this dead
        # reference even though the compiler emits no code for it
        names: list[ast.expr] = [ast.Name(n, ast.Load(), **at) for n in pad]
        keep = ast.If(
            test=ast.Constant(0, **at),
            body=[ast.Expr(ast.Tuple(names, ast.Load(), **at), **at)],
            orelse=[],
            **at,
        )
        index = 1 if _has_docstring(func) else 0
        func.body.insert(index, keep)
    inner: ast.stmt = func
    if ctx.class_name:
        inner = ast.ClassDef(
            name=ctx.class_name,
            bases=[],
            keywords=[],
            body=[func],
            decorator_list=[],
            **_type_params(),
            **at,
        )
    cells = [n for n in ctx.freevars if not (ctx.class_name and n == "__class__")]
    body: list[ast.stmt] = []
    # The class (or def) statement binds its name in the synthetic function; without this
    # a method naming its own class (``super(Cart, self)``) or a function calling itself
    # would see a closure variable instead of the module global it sees in the target.
    own = ctx.class_name or func.name
    if own not in ctx.freevars:
        body.append(ast.Global(names=[own], **at))
    body += [
        ast.Assign(targets=[ast.Name(n, ast.Store(), **at)], value=ast.Constant(None, **at),
                   **at)
        for n in cells
    ]
    body.append(inner)
    outer = ast.FunctionDef(
        name=_CONTEXT_NAME,
        args=ast.arguments(
            posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None,
            defaults=[],
        ),
        body=body,
        decorator_list=[],
        returns=None,
        **_type_params(),
        **at,
    )
    top: list[ast.stmt] = []
    if ctx.imports:
        # dead imports: the symbol table marks the names as imported, no code runs
        top.append(
            ast.If(
                test=ast.Constant(0, **at),
                body=[ast.Import(names=[ast.alias(name=n, **at)], **at) for n in ctx.imports],
                orelse=[],
                **at,
            )
        )
    module = ast.Module(body=[*top, outer], type_ignores=[])
    try:
        try:
            compiled = compile(module, filename, "exec", flags=ctx.flags, dont_inherit=True)
        except (TypeError, ValueError):
            if located:
                raise
            # a node of the patch's own tree has no line (a tree built by a program, not
            # parsed): give it the def's, on a copy that this compile owns
            return _compile(_located(node, line), ctx, filename, pad, located=True)
    except SyntaxError as exc:
        raise PatchError(
            f"{ctx.qualname}: the replacement does not compile in the target's context "
            f"({exc.msg}, {filename}:{exc.lineno}); fix the patch source"
        ) from None
    found = _find_code(compiled, func.name, _CONTEXT_NAME)
    if found is None:  # pragma: no cover - the def is always compiled
        raise PatchError(f"{ctx.qualname}: internal error: compiled code not found")
    return _requalify(found, found.co_qualname, ctx.qualname)


class _Position(TypedDict):
    """Where a node is, as ``ast`` constructors take it."""

    lineno: int
    col_offset: int
    end_lineno: int
    end_col_offset: int


def _type_params() -> dict[str, Any]:
    # 3.12 added type_params to FunctionDef/ClassDef; 3.13 warns when it is missing
    return {"type_params": []} if "type_params" in ast.FunctionDef._fields else {}


def _has_docstring(func: FunctionNode) -> bool:
    first = func.body[0] if func.body else None
    return (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )


def _locate(tree: ast.AST, line: int) -> None:
    """Give every node of `tree` that has no line the def's (a tree built by a program)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if "lineno" in node._attributes:
            for name, value in (("lineno", line), ("end_lineno", line), ("col_offset", 0),
                                ("end_col_offset", 0)):
                if getattr(node, name, None) is None:
                    setattr(node, name, value)
        todo.extend(ast.iter_child_nodes(node))


def _located(node: FunctionNode, line: int) -> FunctionNode:
    """A copy of `node` whose every node has a line (missing ones get `line`)."""
    copied = copy.deepcopy(node)
    _locate(copied, line)
    return copied


def _find_code(code: CodeType, name: str, context: str) -> CodeType | None:
    """The code of the def called `name` inside the synthetic `context` function."""
    outer = next(
        (c for c in code.co_consts if isinstance(c, CodeType) and c.co_name == context), None
    )
    queue = [outer] if outer is not None else []
    while queue:  # breadth first: the def sits at depth one (or two, inside the class)
        current = queue.pop(0)
        for const in current.co_consts:
            if isinstance(const, CodeType):
                # CO_OPTIMIZED: a function, not a class body of the same name
                if const.co_name == name and const.co_flags & 0x1:
                    return const
                queue.append(const)
    return None


def _requalify(code: CodeType, old: str, new: str) -> CodeType:
    """Rename ``old``-prefixed qualnames (this code and nested ones) to ``new``."""
    return _rehome(code, old, new, None)


def _rehome(code: CodeType, old: str, new: str, filename: str | None) -> CodeType:
    """:func:`_requalify`, and give this code and nested ones `filename` if one is given."""
    consts = tuple(
        _rehome(c, old, new, filename) if isinstance(c, CodeType) else c
        for c in code.co_consts
    )
    qualname = code.co_qualname
    if qualname == old or qualname.startswith(old + "."):
        qualname = new + qualname[len(old) :]
    return code.replace(
        co_qualname=qualname, co_consts=consts, co_filename=filename or code.co_filename
    )


# -- finding source -------------------------------------------------------------------

_parsed: dict[tuple[str, int], ast.Module] = {}


def remember_parsed(filename: str, text: str, tree: ast.Module) -> None:
    """Let :func:`source_node` find the defs of `text` (read from `filename`) in `tree`
    rather than parse it again: the patch loader has just parsed it, piece by piece."""
    _parsed[(filename, hash(text))] = tree


def source_node(func: FunctionType) -> FunctionNode | None:
    """The ``def`` node that created `func`, from its file (or linecache entry)."""
    code = func.__code__
    lines = linecache.getlines(code.co_filename, func.__globals__)
    if not lines:
        return None
    text = "".join(lines)
    key = (code.co_filename, hash(text))
    tree = _parsed.get(key)
    if tree is None:
        try:
            tree = ast.parse(text, code.co_filename)
        except SyntaxError:
            return None
        _parsed[key] = tree
    for node in ast.walk(tree):
        if isinstance(node, FunctionNode) and node.name == code.co_name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if first == code.co_firstlineno:
                return node
    return None


def parse_def(source: str, what: str) -> FunctionNode:
    """Parse source text holding exactly one (possibly decorated, indented) ``def``."""
    try:
        tree = ast.parse(_def_text(source), f"<{what}>")
    except SyntaxError as exc:
        raise PatchError(
            f"{what}: expected source does not parse ({exc.msg}); fix expect="
        ) from None
    defs = [n for n in tree.body if isinstance(n, FunctionNode)]
    if len(defs) != 1 or len(tree.body) != 1:
        raise PatchError(f"{what}: expect= must hold the source of exactly one def")
    return defs[0]


def _def_text(source: str) -> str:
    return textwrap.dedent(source).strip("\n") + "\n"
