"""Patches: a named set of function replacements, new helpers, callbacks and states.

A :class:`Patch` is what a patch file builds (kernel: ``struct klp_patch``). It only
*describes* a change; nothing happens to the process until ``livepatch.apply``.

A patch file is ordinary Python, executed in a fresh namespace, that creates exactly one
``Patch``::

    import livepatch
    patch = livepatch.Patch("fix-1234", description="reject negative quantities")

    @patch.function("shop.cart:Cart.add", expect='''def add(self, item, qty=1): ...''')
    def add(self, item, qty=1):
        if qty < 0:
            raise ValueError("qty must be >= 0")
        self.items[item] = self.items.get(item, 0) + qty

Replacements run with the *target* module's globals, as if the target file had been
edited; names the new code needs that the target lacks come in through ``patch.new``.
"""

from __future__ import annotations

import ast
import hashlib
import linecache
import os
import sys
import tokenize
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from livepatch import codegen, pace, toplevel
from livepatch.codegen import FunctionNode, source_node
from livepatch.errors import PatchFileError

F = TypeVar("F", bound=Callable[..., Any])
Callback = Callable[[], Any]
_NO_VALUE: Any = object()


@dataclass(frozen=True)
class Source:
    """A def's source, captured when the patch was loaded.

    Captured then, not looked up at apply time: a later load of another text under the
    same file name (an edited patch file, or two patches sent to the agent) replaces the
    global line cache, and must not change what an already loaded patch installs.
    """

    node: FunctionNode | None
    lines: tuple[str, ...]
    filename: str

    @classmethod
    def of(cls, fn: types.FunctionType) -> Source:
        filename = fn.__code__.co_filename
        lines = linecache.getlines(filename, fn.__globals__)
        # the defs of one file share one copy of its text: planning asks about the text
        # once per def, and an object it has seen before answers at once
        captured = _captured.get(filename)
        if captured is None or captured[0] is not lines:
            captured = _captured[filename] = (lines, tuple(lines))
        return cls(source_node(fn), captured[1], filename)


#: file name → the line list linecache last gave for it, and the copy Sources share
_captured: dict[str, tuple[list[str], tuple[str, ...]]] = {}


@dataclass
class FunctionSpec:
    """One replacement: the target's name, the replacement function, what it expects."""

    target: str
    replacement: types.FunctionType
    expect: str | None
    source: Source | None = None

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = Source.of(self.replacement)


@dataclass
class NewSpec:
    """A name the patch adds to a module or class (a helper function or a value)."""

    target: str
    value: Any
    source: Source | None = None
    #: a function written in the patch (also inside staticmethod/classmethod/property)
    #: is rebuilt to run with the target's globals; anything else — a function imported
    #: from a library included — is installed as it is
    rebuild: bool = False

    def __post_init__(self) -> None:
        if not self.rebuild:
            return
        fn = self.value
        if isinstance(fn, (staticmethod, classmethod)):
            fn = fn.__func__
        elif isinstance(fn, property):
            fn = fn.fget
        if self.source is None and isinstance(fn, types.FunctionType):
            self.source = Source.of(fn)


@dataclass
class Callbacks:
    pre_patch: list[Callback] = field(default_factory=list)
    post_patch: list[Callback] = field(default_factory=list)
    pre_unpatch: list[Callback] = field(default_factory=list)
    post_unpatch: list[Callback] = field(default_factory=list)


class Patch:
    """A named set of function replacements plus callbacks and states."""

    def __init__(self, name: str, description: str = "", *, cumulative: bool = False) -> None:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise PatchFileError(f"patch name {name!r} must be a non-empty word, e.g. 'fix-1234'")
        self.name = name
        self.description = description
        self.cumulative = cumulative
        self.functions: list[FunctionSpec] = []
        self.news: list[NewSpec] = []
        self.states: dict[str, int] = {}
        self.callbacks = Callbacks()
        #: the globals of the code that created the patch (a patch file's namespace):
        #: functions defined there are rewritten to run in their target, others are not
        self._home: dict[str, Any] = sys._getframe(1).f_globals
        #: set by load()/loads(): where the patch came from and the sha256 of its text
        self.source_path: str | None = None
        self.sha256: str | None = None

    def function(self, target: str, expect: str | None = None) -> Callable[[F], F]:
        """Decorator: the decorated ``def`` replaces the body of `target`."""

        def register(fn: F) -> F:
            if not isinstance(fn, types.FunctionType):
                raise PatchFileError(
                    f"patch.function({target!r}) must decorate a plain def, "
                    f"not {type(fn).__name__}"
                )
            if any(spec.target == target for spec in self.functions):
                raise PatchFileError(f"{self.name}: {target} is replaced twice in one patch")
            self.functions.append(FunctionSpec(target, fn, expect))
            return fn

        return register

    def new(self, target: str, value: Any = _NO_VALUE) -> Any:
        """Add `target` (``module:name`` or ``module:Class.name``) when the patch applies.

        As a decorator it adds the decorated function, rebuilt to run with the target
        module's globals as if written there; with `value` it adds that value — rebuilt
        the same way if it is a function (or staticmethod/classmethod/property of one)
        written in the patch, as it is otherwise (an imported function keeps its own
        module). Reverting removes the name again.
        """
        if value is not _NO_VALUE:
            self._add_new(target, value, rebuild=_written_in(value, self._home))
            return value

        def register(fn: F) -> F:
            self._add_new(target, fn, rebuild=True)
            return fn

        return register

    def _add_new(self, target: str, value: Any, rebuild: bool) -> None:
        if any(spec.target == target for spec in self.news):
            raise PatchFileError(f"{self.name}: {target} is added twice in one patch")
        self.news.append(NewSpec(target, value, rebuild=rebuild))

    def state(self, id: str, version: int = 1) -> None:
        """Declare a system state this patch introduces or carries on (kernel klp_state)."""
        if not isinstance(version, int) or version < 0:
            raise PatchFileError(f"{self.name}: state {id!r} version must be an int >= 0")
        self.states[id] = version

    def pre_patch(self, fn: F) -> F:
        """Run before any change; raising vetoes the patch (nothing changes)."""
        self.callbacks.pre_patch.append(fn)
        return fn

    def post_patch(self, fn: F) -> F:
        """Run after the transition completed: every task runs the new code."""
        self.callbacks.post_patch.append(fn)
        return fn

    def pre_unpatch(self, fn: F) -> F:
        """Run before a revert starts; raising vetoes the revert."""
        self.callbacks.pre_unpatch.append(fn)
        return fn

    def post_unpatch(self, fn: F) -> F:
        """Run after a revert completed, or after a patch transition was reversed."""
        self.callbacks.post_unpatch.append(fn)
        return fn

    @property
    def targets(self) -> list[str]:
        return [spec.target for spec in self.functions]

    def __repr__(self) -> str:
        kind = " cumulative" if self.cumulative else ""
        return f"<Patch {self.name}{kind}: {len(self.functions)} function(s)>"


def _written_in(value: Any, home: dict[str, Any]) -> bool:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    return isinstance(value, types.FunctionType) and value.__globals__ is home


def load(path: str | os.PathLike[str]) -> Patch:
    """Load a patch file: run it in a fresh namespace and return its one Patch."""
    file = Path(path)
    try:
        with file.open("rb") as stream:
            # decode as Python would: a UTF-8 byte-order mark, or a PEP 263 coding cookie
            encoding, _ = tokenize.detect_encoding(stream.readline)
            stream.seek(0)
            text = stream.read().decode(encoding)
        text = text.removeprefix("\ufeff")
    except FileNotFoundError:
        raise PatchFileError(f"patch file {str(file)!r} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, SyntaxError, LookupError) as exc:
        raise PatchFileError(f"cannot read patch file {str(file)!r}: {exc}") from None
    return loads(text, filename=str(file.resolve()))


def loads(text: str, filename: str = "<patch>") -> Patch:
    """Load a patch from its source text; `filename` is where tracebacks will point."""
    text = text.removeprefix("\ufeff")  # a leading byte-order mark means nothing to Python
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    # Register the text so tracebacks and source lookups see exactly what was loaded,
    # even if the file changes on disk later or never existed (patches sent to the agent).
    lines = text.splitlines(keepends=True)
    linecache.cache[filename] = (len(text), None, lines, filename)
    try:
        codes = _compile(text, filename)
    except (SyntaxError, ValueError) as exc:  # ValueError: a null byte, since 3.12
        where = f":{exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else ""
        message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        # the same file may load in a newer Python (PEP 695 generics, 3.12's f-strings):
        # say which one judged it
        python = ".".join(map(str, sys.version_info[:3]))
        raise PatchFileError(
            f"{filename}{where}: syntax error in patch file: {message} (read by Python "
            f"{python}; a patch must be written in the syntax of the Python it patches)"
        ) from None
    namespace = types.ModuleType(f"livepatch_patchfile_{sha[:12]}")
    namespace.__file__ = filename
    try:
        handing_over = pace.Yielder()
        for code in codes:
            handing_over()
            exec(code, namespace.__dict__)
    except PatchFileError as exc:
        raise PatchFileError(f"{filename}: {exc}") from None
    except BaseException as exc:  # a patch file must never take the process down
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise PatchFileError(f"{filename}: patch file tried to exit; remove that") from None
        line = _failing_line(exc, filename)
        raise PatchFileError(
            f"{filename}{line}: patch file raised {type(exc).__name__}: {exc}; fix the file"
        ) from None
    found = [v for v in vars(namespace).values() if isinstance(v, Patch)]
    found = list({id(p): p for p in found}.values())
    if not found:
        raise PatchFileError(f"{filename}: defines no livepatch.Patch; create exactly one")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise PatchFileError(f"{filename}: defines {len(found)} patches ({names}); keep one")
    patch = found[0]
    patch.source_path = filename
    patch.sha256 = sha
    return patch


def _compile(text: str, filename: str) -> list[types.CodeType]:
    """The patch file's code, a code object per top-level statement, compiled from pieces
    parsed one at a time (``toplevel.parse_in_pieces``): the agent loads a patch inside
    the target, where compiling a 100-function patch at once held the GIL for 2.5 ms,
    and parsing it again for its defs as long. All of it is compiled before any of it
    runs, as one compile would. Raises SyntaxError as ``compile(text)`` would.
    """
    trees = toplevel.parse_in_pieces(text, filename)
    codegen.remember_parsed(filename, text, ast.Module(
        body=[node for tree in trees for node in tree.body], type_ignores=[]
    ))
    flags, leading = 0, True
    first = next((node for tree in trees for node in tree.body), None)
    for tree in trees:
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                if not leading:
                    raise SyntaxError(
                        "from __future__ imports must occur at the beginning of the file",
                        (filename, node.lineno, node.col_offset + 1, None),
                    )
                flags |= toplevel.future_import_flags(node)
            elif not (node is first and _is_docstring(node)):
                leading = False
    handing_over = pace.Yielder()
    codes = []
    for tree in trees:
        handing_over()
        if tree.body and tree.body[0] is not first and _is_docstring(tree.body[0]):
            # a string opening a later piece is no docstring: keep it from becoming one
            tree.body.insert(0, ast.copy_location(ast.Pass(), tree.body[0]))
        codes.append(compile(tree, filename, "exec", flags=flags, dont_inherit=True))
    return codes


def _is_docstring(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def _failing_line(exc: BaseException, filename: str) -> str:
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f":{line}" if line else ""
