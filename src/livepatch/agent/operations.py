"""What each agent request does inside the target process.

Every operation runs in an agent connection thread and talks to the process only through
the public livepatch API (`loads`, `plan`, `apply`, `revert`, `patches`, `transition`).
The order inside `apply` is the security argument: the signature is checked on the bytes
received *before* the patch file is executed, and the patch is loaded in a fresh
namespace under a filename that says where it came from, so tracebacks from patched code
point at the patch file.

Long operations stream `progress` messages by polling the `Transition` (state, tasks
switched of total, blockers). If the client goes away mid-transition the operation carries
on: the transition finishes or reverses by itself (the engine owns its timeout), and the
outcome is still audited and recorded.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

from livepatch.agent import protocol
from livepatch.agent.audit import AuditLog, AuditRecord
from livepatch.agent.peercred import Peer
from livepatch.agent.persist import (
    DeferredPatches,
    PatchRecord,
    Pending,
    ProgramRecords,
    target_keys,
    target_modules,
)
from livepatch.agent.signing import TrustedKeys
from livepatch.errors import PatchError, TargetNotFound

#: how often a running transition is polled for progress
POLL_INTERVAL = 0.05
#: a progress message is sent at least this often even when nothing changed
HEARTBEAT = 1.0


@dataclass
class AgentState:
    """What every operation shares: trust, the audit log, records and pending patches."""

    trusted: TrustedKeys
    audit: AuditLog
    records: ProgramRecords
    deferred: DeferredPatches
    started_at: float
    socket: str


@dataclass
class Request:
    """One validated request and where it came from."""

    op: str
    args: dict[str, Any]
    peer: Peer
    #: sends one message to the client; returns False once the client is gone
    send: Callable[[dict[str, Any]], bool]


def dispatch(state: AgentState, request: Request) -> dict[str, Any]:
    """Run `request`; return its result message (errors are raised as PatchError)."""
    handler = _HANDLERS[request.op]
    return handler(state, request)


def hello(state: AgentState, request: Request) -> dict[str, Any]:
    import livepatch

    return protocol.result(
        protocol=protocol.PROTOCOL_VERSION,
        pid=os.getpid(),
        uid=os.getuid(),
        argv=list(sys.argv),
        python=sys.version.split()[0],
        executable=sys.executable,
        livepatch=getattr(livepatch, "__version__", "?"),
        signatures_required=state.trusted.required,
        trusted_keys=state.trusted.ids,
        program=state.records.key,
        socket=state.socket,
        agent_started_at=state.started_at,
        audit_log=str(state.audit.path),
    )


def status(state: AgentState, request: Request) -> dict[str, Any]:
    from livepatch import core

    applied, current = core.snapshot()
    return protocol.result(
        pid=os.getpid(),
        argv=list(sys.argv),
        main=main_file(),
        program=state.records.key,
        patches=[_applied_dict(p) for p in applied],
        pending=state.deferred.describe(),
        transition=current.to_dict() if current is not None else None,
        signatures_required=state.trusted.required,
        audit_error=state.audit.error,
    )


def plan(state: AgentState, request: Request) -> dict[str, Any]:
    """Dry run: verify signature, load, resolve and verify every target; change nothing."""
    import livepatch

    patch = None
    try:
        patch = _load(state, request)
        other = _other_program(patch, request.args)
        missing = [m for m in target_modules(patch) if m not in sys.modules]
        if other:
            answer = protocol.result(patch=patch.name, sha256=patch.sha256, state="skipped",
                                     reason=other, changes=[], notes=[other], running=[],
                                     missing_modules=[])
        elif missing and request.args.get("defer", False):
            # nothing to verify here yet: the patch would wait for these imports
            hints = _main_script_hints(patch, missing)
            answer = protocol.result(
                patch=patch.name,
                sha256=patch.sha256,
                changes=[],
                notes=[f"would wait for the import of {', '.join(missing)}", *hints],
                running=[],
                missing_modules=missing,
                hints=hints,
            )
        else:
            result = livepatch.plan(patch)
            changes = [
                {"target": c.target, "verified": c.verified, "note": c.note} for c in result.changes
            ]
            answer = protocol.result(
                patch=patch.name,
                sha256=patch.sha256,
                changes=changes,
                notes=list(result.notes),
                running=running_targets(patch),
                missing_modules=missing,
            )
    except BaseException as exc:
        _audit(state, request, "plan", patch, error=exc)
        raise
    _audit(state, request, "plan", patch)
    return answer


def apply(state: AgentState, request: Request) -> dict[str, Any]:
    import livepatch

    args = request.args
    model = args.get("model", "hybrid")
    patch = None
    try:
        patch = _load(state, request)
        record = PatchRecord(
            name=patch.name,
            sha256=patch.sha256 or "",
            text=args["text"],
            filename=patch.source_path or "<patch>",
            signature=args.get("signature"),
            model=model,
        )
        other = _other_program(patch, args)
        if other:
            _audit(state, request, "apply", patch, model=model, outcome="skipped")
            return protocol.result(patch=patch.name, sha256=patch.sha256, state="skipped",
                                   reason=other, transition=None)
        missing = [m for m in target_modules(patch) if m not in sys.modules]
        if missing and args.get("defer", False):
            return _defer(state, request, patch, record, missing)
        transition = livepatch.apply(
            patch,
            model=model,
            timeout=float(args.get("timeout", 30.0)),
            force=bool(args.get("force", False)),
            wait=False,
        )
        final = _follow(transition, request, float(args.get("timeout", 30.0)))
        if transition.error is not None:
            raise _ended(transition.error, final)
        if not transition.leaves_patched:
            raise _ended(livepatch.TransitionReversed(
                f"{patch.name}: a revert turned the apply around before it completed; "
                "the patch is not applied"
            ), final)
    except BaseException as exc:
        _audit(state, request, "apply", patch, model=model, error=exc)
        raise
    _audit(state, request, "apply", patch, model=model)
    not_recorded = None
    if "__main__" in target_modules(patch):
        # a later process runs its script into __main__ only after the agent has started:
        # a record would apply too early, find nothing, and leave that process unpatched
        not_recorded = ("it patches __main__, whose functions a later process defines only "
                        "as its script runs; move that code into a module to record it")
    elif args.get("persist", True):
        _record(state, add=record)
    return protocol.result(patch=patch.name, sha256=patch.sha256, state="applied",
                           transition=final, not_recorded=not_recorded)


def revert(state: AgentState, request: Request) -> dict[str, Any]:
    import livepatch

    args = request.args
    name = args["name"]
    model = args.get("model", "hybrid")
    sha = _applied_sha(name)
    try:
        if state.deferred.remove(name):
            final: dict[str, Any] | None = None
            outcome = "cancelled"
        else:
            transition = livepatch.revert(
                name,
                model=model,
                timeout=float(args.get("timeout", 30.0)),
                force=bool(args.get("force", False)),
                wait=False,
            )
            final = _follow(transition, request, float(args.get("timeout", 30.0)))
            if transition.error is not None:
                raise _ended(transition.error, final)
            if transition.leaves_patched:
                raise _ended(livepatch.TransitionReversed(
                    f"{name}: the revert was turned around before it completed; the patch "
                    "is still applied"
                ), final)
            outcome = "reverted"
    except BaseException as exc:
        _audit(state, request, "revert", None, name=name, sha=sha, model=model, error=exc)
        raise
    _audit(state, request, "revert", None, name=name, sha=sha, model=model)
    _record(state, remove=name)
    return protocol.result(patch=name, sha256=sha, state=outcome, transition=final)


_HANDLERS: dict[str, Callable[[AgentState, Request], dict[str, Any]]] = {
    "hello": hello,
    "status": status,
    "plan": plan,
    "apply": apply,
    "revert": revert,
}


def running_targets(patch: Any) -> list[dict[str, Any]]:
    """Which tasks (threads, asyncio tasks) run a function the patch changes right now.

    A snapshot — tasks keep running — taken from the same view of tasks and stacks the
    transition uses, plus suspended generators/coroutines and greenlets that hold such a
    frame.
    """
    from livepatch import heap, locate

    codes: dict[CodeType, str] = {}
    for spec in patch.functions:
        try:
            target = locate.resolve(spec.target)
        except Exception:  # unresolved targets are reported by plan() already
            continue
        codes[target.code] = spec.target
    if not codes:
        return []
    try:
        with heap.looking_only():  # a dry run: leave a frozen heap frozen
            return _running_in_tasks(codes)
    except Exception:  # the engine's task view changed: fall back to plain threads
        return _running_in_threads(codes)


def _running_in_tasks(codes: dict[CodeType, str]) -> list[dict[str, Any]]:
    from livepatch import greenlets, tasks

    snapshot = sys._current_frames()
    found = []
    for info in tasks.all_tasks():
        hits = [
            f"{codes[f.f_code]} ({tasks.describe(f)})"
            for f in tasks.frames_of(info, snapshot)
            if f.f_code in codes
        ]
        if hits:
            found.append({"task": info.name, "frames": hits})
    for gen in tasks.suspended_with(codes):
        frame = tasks.frame_of(gen)
        if frame is not None:
            found.append({"task": tasks.describe_gen(gen), "frames": [codes[frame.f_code]]})
    for who, frames in greenlets.holding(codes):
        found.append({"task": who,
                      "frames": [f"{codes[f.f_code]} ({tasks.describe(f)})" for f in frames]})
    return found


def _running_in_threads(codes: dict[CodeType, str]) -> list[dict[str, Any]]:
    names = {t.ident: t.name for t in threading.enumerate()}
    found = []
    for ident, frame in sys._current_frames().items():
        hits = []
        f: FrameType | None = frame
        while f is not None:
            if f.f_code in codes:
                hits.append(f"{codes[f.f_code]} ({f.f_code.co_filename}:{f.f_lineno})")
            f = f.f_back
        if hits:
            found.append({"task": f"thread {names.get(ident, ident)}", "frames": hits})
    return found


def restore(state: AgentState, on_error: Callable[[str], None]) -> list[str]:
    """Bring recorded patches back in a freshly started process; return their names.

    Patches whose modules are loaded are applied now; the rest wait for their import.
    """
    import livepatch

    applied = {p.name for p in livepatch.patches()}
    restored = []
    for record in state.records.load():
        if record.name in applied or record.name in state.deferred.names():
            continue  # a forked child inherits its parent's patches
        try:
            state.trusted.verify(record.text.encode(), record.signature)
            patch = livepatch.loads(record.text, filename=record.filename)
        except PatchError as exc:
            on_error(f"recorded patch {record.name} not restored: {exc}")
            continue
        missing = [m for m in target_modules(patch) if m not in sys.modules]
        pending = Pending(patch, record, missing, _deferred_done(state, None))
        if missing:
            state.deferred.add(pending)
        else:
            # start() was called late, with the modules loaded and maybe running: apply
            # under the recorded model without making start() wait for the transition
            threading.Thread(
                target=_restore_now, args=(pending,), name="livepatch-restore", daemon=True
            ).start()
        restored.append(record.name)
    return restored


def _restore_now(pending: Pending) -> None:
    import livepatch

    error: BaseException | None = None
    try:
        livepatch.apply(pending.patch, model=pending.record.model, wait=True)
    except BaseException as exc:
        error = exc
    pending.on_done(pending, error)


def _load(state: AgentState, request: Request) -> Any:
    import livepatch

    text = request.args["text"]
    state.trusted.verify(text.encode("utf-8"), request.args.get("signature"))
    filename = request.args.get("filename") or f"<patch sent by pid {request.peer.pid}>"
    return livepatch.loads(text, filename=filename)


def main_file() -> str | None:
    """The script this process runs as ``__main__`` (its real path), or None (``-c``,
    stdin, an interactive session)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return os.path.realpath(path) if path and os.path.exists(path) else None


def _main_script_hints(patch: Any, missing: list[str]) -> list[str]:
    """For a module not imported that is this process's script (see
    ``locate.main_script_hint``), what to name instead."""
    from livepatch.locate import main_script_hint

    keys = target_keys(patch)
    hints = []
    for module in missing:
        key = next(k for k in keys if k.partition(":")[0] == module)
        hint = main_script_hint(module, key)
        if hint:
            hints.append(hint)
    return hints


def _other_program(patch: Any, args: dict[str, Any]) -> str | None:
    """In a tree (`tree_main`: the script of the process the command named), why this
    process does not run the program whose ``__main__`` the patch changes — a
    multiprocessing resource tracker, a ``python -c`` helper, another script — or None.

    Such a process has nothing to patch: the tree skips it. A patch of ``__main__`` and of
    modules as well cannot be half applied here; that is refused."""
    if "tree_main" not in args or "__main__" not in target_modules(patch):
        return None
    mine, theirs = main_file(), args["tree_main"]
    if mine == theirs:
        return None
    what = f"its __main__ is {mine}" if mine else "its __main__ has no file (python -c)"
    others = [m for m in target_modules(patch) if m != "__main__"]
    if others:
        raise TargetNotFound(
            f"this process runs another program ({what}, not {theirs}), and the patch "
            f"changes {', '.join(others)} as well as __main__; split it into a patch of "
            "__main__ and one of the modules"
        )
    return f"runs another program: {what}, not {theirs}"


def _defer(
    state: AgentState,
    request: Request,
    patch: Any,
    record: PatchRecord,
    missing: list[str],
) -> dict[str, Any]:
    import livepatch

    if patch.name in {p.name for p in livepatch.patches()} or patch.name in state.deferred.names():
        from livepatch.errors import AlreadyApplied

        raise AlreadyApplied(f"{patch.name} is applied already; revert it first")
    state.deferred.add(Pending(patch, record, missing, _deferred_done(state, request.peer)))
    _audit(state, request, "apply", patch, model=record.model, outcome="deferred")
    if request.args.get("persist", True):
        _record(state, add=record)
    return protocol.result(
        patch=patch.name,
        sha256=patch.sha256,
        state="deferred",
        waiting_for=missing,
        hints=_main_script_hints(patch, missing),
        transition=None,
    )


def _deferred_done(
    state: AgentState, peer: Peer | None
) -> Callable[[Pending, BaseException | None], None]:
    def done(pending: Pending, error: BaseException | None) -> None:
        code = "ok" if error is None else getattr(error, "code", "internal-error")
        state.audit.write(
            AuditRecord(
                event="apply",
                result=code,
                peer_uid=peer.uid if peer else None,
                peer_pid=peer.pid if peer else None,
                patch=pending.record.name,
                sha256=pending.record.sha256,
                model=pending.record.model if not pending.modules else "immediate",
                message=(
                    ("restored from the program's records" if peer is None else "applied")
                    + (" when its module was imported" if pending.modules else "")
                    if error is None
                    else _one_line(error)
                ),
            )
        )
        if error is not None:
            print(
                f"livepatch agent: patch {pending.record.name} could not be applied: "
                f"{_one_line(error)}",
                file=sys.stderr,
            )

    return done


def _ended(error: PatchError, final: dict[str, Any]) -> PatchError:
    """`error`, carrying the transition as it ended (the client's last progress frame
    showed it mid-way, perhaps on its way back)."""
    error.details["transition"] = final
    return error


def _follow(transition: Any, request: Request, timeout: float) -> dict[str, Any]:
    """Stream progress until the transition ends; keep following if the client left."""
    last: dict[str, Any] | None = None
    last_sent = 0.0
    client = True
    # The engine enforces the timeout; this bound only protects the agent thread.
    deadline = time.monotonic() + timeout + 60.0
    while not transition.done and time.monotonic() < deadline:
        snapshot = transition.to_dict()
        comparable = {k: v for k, v in snapshot.items() if k not in ("elapsed", "paused")}
        now = time.monotonic()
        if client and (comparable != last or now - last_sent >= HEARTBEAT):
            client = request.send(protocol.progress(transition=snapshot))
            last, last_sent = comparable, now
        time.sleep(POLL_INTERVAL)
    return dict(transition.to_dict())


def _record(
    state: AgentState, *, add: PatchRecord | None = None, remove: str | None = None
) -> None:
    """Bring the program's records in line with what is applied here now."""
    import livepatch

    live = {p.name for p in livepatch.patches()} | set(state.deferred.names())

    def change(records: list[PatchRecord]) -> list[PatchRecord]:
        kept = [r for r in records if r.name in live and r.name != remove]
        if add is not None:
            kept = [r for r in kept if r.name != add.name] + [add]
        return kept

    try:
        state.records.update(change)
    except OSError as exc:
        print(
            f"livepatch agent: cannot record patches in {state.records.path}: {exc}",
            file=sys.stderr,
        )


def _audit(
    state: AgentState,
    request: Request,
    event: str,
    patch: Any,
    *,
    name: str | None = None,
    sha: str | None = None,
    model: str | None = None,
    error: BaseException | None = None,
    outcome: str = "ok",
) -> None:
    if error is not None:
        outcome = getattr(error, "code", None) or "internal-error"
    state.audit.write(
        AuditRecord(
            event=event,
            result=outcome,
            peer_uid=request.peer.uid,
            peer_pid=request.peer.pid,
            patch=getattr(patch, "name", None) or name,
            sha256=getattr(patch, "sha256", None) or sha,
            model=model,
            message=_one_line(error) if error is not None else None,
        )
    )


def _applied_sha(name: str) -> str | None:
    import livepatch

    for applied in livepatch.patches():
        if applied.name == name:
            return getattr(applied, "sha256", None)
    return None


def _applied_dict(applied: Any) -> dict[str, Any]:
    to_dict = getattr(applied, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    return {"name": applied.name, "state": str(getattr(applied, "state", "?"))}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__
