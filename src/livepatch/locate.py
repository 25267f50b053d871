"""Locating targets: ``package.module:Qualified.name`` → the live function object.

The name is the one a developer reads in the source: ``shop.cart:Cart.add``. What must be
patched is the function object whose code runs, which may sit behind a descriptor or a
decorator:

* ``staticmethod``/``classmethod`` → ``__func__``; a bound method → ``__func__``;
* ``property`` → ``fget``, or ``Class.prop.fset`` / ``.fdel`` by name;
* ``functools.cached_property`` → ``func``;
* ``functools.lru_cache`` → ``__wrapped__``, and the cache is cleared after each install;
* decorators: follow ``__wrapped__`` (``functools.wraps``) and, failing that, the
  wrapper's closure cells, until a function with the target's qualified name appears
  (the decorator itself keeps running);
* ``outer.<locals>.inner``: every closure instance made so far, found through the code
  object they share, plus ``outer``'s code constant so later instances get the new code.

Only modules already imported are searched: livepatch patches code that is loaded.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType, FunctionType, MethodType, ModuleType
from typing import Any

from livepatch import heap
from livepatch.errors import TargetNotFound, UnsafeChange

_LOCALS = "<locals>"


@dataclass
class Target:
    """A resolved patch target."""

    key: str
    module: ModuleType
    qualname: str
    #: live function objects that run this code (one, or each nested closure instance)
    funcs: list[FunctionType]
    #: the code every instance runs (for nested targets, also the code constant)
    code: CodeType
    #: stable identity for the slot registry
    ident: Any
    outers: list[FunctionType] = field(default_factory=list)
    after_install: list[Callable[[], None]] = field(default_factory=list)
    nested: bool = False
    #: for nested targets: the local names of the enclosing functions — a replacement that
    #: reads one of them as a global would be a new free variable in disguise
    enclosing_locals: frozenset[str] = frozenset()
    #: qualnames of intermediate enclosing functions (doubly nested targets)
    middle: tuple[str, ...] = ()
    #: something the user must know (e.g. cached values that stay stale)
    warning: str | None = None


def split_key(key: str) -> tuple[str, str]:
    module, sep, qualname = key.partition(":")
    if not sep or not module or not qualname or " " in key:
        raise TargetNotFound(
            f"{key!r} is not a target name: write 'package.module:Qualified.name'"
        )
    return module, qualname


def find_module(name: str, key: str) -> ModuleType:
    module = sys.modules.get(name)
    if module is None:
        raise TargetNotFound(
            f"{key}: module {name!r} is not imported in this process; livepatch patches "
            f"loaded code only — {main_script_hint(name, key) or 'check the module name'}"
        )
    return module


def main_script_hint(name: str, key: str) -> str | None:
    """If the module `name` is the file this process runs as its script, say so: that
    file's functions live in ``__main__``, and a module of its name may never be
    imported (``python app.py`` imports no ``app``)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or os.path.splitext(os.path.basename(path))[0] != name.rpartition(".")[2]:
        return None
    qualname = key.partition(":")[2] or "..."
    return (f"{os.path.basename(path)} runs as this process's main script, so its functions "
            f"are in __main__: name the target __main__:{qualname} (livepatch build "
            "--module __main__ builds it so)")


def resolve(key: str) -> Target:
    """Find the live function(s) behind `key`, or raise TargetNotFound / UnsafeChange."""
    module_name, qualname = split_key(key)
    module = find_module(module_name, key)
    if module_name == "__main__":
        _require_main_source(module, key)
    if _LOCALS in qualname.split("."):
        return _resolve_nested(key, module, qualname)
    obj = _walk(key, module, qualname)
    after: list[Callable[[], None]] = []
    warnings: list[str] = []
    func = _unwrap(key, obj, qualname, after, warnings)
    return Target(
        key=key,
        module=module,
        qualname=qualname,
        funcs=[func],
        code=func.__code__,
        ident=("func", id(func)),
        after_install=after,
        warning="; ".join(warnings) or None,
    )


def _require_main_source(module: ModuleType, key: str) -> None:
    path = getattr(module, "__file__", None)
    if not path or not os.path.exists(path):
        raise TargetNotFound(
            f"{key}: __main__ has no source file (run from -c or stdin), so its code cannot "
            "be verified; move the code into an importable module"
        )


def _walk(key: str, module: ModuleType, qualname: str) -> Any:
    obj: Any = module
    for part in qualname.split("."):
        if isinstance(obj, type):
            if part.startswith("__") and not part.endswith("__"):
                # `Account.__audit` is the qualname; the class dict holds it mangled
                mangled = f"_{obj.__name__.lstrip('_')}{part}"
                if part not in obj.__dict__ and mangled in obj.__dict__:
                    part = mangled
            if part in obj.__dict__:
                obj = obj.__dict__[part]
                continue
            owner = next((c for c in obj.__mro__[1:] if part in c.__dict__), None)
            if owner is not None:
                raise TargetNotFound(
                    f"{key}: {obj.__qualname__}.{part} is inherited from "
                    f"{owner.__module__}:{owner.__qualname__}; name that class instead"
                )
        elif isinstance(obj, property) and part in ("fget", "fset", "fdel"):
            obj = getattr(obj, part)
            if obj is None:
                raise TargetNotFound(f"{key}: the property has no {part}")
            continue
        elif isinstance(obj, ModuleType) and part in obj.__dict__:
            obj = obj.__dict__[part]
            continue
        raise TargetNotFound(f"{key}: no {part!r} in {_describe(obj)}; check the name")
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, ModuleType):
        return f"module {obj.__name__}"
    return getattr(obj, "__qualname__", type(obj).__name__)


def _unwrap(
    key: str, obj: Any, qualname: str, after: list[Callable[[], None]], warnings: list[str]
) -> FunctionType:
    want = qualname.split(".")[-1]
    seen: set[int] = set()
    while True:
        if id(obj) in seen:
            raise TargetNotFound(f"{key}: decorator chain loops back on itself")
        seen.add(id(obj))
        if isinstance(obj, (staticmethod, classmethod, MethodType)):
            obj = obj.__func__
        elif isinstance(obj, property):
            if obj.fget is None:
                raise TargetNotFound(f"{key}: the property has no getter")
            obj = obj.fget
        elif isinstance(obj, functools.cached_property):
            warnings.append(
                f"{key} is a cached_property: instances that computed it already keep their "
                "cached value; clear it in a post_patch callback (del obj.attr) where needed"
            )
            obj = obj.func
        elif isinstance(obj, functools.partial):
            raise UnsafeChange(
                f"{key} is a functools.partial; name the function it wraps instead"
            )
        elif isinstance(obj, FunctionType):
            if obj.__code__.co_name == "<lambda>":
                raise UnsafeChange(
                    f"{key} is a lambda; lambdas cannot be targeted directly — patch the "
                    "function that creates it, or turn it into a def"
                )
            if _matches(obj, qualname, want):
                return obj
            inner = _inner_function(obj, qualname, want)
            if inner is None:
                # e.g. `handler = make_handler()`: the object itself is the target
                return obj
            obj = inner
        elif hasattr(obj, "__wrapped__") and hasattr(obj, "cache_clear"):
            after.append(obj.cache_clear)  # lru_cache: stale results would hide the fix
            obj = obj.__wrapped__
        elif hasattr(obj, "__wrapped__"):
            obj = obj.__wrapped__
        elif _is_python_instance(obj):
            # a class-based decorator (memoizer, task registry, CLI command object): the
            # function it wraps is one of its attributes
            inner = _attribute_function(obj, qualname, want)
            if inner is None:
                raise TargetNotFound(
                    f"{key} is a {type(obj).__name__} instance (a class-based decorator?) and "
                    f"none of its attributes is the function {qualname}; name the function "
                    "it wraps"
                )
            obj = inner
        elif callable(obj) and not inspect.isclass(obj):
            raise UnsafeChange(
                f"{key} is a C callable ({type(obj).__name__}); livepatch replaces Python "
                "functions only — patch the Python function that calls it"
            )
        else:
            raise TargetNotFound(f"{key} is a {type(obj).__name__}, not a function")


def _is_python_instance(obj: Any) -> bool:
    cls = type(obj)
    return (
        not inspect.isclass(obj)
        and not isinstance(obj, ModuleType)
        and getattr(cls, "__module__", "builtins") != "builtins"
        and (hasattr(obj, "__dict__") or hasattr(cls, "__slots__"))
    )


def _attribute_function(obj: Any, qualname: str, want: str) -> Any:
    values = list(getattr(obj, "__dict__", {}).values())
    for name in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, name):
            values.append(getattr(obj, name))
    for value in values:
        candidate = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if isinstance(candidate, FunctionType) and _matches(candidate, qualname, want):
            return value
    return None


def _matches(func: FunctionType, qualname: str, want: str) -> bool:
    # the code's qualname, not the function's: functools.wraps copies __qualname__ onto
    # the wrapper, but the wrapper's code still says where it was written
    code = func.__code__
    return code.co_qualname == qualname or (
        code.co_name == want and _LOCALS not in code.co_qualname and
        not hasattr(func, "__wrapped__")
    )


def _inner_function(func: FunctionType, qualname: str, want: str) -> Any:
    """The decorated function inside a wrapper: __wrapped__ first, then closure cells."""
    wrapped = getattr(func, "__wrapped__", None)
    if wrapped is not None:
        return wrapped
    queue: list[tuple[FunctionType, int]] = [(func, 0)]
    while queue:
        current, depth = queue.pop(0)
        for cell in current.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                continue
            candidate = value
            if isinstance(candidate, (staticmethod, classmethod)):
                candidate = candidate.__func__
            if isinstance(candidate, FunctionType):
                if _matches(candidate, qualname, want):
                    return value
                if depth < 3:
                    queue.append((candidate, depth + 1))
    return None


def _resolve_nested(key: str, module: ModuleType, qualname: str) -> Target:
    parts = qualname.split(".")
    cut = parts.index(_LOCALS)
    outer_key = f"{module.__name__}:{'.'.join(parts[:cut])}"
    outer = resolve(outer_key).funcs[0]
    # the enclosing function's original code, if a patch replaced it: its own version
    # carries a recompiled copy of the nested function, which is not the original
    from livepatch.redirect import slot_for

    outer_slot = slot_for(("func", id(outer)))
    outer_code = outer_slot.original.code if outer_slot else outer.__code__
    if qualname.split(".")[-1].startswith("<"):
        raise UnsafeChange(
            f"{key} is a {qualname.split('.')[-1]}; lambdas and comprehensions cannot be "
            "targeted directly — patch the function that contains them"
        )
    chain = _const_chain(outer_code, qualname)
    if chain is None:
        raise TargetNotFound(f"{key}: {outer_key} defines no {qualname!r}; check the name")
    if len(_named(outer_code, qualname)) > 1:
        raise TargetNotFound(
            f"{key} is ambiguous: {outer_key} defines {len(_named(outer_code, qualname))} "
            f"functions named {qualname!r} (e.g. in if/else branches); patch {outer_key} instead"
        )
    code = chain[-1]
    enclosing = frozenset(
        name
        for parent in chain[:-1]
        if parent.co_flags & 0x1  # functions; class bodies do not enclose their methods
        for name in (*parent.co_varnames, *parent.co_cellvars, *parent.co_freevars)
    )
    # a.<locals>.b.<locals>.c: live instances of b make c closures too
    middle = tuple(c.co_qualname for c in chain[1:-1] if c.co_flags & 0x1)
    middles = instances_of(*[c for q in middle for c in _named(outer.__code__, q)])
    return Target(
        key=key,
        module=module,
        qualname=qualname,
        funcs=instances_of(code),
        code=code,
        ident=("nested", key),
        outers=[outer, *middles],
        nested=True,
        enclosing_locals=enclosing,
        middle=middle,
    )


def _named(code: CodeType, qualname: str) -> list[CodeType]:
    found = []
    for const in code.co_consts:
        if isinstance(const, CodeType):
            if const.co_qualname == qualname:
                found.append(const)
            found += _named(const, qualname)
    return found


def _const_chain(code: CodeType, qualname: str) -> list[CodeType] | None:
    """[code, ..., the nested code called `qualname`], following code constants."""
    for const in code.co_consts:
        if isinstance(const, CodeType):
            if const.co_qualname == qualname:
                return [code, const]
            found = _const_chain(const, qualname)
            if found is not None:
                return [code, *found]
    return None


def instances_of(*codes: CodeType) -> list[FunctionType]:
    """Every live function object running one of `codes` (closure instances)."""
    wanted = {id(c) for c in codes}  # identity: equal code objects are not the same one
    found = {
        id(r): r
        for r in heap.referrers(list(codes), "closures of nested functions")
        if isinstance(r, FunctionType) and id(r.__code__) in wanted
    }
    return list(found.values())


def resolve_holder(key: str) -> tuple[Any, str]:
    """For ``patch.new``: the module or class that will hold a new name, and the name."""
    module_name, qualname = split_key(key)
    module = find_module(module_name, key)
    *path, name = qualname.split(".")
    holder: Any = module
    if path:
        holder = _walk(key, module, ".".join(path))
        if not isinstance(holder, type):
            raise TargetNotFound(f"{key}: {'.'.join(path)} is not a class; new names go on "
                                 "modules and classes")
    return holder, name
