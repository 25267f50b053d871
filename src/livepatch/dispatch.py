"""Dispatch: per-task choice between the old and the new version while a transition runs.

During a ``two_universe`` or ``hybrid`` transition every live function object of the
patch runs a *trampoline* instead of its own code. The trampoline asks which universe the
calling task is in and calls a clone of the old or the new version (a ``FunctionType``
built on that version's code with the live function's globals and closure cells, so both
share every variable). When the transition completes the engine installs the new code
directly and the trampoline is gone: no steady-state cost. Clones, trampolines and their
states are built before the transition starts (:meth:`Universe.prepare`, tens of µs per
function); the transition itself only stores them, checks the tasks and finalizes, so the
other threads wait on it as little as possible.

The trampoline must have the same free variables as the function it sits in (CPython
refuses a ``__code__`` whose free-variable count differs from the closure), so it is
compiled per set of free-variable names: a dead ``if 0: (a, b)`` reference makes them free
without using them. Where both versions have the same parameters and default values it
declares exactly those parameters and forwards them as they are (no ``*args, **kwargs``
packing). Its state is one tuple under a unique name in the builtins dict the function
sees, so the fast path is one frame and a specialised global load. A generator, coroutine
or async-generator function gets a trampoline of its own kind that delegates to the
version it picks (CPython 3.13 deprecates giving a function code of another kind); the
pick then happens when the object first runs, on the stack of whoever resumes it.

**The rule** (what makes "no stack runs old and new at once" hold): a call dispatches to
the version of the *nearest enclosing frame on the current stack that runs any version of
a function of the patch*; if there is none (the stack is clean), to the universe of the
task. A task's universe only matters when its stack is clean, so switching a clean task
is always safe; the hard part is doing without the stack walk on the fast path.

**Fast path** (lock-free; a few loads and one C call, ``ContextVar.get``): taken when no
flag in :attr:`Universe.slow` is up and the calling context carries this epoch's mark
(:data:`SWITCHED`). The slow path marks a context when it finds its task at the goal with
a clean stack; from then on that task holds no frame of the non-goal version: the only way
to reach one is to resume a generator or coroutine that runs one — and while any such
object exists, the ``lingering`` flag is up and every call takes the slow path (they are
all known: the ones that existed before the transition are found by a garbage-collector
scan, the ones created since were created here). A context is per task (each asyncio Task
runs in its own, each thread has its own), so one task left behind slows only itself, not
every task on its thread. The mark is a new object each time the goal flips, so a
reversal unmarks every context at once. Contexts are copied (a new Task inherits its
creator's), which is safe because a copy starts on a clean stack — except where a copy
runs on top of a non-goal frame: an event loop run from inside an old version of a patched
function (``check_all`` sees it and raises ``foreign``: slow path for all), or a context
shared between a switched and a behind Task via ``create_task(context=...)`` (seen on 3.12+,
same flag). Not seen: a patched function that itself runs callbacks with
``Context.run`` in contexts copied from switched tasks, while its old version is running.

**Slow path**: walk the stack (``f_back``) for the nearest patched frame; if none, look up
the task's record: behind the goal in ``hybrid`` means "a call into the patch made from a
clean stack" — switch it now; in ``two_universe`` it keeps its universe until a safe point.

Every mutation of records, flags and registries happens under :attr:`Universe.lock`;
the fast path and :func:`Universe.slow_call`'s reads are the named lock-free paths (a
dict/set membership test is atomic under the GIL).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import sys
import threading
import types
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import CodeType, FrameType, FunctionType
from typing import Any, NamedTuple

from livepatch import heap, tasks
from livepatch.errors import UnsafeChange
from livepatch.pace import BULK, Yielder, paced
from livepatch.redirect import KEEP, Version

OLD, NEW = 0, 1
_KIND_FLAGS = 0x20 | 0x80 | 0x200  # generator, coroutine, async generator
#: the trampoline's one global: in the template, renamed per function (see _Entry)
STATE_NAME = "__livepatch_state__"
_ids = itertools.count()
#: per context (an asyncio Task's, a thread's): the mark of the transition epoch in which
#: its task was seen at the goal with a clean stack (see "Fast path" above)
SWITCHED: contextvars.ContextVar[object] = contextvars.ContextVar("livepatch_switched")
_NEVER = object()  # a mark no context carries
#: what a finished transition's trampoline reads for the mark: a "context variable" every
#: context carries, and the mark it carries (see Universe.remove)
_ALWAYS = object()
_EVERYWHERE = {None: _ALWAYS}
_NO_FLAGS: dict[str, bool] = {}  # never written
#: the trampoline codes of finished transitions, weakly, with where their state lies
#: (builtins dict, name). Only code that runs a trampoline reads its state, and it holds
#: the code: a frame that entered it, a generator or coroutine made from it and not yet
#: started (which may first run minutes later). So a state may go once its code is gone.
#: Keyed by the reference's id: a code object hashes (slowly) by value
_tombstones: dict[int, tuple[weakref.ref[CodeType], dict[str, Any], str]] = {}
#: states whose trampoline code is gone. A code can die in any thread at any moment (a
#: garbage collection): the callback only moves its entry here, and the sweep, at the
#: start of a transition, takes the names out of the builtins
_buried: list[tuple[dict[str, Any], str]] = []


def _bury(ref: weakref.ref[CodeType]) -> None:
    found = _tombstones.pop(id(ref), None)
    if found is not None:
        _buried.append(found[1:])


#: names swept out of the builtins, to be used again. A name is interned with the code
#: that reads it, and an interned string lives for good on 3.12+ (it is immortal): a new
#: name per function per transition would grow the process for as long as it is patched
_free_names: list[str] = []


def _sweep_tombstones() -> None:
    """Take out of the builtins the states that no trampoline can read any more."""
    while _buried:
        holder, name = _buried.pop()
        holder.pop(name, None)
        _free_names.append(name)


def _state_name() -> str:
    """A builtins name no live trampoline reads."""
    try:
        return _free_names.pop()
    except IndexError:
        return f"__livepatch_{next(_ids)}__"


_templates: dict[tuple[Any, ...], CodeType] = {}
_templates_lock = threading.Lock()

_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08


class Signature(NamedTuple):
    """The parameter list of a code object, enough to forward a call exactly (a named
    tuple: two are made and compared per function a transition installs)."""

    posonly: tuple[str, ...]
    positional: tuple[str, ...]
    varargs: str | None
    kwonly: tuple[str, ...]
    varkw: str | None

    @classmethod
    def of(cls, code: CodeType) -> Signature:
        names = code.co_varnames
        npos, nkw = code.co_argcount, code.co_kwonlyargcount
        i = npos + nkw
        varargs = names[i] if code.co_flags & _CO_VARARGS else None
        i += bool(varargs)
        varkw = names[i] if code.co_flags & _CO_VARKEYWORDS else None
        return cls(
            names[: code.co_posonlyargcount],
            names[code.co_posonlyargcount : npos],
            varargs,
            names[npos : npos + nkw],
            varkw,
        )

    def source(self, ndefaults: int) -> tuple[str, str, str, str]:
        """(parameter list, forwarding call arguments, args tuple, kwargs dict) source."""
        positional = self.posonly + self.positional
        first_default = len(positional) - ndefaults
        params = []
        for i, name in enumerate(positional):
            params.append(f"{name}=None" if i >= first_default else name)
            if self.posonly and i == len(self.posonly) - 1:
                params.append("/")
        if self.varargs or self.kwonly:
            params.append(f"*{self.varargs}" if self.varargs else "*")
        params.extend(f"{name}=None" for name in self.kwonly)
        if self.varkw:
            params.append(f"**{self.varkw}")
        args = list(positional) + ([f"*{self.varargs}"] if self.varargs else [])
        kwargs = [f"{name}={name}" for name in self.kwonly]
        kwargs += [f"**{self.varkw}"] if self.varkw else []
        pack_a = "(" + "".join(f"{a}, " for a in args) + ")"
        pack_k = "{" + ", ".join([f"{n!r}: {n}" for n in self.kwonly]
                                 + ([f"**{self.varkw}"] if self.varkw else [])) + "}"
        return ", ".join(params), ", ".join(args + kwargs), pack_a, pack_k


_GENERIC = ("*__lp_a", "*__lp_a, **__lp_k", "__lp_a", "__lp_k")
_GENERATOR, _COROUTINE, _ASYNC_GENERATOR, _ITERABLE_COROUTINE = 0x20, 0x80, 0x200, 0x100

# An async generator cannot ``yield from``: the trampoline forwards the protocol itself
# (values out, asend/athrow/aclose in), as PEP 380 spells out for ``yield from``.
_FORWARD_ASYNC = """\
        __lp_n = __lp_g.__anext__
        try:
            __lp_x = await __lp_n()
        except StopAsyncIteration:
            return
        while True:
            try:
                __lp_y = yield __lp_x
            except GeneratorExit:
                await __lp_g.aclose()
                raise
            except BaseException as __lp_e:
                try:
                    __lp_x = await __lp_g.athrow(__lp_e)
                except StopAsyncIteration:
                    return
            else:
                try:
                    __lp_x = await (__lp_n() if __lp_y is None else __lp_g.asend(__lp_y))
                except StopAsyncIteration:
                    return
"""


def _template(
    freevars: tuple[str, ...], sig: Signature | None, ndefaults: int, kind: int = 0
) -> CodeType:
    """The trampoline code for these free-variable names, this signature and this kind.

    With `sig` None the trampoline is generic: ``(*args, **kwargs)``. With a signature it
    declares exactly the target's parameters and forwards them as they are (no tuple and
    dict to pack and unpack: about a third of the cost).

    `kind` (the target's generator/coroutine/async-generator flag) makes the trampoline
    that kind too, delegating to the version it picks: CPython deprecates giving a
    function code of another kind (3.13). The pick then happens when the object is first
    resumed — on the stack of the task that resumes it, which is where the rule looks.
    """
    key = (freevars, sig, ndefaults, kind)
    code = _templates.get(key)  # made once per shape: a plain read finds it after that
    if code is not None:
        return code
    with _templates_lock:
        code = _templates.get(key)
        if code is not None:
            return code
        if sig is None:
            params, call, pack_a, pack_k = (
                "*__lp_a, **__lp_k", *_GENERIC[1:]
            )
        else:
            params, call, pack_a, pack_k = sig.source(ndefaults)
        # generic: skip the empty kwargs dict, the common case (half the cost of a call)
        fast = (
            f"({STATE_NAME}[3](*__lp_a, **__lp_k) if __lp_k else {STATE_NAME}[3](*__lp_a))"
            if sig is None
            else f"{STATE_NAME}[3]({call})"
        )
        slow = f"__lp_p({pack_a}, {pack_k})"
        define = "async def" if kind & (_COROUTINE | _ASYNC_GENERATOR) else "def"
        if kind & _ASYNC_GENERATOR:
            pick = (f"            __lp_g = {fast}\n"
                    "        else:\n"
                    f"            __lp_g = {slow}\n"
                    f"{_FORWARD_ASYNC}")
        else:
            wrap = {0: "{}", _GENERATOR: "(yield from {})", _COROUTINE: "await {}"}[kind]
            pick = (f"            return {wrap.format(fast)}\n"
                    f"        return {wrap.format(slow)}\n")
        bind = f"    {' = '.join(freevars)} = None\n" if freevars else ""
        use = f"        if 0: ({', '.join(freevars)},)\n" if freevars else ""
        source = (
            "def __lp_ctx__():\n"
            f"{bind}"
            f"    {define} __lp_trampoline__({params}):\n"
            f"{use}"
            f"        __lp_s, __lp_v, __lp_m, __lp_f, __lp_p = {STATE_NAME}\n"
            # After ``get`` (a C call: the GIL may change hands there) the mark to match,
            # the flags and the version are all read afresh, so a transition turned
            # around meanwhile is seen: decision and call are one uninterruptible stretch.
            f"        if __lp_v.get(None) is {STATE_NAME}[2] and not __lp_s:\n"
            f"{pick}"
            "    return __lp_trampoline__\n"
        )
        outer = compile(source, "<livepatch dispatch>", "exec").co_consts[0]
        inner = next(c for c in outer.co_consts if isinstance(c, CodeType))
        if inner.co_freevars != freevars:
            raise UnsafeChange(
                f"cannot build a dispatch trampoline for free variables {freevars}; "
                "use model='stop' or 'immediate' for this patch"
            )
        _templates[key] = inner
        return inner


def _same(a: Any, b: Any) -> bool:
    """Same default values, element by element identity (a default is shared state)."""
    if a is b:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    return False


def trampoline_for(
    func: FunctionType, old: Version, new: Version, defaults: Any, kwdefaults: Any, name: str
) -> tuple[CodeType, bool]:
    """A trampoline for `func` reading its state from the global `name`, and whether it
    forwards the exact signature.

    Exact forwarding passes the trampoline's own defaults on to the version it calls, so it
    is used only when both versions have the same parameters and the very same defaults.
    """
    code = func.__code__
    sig: Signature | None = Signature.of(old.code)
    eff = [
        (defaults if v.defaults is KEEP else v.defaults,
         kwdefaults if v.kwdefaults is KEEP else v.kwdefaults)
        for v in (old, new)
    ]
    if (
        sig != Signature.of(new.code)
        or not _same(eff[0][0], eff[1][0])
        or not _same(eff[0][1], eff[1][1])
        or any(n.startswith("__lp_") for n in old.code.co_varnames)
    ):
        sig = None
    ndefaults = len(eff[0][0] or ()) if sig is not None else 0
    base = _template(code.co_freevars, sig, ndefaults, code.co_flags & _KIND_FLAGS)
    names = tuple(name if n == STATE_NAME else n for n in base.co_names)
    # a @types.coroutine generator can be awaited: so must its trampoline
    flags = base.co_flags | (code.co_flags & _ITERABLE_COROUTINE)
    return (
        base.replace(co_name=code.co_name, co_qualname=code.co_qualname, co_names=names,
                     co_flags=flags),
        sig is not None,
    )


def _outermost(frames: list[FrameType], bad: list[FrameType], thread: bool) -> str | None:
    root = bad[-1] if thread else bad[0]  # a thread's frames run innermost first
    return root.f_code.co_qualname if tasks.outermost(frames, root, thread) else None


class Record:
    """One task known to the transition, and the universe it is in (a plain class with
    slots: a transition makes one per task, a thousand at a time)."""

    __slots__ = ("blocking", "info", "outermost", "side")

    def __init__(self, info: tasks.TaskInfo, side: int) -> None:
        self.info = info
        self.side = side
        #: frames that kept it from switching the last time it was checked
        self.blocking: Sequence[str] = ()
        #: the function of those that is where the task's work starts (it returns only
        #: when the task ends: no safe point comes), if one is (see tasks.outermost)
        self.outermost: str | None = None


#: no defaults and no kwdefaults (one shared pair rather than one per function)
_NO_DEFAULTS = (None, None)


@dataclass(eq=False, slots=True)
class _Entry:
    """One live function object under dispatch."""

    func: FunctionType
    versions: tuple[Version, Version]
    clones: tuple[FunctionType, FunctionType]
    saved_defaults: Any
    saved_kwdefaults: Any
    trampoline: CodeType
    #: the trampoline declares the target's own parameters (see trampoline_for)
    exact: bool

    #: the builtins name the trampoline reads its state from (unique per function)
    global_name: str
    #: the function's code when the entry was made (install checks it is still there)
    original: CodeType
    #: the builtins dict the function sees, where its state goes
    builtins: dict[str, Any]
    #: the state left under `global_name` once dispatch ends (see Universe.remove)
    tombstone: tuple[Any, ...]
    #: what the trampoline reads from `global_name`
    state: tuple[Any, ...] = ()
    #: the defaults and kwdefaults the function carries with the trampoline in (made by
    #: prepare, stored by install)
    defaults_in: tuple[Any, Any] = (None, None)

    def makes_gen(self, side: int) -> bool:
        """Whether `side`'s version makes a generator, coroutine or async generator."""
        return bool(self.versions[side].code.co_flags & _KIND_FLAGS)

    def trampoline_defaults(self) -> tuple[Any, Any]:
        if not self.exact:
            return _NO_DEFAULTS
        version = self.versions[0]
        d = self.saved_defaults if version.defaults is KEEP else version.defaults
        kw = self.saved_kwdefaults if version.kwdefaults is KEEP else version.kwdefaults
        if kw:
            return d, dict(kw)
        return _NO_DEFAULTS if d is None else (d, None)

    def final(self, side: int) -> tuple[CodeType, Any, Any]:
        """What remove stores for `side`: its code, defaults and kwdefaults (a copy)."""
        version = self.versions[side]
        d = self.saved_defaults if version.defaults is KEEP else version.defaults
        kw = self.saved_kwdefaults if version.kwdefaults is KEEP else version.kwdefaults
        return version.code, d, dict(kw) if kw else None


_RUN_LOOP = {asyncio.BaseEventLoop.run_forever.__code__}
#: Tasks show their context from 3.12 (``get_context``); on 3.11 a Task made with
#: ``create_task(context=...)`` cannot be checked for a shared mark
_TASK_CONTEXTS = hasattr(asyncio.Task, "get_context")
#: records check_all looks at per hold of the lock
_CHECK_CHUNK = 32


def _under_a_loop(frames: list[FrameType], bad: list[FrameType], hosts_tasks: bool) -> bool:
    """Whether a thread holds a non-goal frame *below* an event loop it runs: contexts of
    other tasks (marked ones too) then run on top of that frame. `frames` innermost first.
    A loop with no Python ``run_forever`` frame (uvloop): any non-goal frame counts."""
    for i, frame in enumerate(frames):
        if frame.f_code in _RUN_LOOP:
            below = {id(f) for f in frames[i + 1:]}
            return any(id(f) in below for f in bad)
    return hosts_tasks


def _builtins_of(func: FunctionType) -> dict[str, Any]:
    found: dict[str, Any] = getattr(func, "__builtins__")  # typeshed lacks the attribute
    return found


def _clone(func: FunctionType, version: Version, defaults: Any, kwdefaults: Any) -> FunctionType:
    d = defaults if version.defaults is KEEP else version.defaults
    kw = kwdefaults if version.kwdefaults is KEEP else version.kwdefaults
    clone = types.FunctionType(version.code, func.__globals__, func.__name__, d, func.__closure__)
    clone.__kwdefaults__ = dict(kw) if kw else None
    clone.__qualname__ = func.__qualname__
    clone.__module__ = func.__module__
    return clone


class Universe:
    """The dispatch state of one transition: trampolines, task records, universes."""

    def __init__(self, changes: list[Any], *, hybrid: bool) -> None:
        self.changes = changes
        self.hybrid = hybrid
        self.goal = NEW
        self.lock = threading.RLock()
        #: any key here sends every call down the slow path: "installing", "reversing",
        #: "scanning", "lingering", "unchecked", "foreign"
        self.slow: dict[str, bool] = {"unchecked": True}
        #: this epoch's mark (see SWITCHED); a new one each time the goal flips
        self.mark = object()
        self.records: dict[Any, Record] = {}
        #: id(code) → side, for every version of every function of the patch
        self.sides: dict[int, int] = {}
        #: generators/coroutines of each side created while dispatching (or found by a
        #: scan): id → weak reference
        self.gens: tuple[dict[int, Any], dict[int, Any]] = ({}, {})
        self.entries: list[_Entry] = []
        self.total = 0
        self.installed = False
        #: dispatch is over (:meth:`remove`); unlike ``not installed``, which is also
        #: true while trampolines are still going in and the clones already serve calls
        self.ended = False
        self._signalled: set[int] = set()  # loops with a pending _loop_safepoint
        #: entries built by prepare() and not installed yet
        self._ready: list[_Entry] | None = None
        for change in changes:
            # a frame of an enclosing function is on the side of the closures it makes
            for side in (OLD, NEW):
                for code in change.enclosing[side]:
                    self.sides[id(code)] = side
        for change in changes:
            self.sides[id(change.old.code)] = OLD
            self.sides[id(change.new.code)] = NEW

    # -- installing and removing trampolines ------------------------------------------

    def prepare(self) -> None:
        """Build every clone, trampoline and state, storing nothing yet.

        This is the bulk of a transition's work per function (tens of µs each: two
        clones, a trampoline code object, the states), and it changes nothing that any
        other thread can see, so it runs before the transition starts — paced, like
        planning — and the transition itself is only the stores. For 100 functions and no
        other thread that took the transition from 2.1 to 2.5 ms to 0.5 to 1 ms
        (``benchmarks/bench_transition.py --sections 3``; section 2 shows what a ticker
        sees).
        """
        _sweep_tombstones()
        pace = Yielder()
        ready = []
        with paced(when=sum(len(c.slot.funcs) for c in self.changes) >= BULK):
            for change in self.changes:
                for func in change.slot.funcs:
                    ready.append(self._prepare(func, change.old, change.new))
                pace()
        self._ready = ready

    def install(self, caller_frame: FrameType | None) -> None:
        """Put trampolines in, then record every existing task as behind (old universe).

        While trampolines go in (``installing``) every call takes the slow path and the
        old version — some functions still run their old code directly, so nobody may
        run a new version yet — and nobody switches. That needs no lock, so a thread
        calling into the patch meanwhile does not wait for the whole install. Clones and
        trampolines were built by :meth:`prepare`, so that window is only the stores.
        """
        if self._ready is None:
            self.prepare()
        ready, self._ready = self._ready or [], []
        pace = Yielder()
        # from the first store to the end of the first check no hand-over may happen
        # (every call takes the slow path meanwhile): start with half a period left
        pace(ahead=pace.every / 2)
        self.slow["installing"] = True
        try:
            entries = self.entries
            for entry in ready:
                func = entry.func
                if (func.__code__ is not entry.original
                        or func.__defaults__ is not entry.saved_defaults
                        or func.__kwdefaults__ is not entry.saved_kwdefaults):
                    entry = self._prepare(func, *entry.versions)  # changed meanwhile
                d, kw = entry.defaults_in
                # The state lives in the builtins the function sees (``func.__builtins__``):
                # a specialised LOAD_GLOBAL finds it in a few ns, and no module namespace
                # changes.
                entry.builtins[entry.global_name] = entry.state
                # Three stores with no call or backward jump between them: no other thread
                # can run in between (the GIL is only handed over at those points).
                func.__code__ = entry.trampoline
                func.__defaults__ = d
                func.__kwdefaults__ = kw
                entries.append(entry)
            with self.lock:
                self.installed = True
                caller = tasks.current_key()
                started_new = 0  # counted as switched: it holds no record
                for info in tasks.all_tasks():
                    if info.key == caller and self._clean(caller_frame):
                        started_new = 1  # the caller is at a safe point: it starts new
                        continue
                    self.records[info.key] = Record(info, OLD)
                # not +1 for the caller regardless: the agent's thread, which applies patches
                # sent with the command, is livepatch's own and no task (see all_tasks)
                self.total = len(self.records) + started_new
                if self._gen_codes(OLD):
                    self.slow["scanning"] = True
                # before the lock goes: a safe point must not switch a task while calls
                # still go to the old version regardless of records
                self.slow.pop("installing", None)
        finally:
            self.slow.pop("installing", None)

    def _prepare(self, func: FunctionType, old: Version, new: Version) -> _Entry:
        defaults, kwdefaults = func.__defaults__, func.__kwdefaults__
        clones = (_clone(func, old, defaults, kwdefaults), _clone(func, new, defaults, kwdefaults))
        name = _state_name()
        trampoline, exact = trampoline_for(func, old, new, defaults, kwdefaults, name)
        entry = _Entry(
            func,
            (old, new),
            clones,
            defaults,
            kwdefaults,
            trampoline,
            exact,
            name,
            func.__code__,
            _builtins_of(func),
            # what remove() leaves behind (see there), made now to keep remove to stores
            (_NO_FLAGS, _EVERYWHERE, _ALWAYS, func, None),
        )
        entry.state = self._state(entry)
        entry.defaults_in = entry.trampoline_defaults()
        return entry

    def _state(self, entry: _Entry) -> tuple[Any, ...]:
        # of the unbound method: a bound one would be one more object per function
        slow_call = functools.partial(Universe.slow_call, self, entry)
        return (self.slow, SWITCHED, self.mark, entry.clones[self.goal], slow_call)

    def remove(self, side: int) -> None:
        """Install `side`'s version directly on every function (dispatch ends)."""
        pace = Yielder()
        with self.lock:
            for entry in self.entries:
                # every task is on `side` and the lock keeps it so: functions already
                # done and trampolines still in place run the same version meanwhile
                pace()
                func = entry.func
                code, d, kw = entry.final(side)
                # three stores with no call between them (see install)
                func.__code__ = code
                func.__defaults__ = d
                func.__kwdefaults__ = kw
                # A thread may have entered the trampoline and not yet loaded its state
                # (the GIL can change hands at the frame's start), and may run it only
                # after another transition has begun: leave a state that calls the live
                # function again, so it goes wherever calls go *then*. Its fast path does
                # (no flags; every context "carries" its mark). Dropped once nothing
                # holds the trampoline's code any more (_tombstones).
                entry.builtins[entry.global_name] = entry.tombstone
                ref = weakref.ref(entry.trampoline, _bury)
                _tombstones[id(ref)] = (ref, entry.builtins, entry.global_name)
                # the state's slow path (a partial of this universe's method, holding the
                # entry) makes a cycle: break it, so the transition's objects go with
                # their last reference instead of waiting for the cyclic collector
                entry.state = ()
            self.entries = []
            self.installed = False
            self.ended = True

    # -- the slow path ---------------------------------------------------------------------

    def slow_call(self, entry: _Entry, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # frame 0: here; 1: the trampoline (functools.partial adds no frame); then the
        # caller, or none: C may call a patched function first on a stack (a greenlet's
        # run, _thread.start_new_thread)
        side = self.nearest(sys._getframe(1).f_back)  # a fact about this stack: cannot go stale
        from_universe = side is None
        rec = None
        mark = _NEVER
        installing = side is None and "installing" in self.slow
        if installing:
            side = OLD  # see install(): the universe everyone is in until it ends
        elif side is None:
            mark = self.mark  # before the goal: reverse() writes the goal, then the mark
            rec = self._record_of_caller()
            # The universe decision is read here and acted on at once: from this line to
            # the callee's frame there is no call, loop or function entry, so the GIL
            # cannot change hands and no switch or reversal can slip in between.
            side = self.goal if rec is None or self.hybrid else rec.side
        if self.ended:
            # this transition ended while we were on our way here (the GIL changed hands
            # in the walk or the lookup): go wherever calls go now
            return entry.func(*args, **kwargs)
        if side == self.goal and from_universe and (rec is None or rec.side == side):
            # A clean stack at the goal: mark this task's context so its next calls take
            # the fast path. Set after the call, on this same clean stack (setting is a
            # C call, which must not sit between the decision and the callee); a mark
            # of an epoch that has since ended matches nothing.
            try:
                return entry.clones[side](*args, **kwargs)
            finally:
                SWITCHED.set(mark)
        if not entry.makes_gen(side) or side == self.goal:
            return entry.clones[side](*args, **kwargs)
        # A generator/coroutine of the non-goal version: from now until it is gone, any
        # task may resume it, so the fast path is off (see the module docstring).
        with self.lock:  # no reversal can happen while it is held: decide again inside
            if self.ended:
                return entry.func(*args, **kwargs)
            if from_universe and not installing:
                side = self.goal if rec is None or self.hybrid else rec.side
            fn = entry.clones[side]
            if side == self.goal:
                return fn(*args, **kwargs)
            self.slow["lingering"] = True
            obj = fn(*args, **kwargs)
            self._register(obj, side)
        return obj

    def nearest(self, frame: FrameType | None) -> int | None:
        """The side of the nearest frame running a version of the patch, if any."""
        sides = self.sides
        while frame is not None:
            side = sides.get(id(frame.f_code))
            if side is not None:
                return side
            frame = frame.f_back
        return None

    def _record_of_caller(self) -> Record | None:
        """The calling task's record (None: unknown, i.e. born during the transition).
        ``hybrid`` switches it here: a call into the patch from a clean stack."""
        key = tasks.current_key()
        rec = self.records.get(key)
        if rec is None and "reversing" in self.slow:
            with self.lock:  # wait for the enumeration to finish, then look again
                rec = self.records.get(key)
        if rec is not None and rec.side != self.goal and self.hybrid:
            self.switch(rec)
        return rec

    def switch(self, rec: Record) -> int:
        """Move `rec` to the goal (its stack is known clean); returns the goal."""
        with self.lock:
            if rec.side != self.goal:
                rec.side = self.goal
                rec.blocking = []
            return self.goal

    def _clean(self, frame: FrameType | None) -> bool:
        other = 1 - self.goal
        sides = self.sides
        return all(sides.get(id(f.f_code)) != other for f in tasks.walk(frame))

    def safepoint(self, frame: FrameType | None) -> bool:
        """The calling task declares a safe point; switch it if its stack is clean."""
        rec = self.records.get(tasks.current_key())
        if rec is None or rec.side == self.goal:
            return True
        # The check and the switch against one goal (no reversal between). A safe point
        # runs no patched code, so it need not wait while the worker holds the lock
        # checking every task: it only misses this chance to switch.
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if "installing" in self.slow or not self._clean(frame):
                return False
            self.switch(rec)
        finally:
            self.lock.release()
        return True

    # -- generators and coroutines ---------------------------------------------------------

    def _register(self, obj: Any, side: int) -> None:
        registry = self.gens[side]
        key = id(obj)

        def gone(ref: Any, registry: dict[int, Any] = registry, key: int = key) -> None:
            if registry.get(key) is ref:
                registry.pop(key, None)

        try:
            registry[key] = weakref.ref(obj, gone)
        except TypeError:  # not weak-referenceable: keep it until it finishes
            registry[key] = lambda obj=obj: obj

    def _gen_codes(self, side: int) -> list[CodeType]:
        """Code of every generator/coroutine/async-generator version on `side`."""
        codes = [c.old.code if side == OLD else c.new.code for c in self.changes]
        return [code for code in codes if code.co_flags & _KIND_FLAGS]

    def scan(self) -> int:
        """Find generators/coroutines of the non-goal side that predate the dispatch."""
        if "scanning" not in self.slow:
            return 0
        # held across the scan: the goal must not flip under it. A thread waiting for
        # the lock may hold logging's: the scan's log line waits until it is released
        with heap.logs_held(), self.lock:
            other = 1 - self.goal
            found = tasks.suspended_with(self._gen_codes(other))
            for obj in found:
                self._register(obj, other)
            if self.gens[other]:
                self.slow["lingering"] = True
            self.slow.pop("scanning", None)
        return len(found)

    def lingering(self) -> list[Any]:
        """Live generators/coroutines of the non-goal side that still hold a frame."""
        out = []
        for ref in list(self.gens[1 - self.goal].values()):
            obj = ref()
            if obj is not None and tasks.frame_of(obj) is not None:
                out.append(obj)
        return out

    def prune(self) -> list[Any]:
        """Forget finished generators; drop the ``lingering`` flag when none is left."""
        with self.lock:
            registry = self.gens[1 - self.goal]
            alive = []
            for key, ref in list(registry.items()):
                obj = ref()
                if obj is None or tasks.frame_of(obj) is None:
                    registry.pop(key, None)
                else:
                    alive.append(obj)
            if not alive and "scanning" not in self.slow:
                self.slow.pop("lingering", None)
            return alive

    # -- checking and switching tasks from outside ----------------------------------------

    def check_all(self, *, switch: bool) -> None:
        """Look at every task behind the goal: forget dead ones, switch clean ones
        (``switch=True``: hybrid), note what blocks the others.

        Takes the lock a few records at a time, so that tasks switching themselves (a
        safe point, a clean call in ``hybrid``) are not held up by a check of a thousand
        tasks. Between two chunks a task may have moved on since the snapshot; that is
        harmless, because a task behind with a clean stack cannot get an old frame back
        except through the slow path (which switches it in ``hybrid``) or an old
        generator (which keeps the fast path off). A reversal meanwhile ends the check.
        """
        sides = self.sides
        with self.lock:
            goal = self.goal
            snapshot = sys._current_frames()
            items = list(self.records.items())
            loop_threads = {r.info.thread for _, r in items if not r.info.is_thread}
        other = 1 - goal
        pace = Yielder()
        foreign = False
        thread_of = tasks.loop_threads()
        contexts = _TASK_CONTEXTS
        for start in range(0, max(len(items), 1), _CHECK_CHUNK):
            with self.lock:
                if self.goal != goal:
                    return  # turned around: the next check starts afresh
                for key, rec in items[start:start + _CHECK_CHUNK]:
                    if rec.side == goal:
                        continue
                    if not tasks.is_alive(rec.info, snapshot):
                        rec.side = goal  # a task that ended holds nothing
                        rec.blocking = []
                        continue
                    if not rec.info.is_thread:
                        rec.info.thread = thread_of(key.get_loop())
                        foreign = foreign or (contexts and self._shares_a_mark(key))
                    frames = tasks.frames_of(rec.info, snapshot)
                    bad = [f for f in frames if sides.get(id(f.f_code)) == other]
                    if bad:
                        rec.blocking = [tasks.describe(f) for f in bad]
                        rec.outermost = _outermost(frames, bad, rec.info.is_thread)
                        foreign = foreign or (
                            rec.info.is_thread
                            and _under_a_loop(frames, bad, key in loop_threads)
                        )
                    elif switch:
                        rec.side = goal
                        rec.blocking = []
                    else:
                        rec.blocking = ["(waiting for a safe point)"]
                if start + _CHECK_CHUNK >= len(items):
                    # in the same hold as the last chunk: a hand-over before it would let
                    # every other thread run its calls down the slow path meanwhile (and
                    # right after install, that is every call)
                    if foreign:
                        self.slow["foreign"] = True
                    else:
                        self.slow.pop("foreign", None)
                    self.slow.pop("unchecked", None)
                    break
            pace()
        del snapshot

    def _shares_a_mark(self, task: Any) -> bool:
        """A Task behind the goal whose context carries this epoch's mark (a context
        shared through ``create_task(context=...)``): marks cannot be trusted."""
        get_context = getattr(task, "get_context", None)
        return get_context is not None and get_context().get(SWITCHED) is self.mark

    def signal_loops(self) -> int:
        """``two_universe``: ask every running event loop hosting a task behind the goal
        to switch its suspended tasks between two callbacks (kGraft's "fake signal").

        Between callbacks no task of that loop is running and no other thread can run
        one, so a Task suspended at an ``await`` is parked at a boundary, like a kernel
        task asleep in a syscall: its coroutine chain is all it holds. Returns how many
        loops were signalled.
        """
        loops: dict[int, Any] = {}
        threads = {r.info.key for r in self.behind() if r.info.is_thread}
        for rec in self.behind():
            if not rec.info.is_thread:
                loop = rec.info.key.get_loop()
                loops[id(loop)] = loop
        if threads:  # a loop thread's own record switches between callbacks too
            for info in tasks.all_tasks():
                if not info.is_thread and info.thread in threads:
                    loop = info.key.get_loop()
                    loops[id(loop)] = loop
        sent = 0
        for key, loop in loops.items():
            if key in self._signalled or not loop.is_running() or loop.is_closed():
                continue
            self._signalled.add(key)
            try:
                loop.call_soon_threadsafe(self._loop_safepoint, loop)
                sent += 1
            except RuntimeError:  # closed meanwhile
                self._signalled.discard(key)
        return sent

    def _loop_safepoint(self, loop: Any) -> None:
        # runs in the loop's thread, between two callbacks: no task of `loop` is running
        self._signalled.discard(id(loop))
        sides = self.sides
        with self.lock:
            other = 1 - self.goal
            me = tasks.get_ident()
            for rec in self.behind():
                if rec.info.is_thread:
                    if rec.info.key == me and self._clean(sys._getframe(1)):
                        rec.side = self.goal
                    continue
                task = rec.info.key
                if task.get_loop() is not loop:
                    continue
                frames = [tasks.frame_of(c) for c in tasks.chain(task.get_coro())]
                if all(f is None or sides.get(id(f.f_code)) != other for f in frames):
                    rec.side = self.goal
                    rec.blocking = []

    def behind(self) -> list[Record]:
        # list() copies in one C call: records may be added meanwhile (reverse)
        return [r for r in list(self.records.values()) if r.side != self.goal]

    def switched(self) -> int:
        return self.total - len(self.behind())

    def done(self) -> bool:
        return not self.behind() and not self.prune() and "scanning" not in self.slow

    # -- reversing -------------------------------------------------------------------------

    def reverse(self, caller_frame: FrameType | None) -> None:
        """Flip the goal: tasks that reached the new universe must go back."""
        with self.lock:
            self.slow["reversing"] = True
            try:
                before = self.goal
                caller = tasks.current_key()
                for info in tasks.all_tasks():
                    self.records.setdefault(info.key, Record(info, before))
                self.goal = 1 - before
                self.mark = object()  # after the goal (see slow_call): old marks now fail
                self.slow["unchecked"] = True
                rec = self.records.get(caller)
                if rec is not None and rec.side != self.goal and self._clean(caller_frame):
                    rec.side = self.goal
                for entry in self.entries:
                    entry.builtins[entry.global_name] = self._state(entry)
                self.total = len(self.records)
                if self._gen_codes(1 - self.goal):
                    self.slow["scanning"] = True
                    self.slow["lingering"] = True
            finally:
                self.slow.pop("reversing", None)

