"""Fingerprints: proving that the live code is the code a patch was built against.

kpatch refuses to patch a kernel whose function bytes differ from the ones it was built
for. Our equivalent compares *normalised code objects*: bytecode, constants (recursively),
names, variables, free and cell variables, argument counts and the flags that change
behaviour — everything except line numbers, file names and qualified names, so a body that
only moved (kpatch's ``__LINE__`` rule) still matches.

A fingerprint is ``"sha256:<hex>"`` of that normal form. ``expect=`` in a patch holds
either the old *source* of the function (compiled in the target's context, then compared)
or a fingerprint string.
"""

from __future__ import annotations

import hashlib
from types import CodeType, FunctionType
from typing import Any

# CO_NESTED says "compiled inside another function": true of our re-compilations in a
# synthetic context, meaningless for behaviour.
_CO_NESTED = 0x10
# set by @types.coroutine at run time, never by the compiler
_CO_ITERABLE_COROUTINE = 0x100
_PREFIX = "sha256:"


def normal_form(code: CodeType) -> tuple[Any, ...]:
    """Everything about `code` that decides what it does, nothing about where it was written."""
    return (
        code.co_name,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags & ~(_CO_NESTED | _CO_ITERABLE_COROUTINE),
        code.co_code,
        tuple(_normal_const(c) for c in _consts(code)),
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
        code.co_exceptiontable,
    )


def _consts(code: CodeType) -> tuple[Any, ...]:
    consts = code.co_consts
    # A function's first constant is its docstring (or None) up to 3.13. Its indentation
    # depends on where the source sat (3.13 strips it, earlier versions keep it, and
    # expect= text is often dedented), so docstrings compare with white space folded.
    if consts and isinstance(consts[0], str) and not code.co_name.startswith("<"):
        consts = (" ".join(consts[0].split()), *consts[1:])
    if "__firstlineno__" in code.co_names:
        # 3.13 class bodies store their first line number as a constant
        line = code.co_firstlineno
        consts = tuple(_LINE if type(c) is int and c == line else c for c in consts)
    return consts


class _Line:
    def __repr__(self) -> str:
        return "<first line>"


_LINE = _Line()


def _normal_const(const: Any) -> Any:
    if isinstance(const, CodeType):
        return ("code", normal_form(const))
    if isinstance(const, (tuple, frozenset)):
        items = [_normal_const(c) for c in const]
        if isinstance(const, frozenset):
            items.sort(key=repr)
        return (type(const).__name__, tuple(items))
    # type name too: 1 == 1.0 == True, but they compile to different programs
    return (type(const).__name__, repr(const))


_UNSET: Any = object()
_LITERALS = (type(None), bool, int, float, complex, str, bytes)


def fingerprint(
    obj: FunctionType | CodeType, defaults: Any = _UNSET, kwdefaults: Any = _UNSET
) -> str:
    """``"sha256:..."`` of a function's normal form: its code and its default values.

    For a code object alone, pass `defaults`/`kwdefaults` to include them. Defaults that
    are not plain literals count by type only (their repr may hold an address).
    """
    code = obj.__code__ if isinstance(obj, FunctionType) else obj
    if not isinstance(code, CodeType):
        raise TypeError(f"fingerprint() needs a Python function or code object, not {obj!r}")
    if isinstance(obj, FunctionType):
        defaults = obj.__defaults__ if defaults is _UNSET else defaults
        kwdefaults = obj.__kwdefaults__ if kwdefaults is _UNSET else kwdefaults
    form: tuple[Any, ...] = normal_form(code)
    if defaults is not _UNSET or kwdefaults is not _UNSET:
        positional = tuple(_normal_default(v) for v in (defaults or ()))
        keywords = tuple(sorted((k, _normal_default(v)) for k, v in (kwdefaults or {}).items()))
        form = (form, positional, keywords)
    digest = hashlib.sha256(repr(form).encode()).hexdigest()
    return _PREFIX + digest


def _normal_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return ("tuple", tuple(_normal_default(v) for v in value))
    if type(value) in _LITERALS:
        return (type(value).__name__, repr(value))
    return (type(value).__name__,)


def is_fingerprint(text: str) -> bool:
    return text.startswith(_PREFIX) and len(text) == len(_PREFIX) + 64


def same_code(a: CodeType, b: CodeType) -> bool:
    return normal_form(a) == normal_form(b)
