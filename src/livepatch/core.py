"""Core: applying and reverting patches (kernel: livepatch/core.c).

The control flow of DESIGN.md section 2, in two halves:

* :func:`plan` resolves every target, verifies it is the code the patch was built against
  and compiles every replacement in the target's context. It changes nothing, so any
  refusal leaves the process exactly as it was.
* :func:`apply` / :func:`revert` run the callbacks and hand the resulting changes to a
  transition (``transition.begin``), which moves every task to the new code under the
  chosen model and then calls back here to *finalize* (push the versions on their stacks
  and install them), *complete* (post callbacks) or *unwind* (put everything back).

One lock, :data:`LOCK`, guards the applied-patch list and the version stacks. It is held
while a patch is planned and started and while a transition finalizes; never while a
caller waits for a transition. Read-only views (:func:`patches`) take it briefly.
"""

from __future__ import annotations

import ast
import builtins
import copy
import dis
import linecache
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livepatch import codegen, exercise, heap, locate, pace, redirect, transition
from livepatch.errors import (
    AlreadyApplied,
    CallbackFailed,
    FingerprintMismatch,
    NotApplied,
    PatchError,
    StateMismatch,
    TransitionBusy,
    UnsafeChange,
)
from livepatch.fingerprint import fingerprint, is_fingerprint, same_code
from livepatch.patch import FunctionSpec, NewSpec, Patch, Source, load
from livepatch.redirect import KEEP, Slot, Version
from livepatch.transition import Change, Direction, Model, Transition

log = logging.getLogger("livepatch.core")

#: The one lock (kernel: klp_mutex). Re-entrant: a transition finalizing from the thread
#: that started it takes it again.
LOCK = threading.RLock()  # a fork's child gets it back free: transition._after_fork_in_child

#: planning's hand-over period at least (CPU seconds, see pace.Yielder): a function's
#: plan is 0.1 to 0.3 ms of work, so a longer floor than install's lets fewer naps
#: slow it down
PLAN_EVERY = 0.00025

# co_flags bits that make a function a generator, coroutine or async generator
_KIND_FLAGS = 0x20 | 0x80 | 0x200
_KIND_NAMES = {0: "function", 0x20: "generator", 0x80: "coroutine", 0x200: "async generator"}
# set on a generator's code at run time by @types.coroutine, never by the compiler
_CO_ITERABLE_COROUTINE = 0x100


# -- the applied-patch list -----------------------------------------------------------


_MISSING: Any = object()


@dataclass(eq=False)
class _Added:
    """A name a patch added to a module or class (``patch.new``)."""

    holder: Any
    name: str
    value: Any
    target: str
    #: what the name held before (a superseded patch's value), restored on removal
    previous: Any = _MISSING

    def install(self) -> None:
        self.previous = self.holder.__dict__.get(self.name, _MISSING)
        setattr(self.holder, self.name, self.value)

    def remove(self) -> None:
        # only if it is still ours: the application may have rebound the name since
        if self.holder.__dict__.get(self.name, _MISSING) is not self.value:
            return
        if self.previous is _MISSING:
            delattr(self.holder, self.name)
        else:
            setattr(self.holder, self.name, self.previous)

    def same_name(self, other: _Added) -> bool:
        return self.holder is other.holder and self.name == other.name


@dataclass(eq=False)
class _Record:
    patch: Patch
    model: Model
    slots: list[Slot]
    added: list[_Added]
    state: str = "transitioning"
    applied_at: float = field(default_factory=time.time)
    forced: bool = False
    callback_errors: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AppliedPatch:
    """A read-only view of one applied patch, for ``livepatch.patches()``."""

    name: str
    description: str
    state: str  # "transitioning", "applied", "reverting"
    functions: list[str]
    added: list[str]
    applied_at: float
    forced: bool
    cumulative: bool
    model: str
    sha256: str | None
    source: str | None
    states: dict[str, int]
    callback_errors: list[str]
    #: per function, when its new code first ran (epoch seconds; None: not yet);
    #: None as a whole where the interpreter cannot tell cheaply (3.11)
    exercised: dict[str, float | None] | None = None
    #: functions applied without proof that the live code was what the patch expected
    unverified: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "state": self.state,
            "functions": list(self.functions),
            "added": list(self.added),
            "applied_at": self.applied_at,
            "forced": self.forced,
            "cumulative": self.cumulative,
            "model": self.model,
            "sha256": self.sha256,
            "source": self.source,
            "states": dict(self.states),
            "callback_errors": list(self.callback_errors),
            "exercised": dict(self.exercised) if self.exercised is not None else None,
            "unverified": list(self.unverified),
        }


_applied: list[_Record] = []  # in apply order; guarded by LOCK


def patches() -> list[AppliedPatch]:
    """The applied patches, oldest first (including one in transition)."""
    with LOCK:
        return [_view(r) for r in _applied]


def snapshot() -> tuple[list[AppliedPatch], Transition | None]:
    """The applied patches and the transition in flight, read together.

    Apply lists its patch and then starts its transition, both under :data:`LOCK`; a
    transition read apart from the list could be missing while the list already holds
    its patch, "transitioning" (status taken while the trampolines were being built).
    """
    with LOCK:
        return patches(), transition.transition()


def _view(r: _Record) -> AppliedPatch:
    return AppliedPatch(
        name=r.patch.name,
        description=r.patch.description,
        state=r.state,
        functions=[s.key for s in r.slots],
        added=[a.target for a in r.added],
        applied_at=r.applied_at,
        forced=r.forced,
        cumulative=r.patch.cumulative,
        model=r.model.value,
        sha256=r.patch.sha256,
        source=r.patch.source_path,
        states=dict(r.patch.states),
        callback_errors=list(r.callback_errors),
        exercised=_exercised(r),
        unverified=list(r.unverified),
    )


def _exercised(r: _Record) -> dict[str, float | None] | None:
    if not exercise.supported():
        return None
    result: dict[str, float | None] = {}
    for slot in r.slots:
        version = slot.version_of(r.patch.name)
        result[slot.key] = exercise.first_run(version.code) if version else None
    return result


def _find(name: str) -> _Record | None:
    return next((r for r in _applied if r.patch.name == name), None)


# -- planning: resolve, verify, compile ----------------------------------------------


@dataclass(frozen=True)
class PlannedChange:
    """What applying would do to one function."""

    target: str
    verified: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "verified": self.verified, "note": self.note}


@dataclass(eq=False)
class _Prepared:
    spec: FunctionSpec
    slot: Slot
    version: Version
    module: types.ModuleType


@dataclass(eq=False)
class Plan:
    """The result of verifying a patch against this process; nothing was changed."""

    patch: Patch
    changes: list[PlannedChange]
    notes: list[str]
    prepared: list[_Prepared] = field(repr=False, default_factory=list)
    added: list[_Added] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch": self.patch.name,
            "changes": [c.to_dict() for c in self.changes],
            "notes": list(self.notes),
        }


def plan(patch: Patch) -> Plan:
    """Resolve and verify every target of `patch`; change nothing. Raises PatchError."""
    with LOCK, heap.looking_only():
        return _plan(patch)


def _plan(patch: Patch) -> Plan:
    if _find(patch.name) is not None:
        raise AlreadyApplied(f"{patch.name} is applied already; revert it first or rename")
    result = Plan(patch, [], [])
    seen: dict[Any, str] = {}
    handing_over = pace.Yielder(PLAN_EVERY)
    for spec in patch.functions:
        handing_over()
        prepared, change = _prepare(patch, spec)
        ident = _ident(prepared.slot)
        if ident in seen:
            raise UnsafeChange(
                f"{patch.name}: {spec.target} and {seen[ident]} are the same function; "
                "replace it once"
            )
        seen[ident] = spec.target
        result.prepared.append(prepared)
        result.changes.append(change)
    superseded = {r.patch.name for r in _applied} if patch.cumulative else set()
    result.added = [_prepare_new(patch, spec, superseded) for spec in patch.news]
    _check_globals(patch, result)
    _check_states(patch)
    if patch.cumulative:
        _describe_replace(result)
    if any(not c.verified for c in result.changes):
        result.notes.append(
            "some functions were not verified (no expect=): the patch trusts that the live "
            "code is what it was written against"
        )
    frozen = heap.frozen()
    scanning = [p.spec.target for p in result.prepared
                if p.slot.nested or (p.slot.original.code.co_flags | p.version.code.co_flags)
                & _KIND_FLAGS] if frozen else []
    if scanning:
        result.notes.append(
            f"this process froze {frozen} object(s) with gc.freeze(); to find the closures "
            f"and suspended generators of {', '.join(scanning)} among them, applying gives "
            "them back to the garbage collector (gc.unfreeze()), which scans them again "
            "from then on"
        )
    return result


def _describe_replace(the_plan: Plan) -> None:
    """Atomic replace: say what goes back to its original code and what disappears."""
    named = {id(p.slot) for p in the_plan.prepared}
    for slot in _slots_of(list(_applied)):
        if id(slot) not in named and slot.stack:
            owners = ", ".join(v.patch or "" for v in slot.stack)
            the_plan.changes.append(
                PlannedChange(slot.key, True, f"back to original (atomic replace supersedes "
                                              f"{owners})")
            )
    if _applied:
        the_plan.notes.append(
            "supersedes " + ", ".join(r.patch.name for r in _applied)
            + " (their unpatch callbacks do not run)"
        )
    kept = {(id(a.holder), a.name) for a in the_plan.added}
    dropped = [a.target for r in _applied for a in r.added if (id(a.holder), a.name) not in kept]
    if dropped:
        the_plan.notes.append("removes helpers " + ", ".join(dropped))


def _check_globals(patch: Patch, the_plan: Plan) -> None:
    """New code runs with the target module's globals. A name it needs that the module
    lacks raises NameError on the first call in production — most often a helper or an
    import written in the patch file without patch.new. Say so in the plan and the log.

    A warning, not a refusal: a pre_patch callback may bind the name (the builder binds
    ``from x import y`` names that way), and plan cannot know that.
    """
    home = patch._home
    # an atomic replace removes the helpers of the patches it supersedes unless it
    # carries them: code that calls one would fail at once
    carried = {(id(a.holder), a.name) for a in the_plan.added}
    going = {
        (id(a.holder), a.name): r.patch.name
        for r in (_applied if patch.cumulative else [])
        for a in r.added
        if (id(a.holder), a.name) not in carried
    }
    handing_over = pace.Yielder()  # a bytecode scan per function: paced like planning
    for index, prepared in enumerate(the_plan.prepared):
        handing_over()
        module = prepared.module
        added = {a.name for a in the_plan.added if a.holder is module}
        uses = _global_names(prepared.version.code)
        for name in sorted(uses):
            owner = going.get((id(module), name))
            if owner is not None:
                raise UnsafeChange(
                    f"{prepared.spec.target} uses {module.__name__}:{name}, added by {owner}, "
                    f"which this cumulative patch supersedes without carrying it; carry it "
                    f"with patch.new('{module.__name__}:{name}')"
                )
        missing = sorted(
            n for n in uses
            if n not in module.__dict__ and n not in added and not hasattr(builtins, n)
        )
        if not missing:
            continue
        from_patch = [n for n in missing if n in home]
        note = f"uses {', '.join(missing)}, which {module.__name__} does not define"
        if from_patch:
            first = from_patch[0]
            note += (
                f" ({', '.join(from_patch)} from the patch file: replacements run with the "
                f"target's globals — bring it in with patch.new('{module.__name__}:{first}', "
                f"{first}) or @patch.new over its def)"
            )
        log.warning("livepatch: %s: %s %s", patch.name, prepared.spec.target, note)
        change = the_plan.changes[index]
        the_plan.changes[index] = PlannedChange(
            change.target, change.verified, f"{change.note}; {note}"
        )
    for helper in the_plan.added:  # helpers written in the patch run in the target too
        fn = helper.value
        if isinstance(fn, (staticmethod, classmethod)):
            fn = fn.__func__
        elif isinstance(fn, property):
            fn = fn.fget
        if not isinstance(fn, types.FunctionType) or fn.__globals__ is home:
            continue
        module_dict = fn.__globals__
        added_here = {a.name for a in the_plan.added if a.holder.__dict__ is module_dict}
        missing = sorted(
            n for n in _global_names(fn.__code__)
            if n not in module_dict and n not in added_here and not hasattr(builtins, n)
        )
        if missing:
            module_name = module_dict.get("__name__", "?")
            from_patch = [n for n in missing if n in home]
            note = f"{helper.target} uses {', '.join(missing)}, which {module_name} does not define"
            if from_patch:
                first = from_patch[0]
                note += (
                    f" ({', '.join(from_patch)} from the patch file: bring it in with "
                    f"patch.new('{module_name}:{first}', {first}))"
                )
            log.warning("livepatch: %s: %s", patch.name, note)
            the_plan.notes.append(note)


def _ident(slot: Slot) -> Any:
    return slot.ident


def _prepare(patch: Patch, spec: FunctionSpec) -> tuple[_Prepared, PlannedChange]:
    target = locate.resolve(spec.target)
    slot = _slot_for(target)
    original = slot.original.code
    live = slot.effective().code
    # the code's own qualname: `Box.size.fset` names the setter, whose code is `Box.size`
    ctx = codegen.Context.of(original, original.co_qualname, target.module)

    stray = [n for n in spec.replacement.__code__.co_freevars if n not in ctx.freevars]
    if stray:
        raise UnsafeChange(
            f"{spec.target}: the replacement closes over {', '.join(stray)} from where it was "
            "written, but replacements run with the target module's globals; make it a "
            "top-level def in the patch file and bring values in with patch.new"
        )
    assert spec.source is not None
    node = spec.source.node
    filename = _display_filename(patch, spec.source)
    if node is None:
        if spec.replacement.__code__.co_freevars != ctx.freevars or ctx.class_name:
            raise UnsafeChange(
                f"{spec.target}: the source of the replacement is not available, so it cannot "
                "be compiled in the target's context; load the patch from a file"
            )
        code = spec.replacement.__code__.replace(co_qualname=target.qualname)
    else:
        _refuse_extra_decorators(spec, node)
        code = codegen.compiled_already(
            spec.replacement.__code__,
            ctx,
            codegen.imports_in(spec.source.filename, spec.source.lines),
            filename,
        ) or codegen.compile_function(node, ctx, filename)

    if original.co_flags & _CO_ITERABLE_COROUTINE:
        code = code.replace(co_flags=code.co_flags | _CO_ITERABLE_COROUTINE)
    hidden = []
    if target.enclosing_locals:
        hidden = sorted(_global_names(code) & target.enclosing_locals)
    if hidden:
        raise UnsafeChange(
            f"{spec.target}: the new code uses {', '.join(hidden)}, a local of the enclosing "
            "function that the live closure does not capture; free variables cannot be "
            "added to a live closure — keep the same free variables or use livepatch upgrade"
        )
    old_kind = original.co_flags & _KIND_FLAGS
    new_kind = code.co_flags & _KIND_FLAGS
    if old_kind != new_kind:
        raise UnsafeChange(
            f"{spec.target}: the replacement is a {_KIND_NAMES.get(new_kind, 'function')} but "
            f"the live function is a {_KIND_NAMES.get(old_kind, 'function')}; live callers "
            "depend on the kind — keep it, or use livepatch upgrade"
        )
    if target.nested:
        _refuse_nested_defaults(spec, slot, node)
        version = Version(code, KEEP, KEEP, patch.name)
    else:
        kwdefaults = spec.replacement.__kwdefaults__
        version = Version(code, spec.replacement.__defaults__, kwdefaults, patch.name)

    verified, note = _verify(spec, ctx, slot)
    if target.nested:
        running = _running_enclosing(slot, code)
        if running:
            target.warning = (
                f"{running} running now; closures it creates keep the old code until it "
                "returns (its frame runs the code it started with): the transition waits "
                "for that, except under model='immediate'"
            )
    if target.warning:
        note += "; " + target.warning
        log.warning("livepatch: %s: %s", patch.name, target.warning)
    if _signature(code) != _signature(live):
        note += "; the signature changed: callers that bind arguments the old way may break"
    return _Prepared(spec, slot, version, target.module), PlannedChange(spec.target, verified, note)


def _running_enclosing(slot: Slot, new: types.CodeType) -> str | None:
    """A thread running an enclosing function of a nested target, if any."""
    codes = {id(code) for code in slot.enclosing_sides(new)[0]}
    for ident, frame in sys._current_frames().items():
        current: Any = frame
        while current is not None:
            if id(current.f_code) in codes:
                return f"{current.f_code.co_qualname} is (thread {ident})"
            current = current.f_back
    return None


def _refuse_nested_defaults(
    spec: FunctionSpec, slot: Slot, node: codegen.FunctionNode | None
) -> None:
    """A nested function's defaults are evaluated by its enclosing function each time it
    makes a closure: a replacement of the nested function alone cannot change them."""
    new = (spec.replacement.__defaults__, spec.replacement.__kwdefaults__)
    if slot.funcs:
        live = (slot.funcs[0].__defaults__, slot.funcs[0].__kwdefaults__)
        same = _same_defaults(new, live)
    elif spec.expect is not None and node is not None and not is_fingerprint(spec.expect):
        old = codegen.parse_def(spec.expect, f"expect of {spec.target}")
        same = ast.dump(old.args) == ast.dump(node.args)
    else:
        same = not (new[0] or new[1])
    if not same:
        raise UnsafeChange(
            f"{spec.target}: the replacement changes default argument values, but a nested "
            "function's defaults are evaluated by its enclosing function; patch the "
            "enclosing function too, or keep the defaults"
        )


def _same_defaults(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    try:
        return bool(a[0] == b[0] and (a[1] or {}) == (b[1] or {}))
    except Exception:  # an odd __eq__ on a default: cannot tell, so refuse
        return False


def _slot_for(target: locate.Target) -> Slot:
    existing = redirect.slot_for(target.ident)
    if existing is not None:
        if target.nested:
            existing.funcs = locate.instances_of(*existing.inner_codes())
            existing.refresh_outers()
        return existing
    if target.nested:
        original = Version(target.code, KEEP, KEEP, None)
    else:
        original = Version.of(target.funcs[0], redirect.pristine(target.funcs[0]))
    return Slot(
        key=target.key,
        ident=target.ident,
        funcs=list(target.funcs),
        original=original,
        outers=list(target.outers),
        after_install=list(target.after_install),
        nested=target.nested,
        middle=target.middle,
    )


def _display_filename(patch: Patch, source: Source) -> str:
    """Where tracebacks through the new code point: the patch's file, named by the patch,
    showing the text the patch was loaded from."""
    display = f"{source.filename} [livepatch {patch.name}]"
    # every def of a patch file carries the whole file: write the entry once per patch,
    # not once per function (a patch of n functions would copy n files), and again if
    # linecache.clearcache() dropped it
    if source.lines and (_shown.get(display) != source.lines
                         or display not in linecache.cache):
        lines = list(source.lines)
        linecache.cache[display] = (sum(map(len, lines)), None, lines, display)
        _shown[display] = source.lines
    return display


#: display file name → the text last put in the line cache under it
_shown: dict[str, tuple[str, ...]] = {}


def _refuse_extra_decorators(spec: FunctionSpec, node: codegen.FunctionNode) -> None:
    extra = [d for d in node.decorator_list if not _is_patch_decorator(d)]
    if extra:
        raise UnsafeChange(
            f"{spec.target}: the replacement has decorators besides @patch.function; the "
            "live function's decorators keep running, so remove them from the replacement"
        )


def _is_patch_decorator(node: Any) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "function"
    )


def _signature(code: types.CodeType) -> tuple[Any, ...]:
    nargs = code.co_argcount + code.co_kwonlyargcount
    return (
        code.co_posonlyargcount,
        code.co_argcount,
        code.co_kwonlyargcount,
        code.co_varnames[:nargs],
        code.co_flags & 0x0C,  # *args, **kwargs
    )


#: opcodes that name a global, and whether their argument is the name's index shifted
#: left by one (LOAD_GLOBAL since 3.11: the low bit says whether NULL is pushed too)
_GLOBAL_OPS = {
    dis.opmap[name]: name == "LOAD_GLOBAL"
    for name in ("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME")
}


def _global_names(code: types.CodeType) -> set[str]:
    """Names `code` (or code nested in it) reads or writes as globals.

    Reads the bytecode directly (``co_code`` is the unspecialised form): dis builds an
    object per instruction, which made this a third of planning time."""
    names = set()
    raw, co_names, extended = code.co_code, code.co_names, 0
    for i in range(0, len(raw), 2):
        op, arg = raw[i], raw[i + 1] | extended
        if op == dis.EXTENDED_ARG:
            extended = arg << 8
            continue
        extended = 0
        shifted = _GLOBAL_OPS.get(op)
        if shifted is not None:
            names.add(co_names[arg >> 1 if shifted else arg])
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _verify(spec: FunctionSpec, ctx: codegen.Context, slot: Slot) -> tuple[bool, str]:
    """Prove the live function is what `expect=` describes (the running or original version)."""
    expect = spec.expect
    if expect is None:
        return False, "not verified: the patch gives no expect="
    live = slot.effective()
    candidates = [live] if not slot.stack else [live, slot.original]
    if is_fingerprint(expect.strip()):
        if any(_fingerprint_of(v, slot) == expect.strip() for v in candidates):
            return True, "verified by fingerprint"
        raise FingerprintMismatch(
            f"{spec.target}: live code fingerprint {_fingerprint_of(live, slot)} is not the "
            f"expected {expect.strip()}; rebuild the patch from the source this process runs"
        )
    node = codegen.parse_def(expect, f"expect of {spec.target}")
    original = slot.original.code
    if node.name != original.co_name:
        raise FingerprintMismatch(
            f"{spec.target}: expect= is the source of {node.name!r}, but the live function "
            f"is {original.co_name!r}; rebuild the patch"
        )
    try:
        expected = codegen.compile_expected(node, ctx, f"<expect of {spec.target}>")
    except PatchError as exc:
        raise FingerprintMismatch(f"{spec.target}: expect= does not compile: {exc}") from None
    if not any(same_code(expected, v.code) for v in candidates):
        raise FingerprintMismatch(
            f"{spec.target}: the live code is not the code this patch was built against "
            "(expect= differs); rebuild the patch from the source this process runs"
        )
    if not any(defaults_match(node, v) for v in candidates):
        raise FingerprintMismatch(
            f"{spec.target}: the live default argument values differ from expect=; "
            "rebuild the patch from the source this process runs"
        )
    return True, "verified against expected source"


def _fingerprint_of(version: Version, slot: Slot) -> str:
    """The fingerprint `livepatch.fingerprint(function)` gives for a function running
    `version` (for nested targets: with the defaults its closure instances carry)."""
    defaults, kwdefaults = version.defaults, version.kwdefaults
    if defaults is KEEP:
        first = slot.funcs[0] if slot.funcs else None
        defaults = first.__defaults__ if first else None
        kwdefaults = first.__kwdefaults__ if first else None
    return fingerprint(version.code, defaults, kwdefaults)


def defaults_match(node: codegen.FunctionNode, version: Version) -> bool:
    """Do the literal defaults written in `node` equal the live ones? Non-literals pass."""
    if version.defaults is KEEP:
        return True
    args = node.args
    live = list(version.defaults or ())
    if len(args.defaults) != len(live):
        return False
    pairs: list[tuple[ast.expr | None, Any, bool]] = [
        (expr, value, True) for expr, value in zip(args.defaults, live, strict=True)
    ]
    kw = version.kwdefaults or {}
    for arg, expr in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        if (expr is None) != (arg.arg not in kw):
            return False
        pairs.append((expr, kw.get(arg.arg), expr is not None))
    for expr, value, present in pairs:
        if not present or expr is None:
            continue
        try:
            written = ast.literal_eval(expr)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue  # an expression evaluated at def time: not comparable from source
        if type(written) is not type(value) or written != value:
            return False
    return True


def _prepare_new(patch: Patch, spec: NewSpec, superseded: set[str]) -> _Added:
    holder, name = locate.resolve_holder(spec.target)
    if name in holder.__dict__ and not _owned_by(holder, name, superseded):
        raise UnsafeChange(
            f"{spec.target} exists already; use patch.function to replace a function, or "
            "choose a new name"
        )
    value = spec.value
    if not spec.rebuild:
        pass
    # descriptors wrap the function that must run with the target's globals
    elif isinstance(value, (staticmethod, classmethod)):
        value = type(value)(_rebuild_helper(patch, spec, value.__func__, holder, name))
    elif isinstance(value, property):
        value = value.getter(_rebuild_helper(patch, spec, value.fget, holder, name))
    elif isinstance(value, types.FunctionType):
        value = _rebuild_helper(patch, spec, value, holder, name)
    return _Added(holder, name, value, spec.target)


def _owned_by(holder: Any, name: str, patch_names: set[str]) -> bool:
    return any(
        a.holder is holder and a.name == name
        for r in _applied
        if r.patch.name in patch_names
        for a in r.added
    )


def _rebuild_helper(
    patch: Patch, spec: NewSpec, fn: Any, holder: Any, name: str
) -> types.FunctionType:
    """A helper runs with the target module's globals, like the replacements that call it."""
    if not isinstance(fn, types.FunctionType):
        raise UnsafeChange(f"{spec.target}: only Python functions can be added as helpers")
    if fn.__code__.co_freevars:
        raise UnsafeChange(
            f"{spec.target}: the new helper closes over {', '.join(fn.__code__.co_freevars)}; "
            "helpers run with the target module's globals — make it a top-level def"
        )
    is_module = isinstance(holder, types.ModuleType)
    module = holder if is_module else sys.modules[holder.__module__]
    qualname = name if is_module else f"{holder.__qualname__}.{name}"
    flags = codegen.module_future_flags(module)
    ctx = codegen.Context(
        qualname, (), None if is_module else holder.__name__, flags,
        codegen.module_imports(module),
    )
    closure: tuple[types.CellType, ...] | None = None
    source = spec.source
    if source is not None and source.node is not None:
        node = _strip_new(source.node)
        _refuse_extra_decorators(FunctionSpec(spec.target, fn, None, source), node)
        filename = _display_filename(patch, source)
        try:
            code = codegen.compile_function(node, ctx, filename)
        except UnsafeChange:
            if is_module:
                raise
            # a new method using zero-argument super(): give it a __class__ cell bound
            # to the live class, as the class statement would have
            ctx = codegen.Context(ctx.qualname, ("__class__",), ctx.class_name, flags,
                                  ctx.imports)
            code = codegen.compile_function(node, ctx, filename)
            closure = (types.CellType(holder),)
    else:
        code = fn.__code__
    new = types.FunctionType(code, module.__dict__, name, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = qualname
    new.__module__ = module.__name__
    new.__doc__ = fn.__doc__
    return new


def _strip_new(node: codegen.FunctionNode) -> codegen.FunctionNode:
    """The helper's def without ``@patch.new(...)`` and the descriptor decorators that
    _prepare_new re-applies itself."""
    node = copy.copy(node)
    node.decorator_list = [
        d
        for d in node.decorator_list
        if not (
            isinstance(d, ast.Call)
            and isinstance(d.func, ast.Attribute)
            and d.func.attr == "new"
        )
        and not (isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod", "property"))
    ]
    return node


def _check_states(patch: Patch) -> None:
    """The kernel's klp_is_patch_compatible: states may only be carried on or upgraded."""
    for record in _applied:
        for state_id, old_version in record.patch.states.items():
            new_version = patch.states.get(state_id)
            if new_version is None:
                if patch.cumulative:
                    raise StateMismatch(
                        f"{patch.name} is cumulative but drops state {state_id!r} "
                        f"(version {old_version}) of {record.patch.name}; carry it with "
                        f"patch.state({state_id!r}, version={old_version})"
                    )
                continue
            if new_version < old_version:
                raise StateMismatch(
                    f"{patch.name} has state {state_id!r} version {new_version}, older than "
                    f"version {old_version} of {record.patch.name}; a patch cannot downgrade "
                    "a state — raise its version"
                )


# -- apply ----------------------------------------------------------------------------


def apply(
    patch: Patch | str | os.PathLike[str],
    model: str = "hybrid",
    timeout: float = 30.0,
    force: bool = False,
    wait: bool = True,
) -> Transition:
    """Apply `patch` (a Patch or a patch file path) under `model`; see DESIGN.md §2."""
    if not isinstance(patch, Patch):
        patch = load(patch)
    chosen = Model.parse(model)
    with LOCK:
        try:
            t = _start_apply(patch, chosen, timeout, force)
        except PatchError as exc:
            _refused(patch, "apply", exc)
            raise
    if wait:
        t.wait()
    return t


def _first_few(names: list[str], shown: int = 5) -> str:
    """`names` for a log line: a patch of hundreds of functions would make it kilobytes
    long, and the patch's view (``PatchView.unverified``) keeps the whole list."""
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more (status --json lists all)"


def _start_apply(patch: Patch, model: Model, timeout: float, force: bool) -> Transition:
    _refuse_if_busy(patch.name)
    # tens of ms of compiling and checking: hand the GIL over as it goes (see pace);
    # not the transition itself, whose speed under load matters more than its slices
    with pace.paced():
        the_plan = _plan(patch)
    unverified = [c.target for c in the_plan.changes if not c.verified]
    total = len(the_plan.changes)
    if unverified:
        log.warning(
            "livepatch: %s: verified %d of %d function(s); not verified (no expect=): %s",
            patch.name, total - len(unverified), total, _first_few(unverified),
        )
    else:
        log.info("livepatch: %s: verified %d of %d function(s)", patch.name, total, total)
    _run_callbacks(patch, "pre_patch", veto=True)
    superseded = [r for r in _applied] if patch.cumulative else []
    changes = _apply_changes(the_plan, superseded)
    record = _Record(patch, model, [p.slot for p in the_plan.prepared], the_plan.added,
                     unverified=unverified)
    installed: list[_Added] = []
    try:
        for added in the_plan.added:
            added.install()
            installed.append(added)
    except BaseException as exc:
        for added in reversed(installed):
            added.remove()
        _run_callbacks(patch, "post_unpatch", veto=False)
        raise PatchError(f"{patch.name}: could not add {added.target}: {exc}") from None
    _applied.append(record)
    hooks = _ApplyHooks(record, the_plan, superseded)
    sys.audit("livepatch.apply", patch.name, patch.sha256, model.value)
    log.info("livepatch: %s: starting patch transition (%s)", patch.name, model.value)
    try:
        return transition.begin(
            changes,
            patch=patch.name,
            model=model,
            direction=Direction.PATCH,
            hooks=hooks,
            timeout=timeout,
            force=force,
        )
    except BaseException:
        if record in _applied:
            hooks.unwind(None, None)
        raise


def _refuse_if_busy(name: str) -> None:
    current = transition.transition()
    if current is not None and not current.done:
        raise TransitionBusy(
            f"transition of {current.patch} is in flight; wait for it or revert it first "
            f"(requested: {name})"
        )


def _apply_changes(the_plan: Plan, superseded: list[_Record]) -> list[Change]:
    handing_over = pace.Yielder()  # as in revert: a few µs each, a hundred of them
    changes = []
    for p in the_plan.prepared:
        handing_over()
        changes.append(Change(p.slot, p.slot.effective(), p.version))
    if superseded:
        # atomic replace: functions the cumulative patch does not name go back to original
        named = {id(p.slot) for p in the_plan.prepared}
        for slot in _slots_of(superseded):
            if id(slot) not in named and slot.stack:
                changes.append(Change(slot, slot.effective(), slot.original))
    return changes


def _slots_of(records: list[_Record]) -> list[Slot]:
    seen: dict[int, Slot] = {}
    for record in records:
        for slot in record.slots:
            seen.setdefault(id(slot), slot)
    return list(seen.values())


class _ApplyHooks:
    """Finalize/complete/unwind for a patch transition."""

    def __init__(self, record: _Record, the_plan: Plan, superseded: list[_Record]) -> None:
        self.record = record
        self.plan = the_plan
        self.superseded = superseded

    def finalize(self, t: Transition | None) -> None:
        with LOCK:
            touched = _slots_of(self.superseded)
            slots = _unique(touched + self.record.slots)
            before = {id(s): list(s.stack) for s in slots}
            try:
                for slot in touched:
                    slot.stack = [v for v in slot.stack if v.patch not in self._gone()]
                for p in self.plan.prepared:
                    p.slot.stack.append(p.version)
                # the dispatch has just installed these very versions: handing the GIL
                # over between two slots shows no thread a mix
                handing_over = pace.Yielder()
                errors = []
                for slot in slots:
                    handing_over()
                    errors += slot.install(slot.effective())
                if errors:  # e.g. an lru_cache that cannot be cleared would serve stale results
                    raise RuntimeError("; ".join(errors))
            except BaseException as exc:
                for slot in slots:
                    slot.stack = before[id(slot)]
                    try:
                        slot.install(slot.effective())
                    except BaseException as again:  # keep restoring the others
                        log.error("livepatch: %s: rollback of %s failed: %s",
                                  self.record.patch.name, slot.key, again)
                raise PatchError(
                    f"{self.record.patch.name}: installing the new code failed "
                    f"({type(exc).__name__}: {exc}); every function was put back"
                ) from exc
            redirect.register_all([p.slot for p in self.plan.prepared])
            for slot in touched:
                redirect.discard_if_idle(slot)
            for old in self.superseded:
                for added in old.added:
                    mine = next((a for a in self.record.added if a.same_name(added)), None)
                    if mine is None:
                        added.remove()
                    else:  # carried on: reverting the cumulative patch restores the original
                        mine.previous = added.previous
                if old in _applied:
                    _applied.remove(old)
            self.record.state = "applied"
            self.record.forced = bool(t is not None and t.forced)
        exercise.watch([p.version.code for p in self.plan.prepared])

    def _gone(self) -> set[str]:
        return {r.patch.name for r in self.superseded}

    def complete(self, t: Transition | None) -> None:
        name = self.record.patch.name
        _adopt_stragglers(self.record.slots + _slots_of(self.superseded))
        log.info("livepatch: %s: patch transition completed", name)
        errors = _run_callbacks(self.record.patch, "post_patch", veto=False)
        with LOCK:
            self.record.callback_errors.extend(errors)

    def unwind(self, t: Transition | None, error: PatchError | None) -> None:
        with LOCK:
            for slot in self.record.slots + _slots_of(self.superseded):
                slot.install(slot.effective())
                redirect.discard_if_idle(slot)
            for added in reversed(self.record.added):
                added.remove()
            if self.record in _applied:
                _applied.remove(self.record)
        _adopt_stragglers(self.record.slots + _slots_of(self.superseded))
        log.info("livepatch: %s: patch transition reversed", self.record.patch.name)
        _run_callbacks(self.record.patch, "post_unpatch", veto=False)


def _adopt_stragglers(slots: list[Slot]) -> None:
    """Closures made while a transition ran may run a version that is no longer the
    effective one; finding them walks the heap, so it happens here, with the world
    running, not in finalize."""
    handing_over = pace.Yielder()
    with LOCK:
        for slot in _unique(slots):
            if slot.nested:  # only their instances come and go
                handing_over()
                slot.adopt()


def _unique(slots: list[Slot]) -> list[Slot]:
    return list({id(s): s for s in slots}.values())


# -- revert ---------------------------------------------------------------------------


def revert(
    name: str | Patch,
    model: str = "hybrid",
    timeout: float = 30.0,
    force: bool = False,
    wait: bool = True,
) -> Transition:
    """Revert the applied patch `name`, moving every task back under `model`."""
    if isinstance(name, Patch):
        name = name.name
    chosen = Model.parse(model)
    with LOCK:
        record = _find(name)
        if record is None:
            applied = ", ".join(r.patch.name for r in _applied) or "none"
            raise NotApplied(f"{name} is not applied (applied: {applied}); see livepatch status")
        current = transition.transition()
        if current is not None and not current.done and current.patch == name:
            t = _revert_in_flight(current)
        else:
            _refuse_if_busy(name)
            try:
                _refuse_if_needed(record)
                _run_callbacks(record.patch, "pre_unpatch", veto=True)
            except PatchError as exc:
                _refused(record.patch, "revert", exc)
                raise
            changes = []
            # paced like planning: under load this loop alone kept other threads off the
            # GIL for about half a millisecond (100 functions, benchmarks/bench_transition
            # section 2's scene), before prepare's first hand-over
            handing_over = pace.Yielder()
            for slot in record.slots:
                handing_over()
                top = slot.effective()
                if top.patch == name:
                    below = slot.stack[-2] if len(slot.stack) > 1 else slot.original
                    changes.append(Change(slot, top, below))
            record.state = "reverting"
            sys.audit("livepatch.revert", name, record.patch.sha256, chosen.value)
            log.info("livepatch: %s: starting unpatch transition (%s)", name, chosen.value)
            t = transition.begin(
                changes,
                patch=name,
                model=chosen,
                direction=Direction.UNPATCH,
                hooks=_RevertHooks(record),
                timeout=timeout,
                force=force,
            )
    if wait:
        t.wait()
    return t


def _revert_in_flight(current: Transition) -> Transition:
    """Revert a patch whose transition is in flight: turn an apply around, and let a
    revert go on (a second `revert` is not an order to put the patch back)."""
    name = current.patch
    if not current.leaves_patched:
        log.info("livepatch: %s: already being reverted; following that transition", name)
        return current
    if current.reversed:
        raise TransitionBusy(
            f"{name}: its revert was turned around and the patch is being put back "
            "(a transition turns around once); wait for it, then revert again"
        )
    return transition.reverse(current)


def _refuse_if_needed(record: _Record) -> None:
    """Refuse to remove a helper that the code of another applied patch calls."""
    removed = {
        (id(a.holder.__dict__), a.name): a
        for a in record.added
        if a.previous is _MISSING and isinstance(a.holder, types.ModuleType)
    }
    if not removed:
        return
    for other in _applied:
        if other is record:
            continue
        users: list[tuple[types.CodeType, dict[str, Any]]] = []
        for slot in other.slots:
            version = slot.version_of(other.patch.name)
            if version is not None and slot.funcs:
                users.append((version.code, slot.funcs[0].__globals__))
        for a in other.added:
            if isinstance(a.value, types.FunctionType):
                users.append((a.value.__code__, a.value.__globals__))
        for code, globals_ in users:
            for name in _global_names(code):
                added = removed.get((id(globals_), name))
                if added is not None:
                    raise PatchError(
                        f"{other.patch.name} uses {added.target}, added by "
                        f"{record.patch.name}; revert {other.patch.name} first, or replace "
                        "both with a cumulative patch"
                    )


class _RevertHooks:
    def __init__(self, record: _Record) -> None:
        self.record = record

    def finalize(self, t: Transition | None) -> None:
        name = self.record.patch.name
        handing_over = pace.Yielder()  # see _ApplyHooks.finalize
        with LOCK:
            for slot in self.record.slots:
                handing_over()
                slot.stack = [v for v in slot.stack if v.patch != name]
                slot.install(slot.effective())
                redirect.discard_if_idle(slot)
            for added in reversed(self.record.added):
                added.remove()
            if self.record in _applied:
                _applied.remove(self.record)

    def complete(self, t: Transition | None) -> None:
        _adopt_stragglers(self.record.slots)
        log.info("livepatch: %s: unpatch transition completed", self.record.patch.name)
        _run_callbacks(self.record.patch, "post_unpatch", veto=False)

    def unwind(self, t: Transition | None, error: PatchError | None) -> None:
        with LOCK:
            for slot in self.record.slots:
                slot.install(slot.effective())
            self.record.state = "applied"
        log.info("livepatch: %s: unpatch transition reversed", self.record.patch.name)


# -- callbacks and refusals -----------------------------------------------------------


#: what to do after a veto. A pre_unpatch that always raises would pin its patch for
#: good (force is about transitions, not callbacks): say where the way out is
_AFTER_VETO = {
    "pre_unpatch": "; nothing was changed. If it vetoes for no good reason, a patch with "
    "cumulative=True supersedes this one without running its unpatch callbacks",
}


def _run_callbacks(patch: Patch, kind: str, *, veto: bool) -> list[str]:
    errors: list[str] = []
    callbacks: list[Callable[[], Any]] = getattr(patch.callbacks, kind)
    for fn in callbacks:
        try:
            fn()
        except Exception as exc:
            what = getattr(fn, "__qualname__", repr(fn))
            if veto:
                raise CallbackFailed(
                    f"{patch.name}: {kind} callback {what} vetoed: {type(exc).__name__}: {exc}"
                    + _AFTER_VETO.get(kind, "")
                ) from exc
            message = f"{kind} callback {what} failed: {type(exc).__name__}: {exc}"
            log.error("livepatch: %s: %s", patch.name, message)
            errors.append(message)
    return errors


def _refused(patch: Patch, action: str, exc: PatchError) -> None:
    # the message, not the exception: a handler keeping records would keep its traceback
    # and with it the target module and the patch alive
    log.warning("livepatch: %s: %s refused (%s): %s", patch.name, action, exc.code, str(exc))
    sys.audit("livepatch.refused", patch.name, action, exc.code, str(exc))
