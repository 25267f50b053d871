"""Redirection: how calls reach the newest version of a function.

livepatch never rebinds a name. A function is patched by replacing the *contents* of the
live function object — ``__code__``, ``__defaults__``, ``__kwdefaults__`` — so every holder
of the object (``from m import f`` copies, bound methods stored as callbacks, partials,
registries) runs the new code, with the function's own globals and closure cells.

Each patched function has a :class:`Slot` holding its original contents and a *version
stack* (the kernel's ``func_stack``): one :class:`Version` per applied patch that replaces
it, newest last. The newest version is installed; reverting any patch removes its version
from the stack and installs whatever is then on top (or the original).

A slot may stand for several live function objects that share one code object: a nested
function (``outer.<locals>.inner``) has one function object per call of ``outer``. For
those the slot also rewrites ``outer``'s code constants so closures made later get the
new code too.

Installing a version is three attribute stores. They are not atomic against other
threads; callers that need atomicity (the ``stop`` model) park the other threads first,
and the dispatching models install a trampoline instead (see ``dispatch``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType, FunctionType
from typing import Any

log = logging.getLogger("livepatch.redirect")

class _Keep:
    """Marker: leave this attribute of the live function as it is."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


@dataclass(frozen=True, eq=False)
class Version:
    """One version of a function's contents.

    ``patch`` is the name of the patch that brought it, ``None`` for the original.
    ``defaults``/``kwdefaults`` may be :data:`KEEP` (nested functions keep the defaults
    each closure instance was created with).
    """

    code: CodeType
    defaults: Any = KEEP
    kwdefaults: Any = KEEP
    patch: str | None = None

    @classmethod
    def of(cls, func: FunctionType, code: CodeType | None = None) -> Version:
        """What `func` runs now (with `code` instead of its own, if given)."""
        return cls(code or func.__code__, func.__defaults__, _copy(func.__kwdefaults__))

    def install(self, func: FunctionType) -> None:
        # Everything is computed first, then three attribute stores follow with no call
        # and no backward jump between them: the eval breaker (and so a switch to another
        # thread) cannot fire in between, so no caller sees new code with old defaults.
        code, defaults, keep_defaults = self.code, self.defaults, self.defaults is KEEP
        keep_kw = self.kwdefaults is KEEP
        kwdefaults = None if keep_kw else _copy(self.kwdefaults)
        func.__code__ = code
        if not keep_defaults:
            func.__defaults__ = defaults
        if not keep_kw:
            func.__kwdefaults__ = kwdefaults


def _copy(kwdefaults: dict[str, Any] | None) -> dict[str, Any] | None:
    # A function's __kwdefaults__ dict is mutable and shared by reference; keep our own.
    return dict(kwdefaults) if kwdefaults is not None else None


@dataclass(eq=False)
class Slot:
    """One patched function: its live object(s), original contents and version stack."""

    key: str  # "package.module:Qualified.name"
    funcs: list[FunctionType]
    original: Version
    #: registry identity: ("func", id(function)) or ("nested", key)
    ident: Any = None
    stack: list[Version] = field(default_factory=list)
    #: code objects that own this function's code as a constant (nested functions):
    #: (function whose __code__ holds it) — rewritten on every install
    outers: list[FunctionType] = field(default_factory=list)
    #: run after every install (e.g. clear an lru_cache wrapping the function)
    after_install: list[Callable[[], None]] = field(default_factory=list)
    #: a nested function: instances come and go, defaults are per instance
    nested: bool = False
    #: qualnames of intermediate enclosing functions (doubly nested targets), whose
    #: live instances are outers too; the first `fixed_outers` outers are the top ones
    middle: tuple[str, ...] = ()
    fixed_outers: int = 1

    #: every code object this slot has installed, by id (nested instances and outer
    #: constants may still hold any of them). Code objects compare *equal* when compiled
    #: from the same source, so identity is the only safe key.
    seen: dict[int, CodeType] = field(default_factory=dict)
    #: enclosing code objects that rewrite_outers replaced, held weakly: a frame still
    #: running one keeps it alive (and keeps making closures from its constant). Made
    #: on first use: only nested targets have outers, and a weak dictionary is five
    #: objects for the garbage collector to track, per slot of every plan
    replaced_outers: weakref.WeakValueDictionary[int, CodeType] | None = None

    def __post_init__(self) -> None:
        if self.ident is None:
            self.ident = ("func", id(self.funcs[0]))
        self.seen[id(self.original.code)] = self.original.code

    @property
    def func(self) -> FunctionType:
        return self.funcs[0]

    def effective(self) -> Version:
        return self.stack[-1] if self.stack else self.original

    def version_of(self, patch: str) -> Version | None:
        for version in self.stack:
            if version.patch == patch:
                return version
        return None

    def known_codes(self) -> list[CodeType]:
        return [self.original.code, *(v.code for v in self.stack)]

    @property
    def qualname(self) -> str:
        return self.original.code.co_qualname

    def install(self, version: Version) -> list[str]:
        """Make every live object of this slot run `version` (no dispatch).

        Returns the errors of after-install hooks (user code such as a cache's clear()):
        the code is installed regardless; the caller decides whether that is a failure.
        """
        self.seen[id(version.code)] = version.code
        if self.nested:
            # first the enclosing functions: no closure made from here on runs old code
            self.rewrite_outers(version.code)
        for func in self.funcs:
            version.install(func)
        if not self.nested and _nested:
            _reconcile_nested(self)
        errors = []
        for hook in self.after_install:
            # never let user code break an install or a rollback half-way
            try:
                hook()
            except Exception as exc:
                log.warning("livepatch: %s: after-install hook failed: %s", self.key, exc)
                errors.append(f"{self.key}: {getattr(hook, '__qualname__', hook)} failed: {exc}")
        return errors

    def adopt(self) -> None:
        """Nested slots: find closures made since the instances were last collected and
        make them run the effective version.

        This walks the heap (gc.get_referrers), so it runs when planning and after a
        transition completed — never inside install, which may run with the world stopped.
        """
        if not self.nested:
            return
        from livepatch.locate import instances_of

        version = self.effective()
        known = {id(f) for f in self.funcs}
        self.funcs = instances_of(*self.inner_codes(), version.code)
        for func in self.funcs:
            if id(func) not in known or func.__code__ is not version.code:
                version.install(func)
        self.refresh_outers()

    def refresh_outers(self) -> None:
        """Nested slots: pick up live instances of intermediate enclosing functions
        (``a.<locals>.b`` for ``a.<locals>.b.<locals>.c``) made since the last look."""
        if self.middle:
            from livepatch.locate import instances_of

            top = self.outers[: self.fixed_outers]
            codes = [c for outer in top for q in self.middle
                     for c in named_consts(outer.__code__, q)]
            # instances we know run their own (rewritten) copies of the middle code
            codes += [o.__code__ for o in self.outers[self.fixed_outers :]]
            fresh = instances_of(*codes) if codes else []
            self.outers = [*self.outers[: self.fixed_outers], *fresh]
            self.rewrite_outers(self.effective().code)

    def install_code(self, code: CodeType) -> None:
        """Install a bare code object (a trampoline) on every live object."""
        for func in self.funcs:
            func.__code__ = code

    def inner_codes(self) -> list[CodeType]:
        """Every code object that is "this nested function": ours, and the constants of
        every version the enclosing functions have had (their own patches compile one)."""
        codes = [*self.seen.values(), *self.known_codes()]
        for outer in self.outers:
            codes += named_consts(outer.__code__, self.qualname)
            outer_slot = _slots.get(("func", id(outer)))
            for code in outer_slot.seen.values() if outer_slot else ():
                codes += named_consts(code, self.qualname)
        return list({id(c): c for c in codes}.values())

    def rewrite_outers(self, code: CodeType) -> None:
        """Make the enclosing functions create closures that run `code` from now on."""
        for outer in self.outers:
            before = outer.__code__
            outer.__code__ = replace_named(before, self.qualname, code)
            if outer.__code__ is not before:
                if self.replaced_outers is None:
                    self.replaced_outers = weakref.WeakValueDictionary()
                self.replaced_outers[id(before)] = before

    def enclosing_sides(
        self, new: CodeType
    ) -> tuple[tuple[CodeType, ...], tuple[CodeType, ...]]:
        """Code of the enclosing functions (middle ones included) that a frame may be
        running, as (makes closures of another version than `new`, makes closures of `new`).

        A running frame keeps the code it started with, so it goes on creating closures from
        that code's constant whatever is installed later: for the consistency models such a
        frame runs the version its closures get.
        """
        if not self.nested:
            return (), ()
        codes = [outer.__code__ for outer in self.outers]
        if self.replaced_outers is not None:
            codes += self.replaced_outers.values()
        for outer in self.outers[: self.fixed_outers]:
            outer_slot = _slots.get(("func", id(outer)))
            codes += outer_slot.seen.values() if outer_slot else ()
        codes += [c for code in list(codes) for q in self.middle for c in named_consts(code, q)]
        other: dict[int, CodeType] = {}
        making_new: dict[int, CodeType] = {}
        for code in codes:
            made = named_consts(code, self.qualname)
            if made:
                side = making_new if all(c is new for c in made) else other
                side[id(code)] = code
        return tuple(other.values()), tuple(making_new.values())


def _reconcile_nested(outer_slot: Slot) -> None:
    """After an enclosing function got new code, re-point its nested constants at the
    versions their own slots run (a patch to `outer` must not drop a patch to `inner`)."""
    for slot in list(_nested.values()):
        if slot.stack and any(o in outer_slot.funcs for o in slot.outers):
            slot.rewrite_outers(slot.effective().code)


def pristine(func: FunctionType) -> CodeType:
    """`func`'s code with the constants that nested slots rewrote put back to their
    originals: the code its source compiles to, for fingerprints."""
    code = func.__code__
    for slot in list(_nested.values()):
        if func in slot.outers:
            code = replace_named(code, slot.qualname, slot.original.code)
    return code


def named_consts(code: CodeType, qualname: str) -> list[CodeType]:
    """Code constants (at any depth) whose qualified name is `qualname`."""
    found = []
    for const in code.co_consts:
        if isinstance(const, CodeType):
            if const.co_qualname == qualname:
                found.append(const)
            found += named_consts(const, qualname)
    return found


def replace_named(code: CodeType, qualname: str, new: CodeType) -> CodeType:
    """`code` with every code constant named `qualname` (at any depth) replaced by `new`."""
    changed = False
    consts = []
    for const in code.co_consts:
        if isinstance(const, CodeType):
            if const.co_qualname == qualname:
                changed = changed or const is not new
                const = new
            else:
                inner = replace_named(const, qualname, new)
                if inner is not const:
                    const, changed = inner, True
        consts.append(const)
    return code.replace(co_consts=tuple(consts)) if changed else code


#: Every slot with a non-empty stack, by identity: ("func", id(function)) — the slot keeps
#: the function alive, so the id cannot be reused while the slot exists — or
#: ("nested", key). Guarded by its own small lock so readers need not take core.LOCK.
_slots: dict[Any, Slot] = {}
#: the nested ones among them, which every install of a plain function looks through
#: (_reconcile_nested): a patch of 100 functions would otherwise look at 100 x 100 slots
_nested: dict[Any, Slot] = {}
_slots_lock = threading.Lock()


def slot_for(ident: Any) -> Slot | None:
    return _slots.get(ident)


def register_all(slots: list[Slot]) -> None:
    """Remember each of `slots` as patched (one hold of the lock for a whole patch)."""
    with _slots_lock:
        for slot in slots:
            found = _slots.setdefault(slot.ident, slot)
            if found.nested:
                _nested[found.ident] = found


def discard_if_idle(slot: Slot) -> None:
    """Forget a slot whose stack is empty (the original is installed again)."""
    with _slots_lock:
        if not slot.stack and _slots.get(slot.ident) is slot:
            del _slots[slot.ident]
            _nested.pop(slot.ident, None)


def all_slots() -> list[Slot]:
    with _slots_lock:
        return list(_slots.values())
