"""Patching a process tree all or nothing: a gunicorn master and every worker.

`apply --tree` finds the master's Python descendants that run an agent (via /proc), then:

1. *plan* in every process (signature, load, resolve, fingerprints) — any refusal stops
   here and nothing has changed anywhere;
2. *apply* in all of them at once, one connection each, streaming progress per pid;
3. if any apply failed, *revert* the patch in every process where it succeeded (or is
   pending), so the tree ends as it began. A process that exits during the operation
   counts as a failure only if it exited before applying (an exiting worker is replaced by
   a fresh one that inherits the master's patches).

Processes where the patched modules are not imported (a master without `--preload`) keep
the patch *pending* and apply it when the module is imported (see `persist`) — unless no
process of the tree has imported them, which is most often a wrong module name: that is
refused unless the caller asked to defer.

A patch of ``__main__`` changes the script of the process the command named. A
descendant running another program (a multiprocessing resource tracker, a ``python -c``
helper, another script) has nothing to patch: it is *skipped*, with the reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livepatch.agent import discovery
from livepatch.agent.client import AgentClient
from livepatch.errors import PatchError

#: seconds a Python descendant without an agent is given to start one (a worker being
#: forked or spawned as the command looks) before the tree is refused
AGENT_START = 2.0


class TreeFailed(PatchError):
    """The patch failed in one process of the tree; the others were put back."""

    code = "tree-failed"


class Unmanaged(PatchError):
    """A Python process of the tree has no agent: the tree cannot be patched whole."""

    code = "tree-unmanaged"


class RollbackFailed(PatchError):
    """The patch failed somewhere and could not be reverted everywhere else."""

    code = "rollback-failed"


@dataclass
class Member:
    """One process of the tree and what happened to it."""

    pid: int
    command: str
    #: waiting, planned, running, applied, deferred, skipped, failed, exited, reverted
    state: str = "waiting"
    master: bool = False
    error: str | None = None
    code: str | None = None
    transition: dict[str, Any] | None = None
    #: who held up its transition when it timed out (task, frames), if it did
    blockers: list[dict[str, Any]] | None = None
    #: while its agent does not answer: for how long, and what /proc makes of it
    note: str | None = None
    #: why it was skipped
    reason: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def failed(self, exc: PatchError) -> None:
        """Record `exc`, and the transition as it ended (not its last progress, which
        may show it on its way back) with a timeout's blockers."""
        self.error, self.code = str(exc), exc.code
        self.transition = exc.details.get("transition", self.transition)
        self.blockers = exc.details.get("blockers", self.blockers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "command": self.command,
            "state": self.state,
            "master": self.master,
            "error": self.error,
            "code": self.code,
            "transition": self.transition,
            "blockers": self.blockers,
            "reason": self.reason,
            "not_recorded": self.result.get("not_recorded"),
        }


def tree_members(master: int) -> list[Member]:
    """The master and its descendants that have an agent.

    The master must have one — unless it does not run Python at all (a shell script or
    an init such as tini starting the Python processes, as in many containers): then the
    tree is its Python descendants, and there must be at least one."""
    sockets = discovery.agent_sockets()
    try:
        discovery.find_socket(master)
        pids = [master]
    except discovery.NoAgent:
        if discovery.runs_python(master) is not False:
            raise  # with what to do: a Python master without an agent
        pids = []
    pids += [pid for pid in discovery.children(master) if pid in sockets]
    if not pids:
        info = discovery.process_info(master)
        raise discovery.NoAgent(
            f"process {master} ({info.command_line[:60] if info else '?'}) does not run "
            "Python, and no process under it has a livepatch agent; start them with "
            "'livepatch run -- CMD' (it reaches the Python processes a script starts)"
        )
    members = []
    for pid in pids:
        info = discovery.process_info(pid)
        if info is not None:
            members.append(Member(pid=pid, command=info.command_line, master=pid == master))
    return members


def refuse_unmanaged(master: int, members: list[Member]) -> None:
    """Refuse a tree whose Python descendants do not all run an agent: they could run the
    patched code and stay unpatched while the command said the tree was done (a master
    given an agent by ``livepatch attach`` after it forked its workers).

    A worker being forked or spawned as the command looks gets its agent within a moment:
    it is given :data:`AGENT_START` seconds, and joins `members` if its agent comes."""
    have = {m.pid for m in members}
    missing = [pid for pid in discovery.children(master)
               if pid not in have and discovery.runs_python(pid)]
    deadline = time.monotonic() + AGENT_START
    while missing and time.monotonic() < deadline:
        time.sleep(0.05)
        sockets = discovery.agent_sockets()
        for pid in [pid for pid in missing if pid in sockets]:
            missing.remove(pid)
            info = discovery.process_info(pid)
            if info is not None:
                members.append(Member(pid=pid, command=info.command_line))
        missing = [pid for pid in missing if discovery.process_info(pid) is not None]
    if not missing:
        return
    pids = ", ".join(str(pid) for pid in missing)
    raise Unmanaged(
        f"pid {pids} in the tree of pid {master} run{'s' if len(missing) == 1 else ''} "
        "Python without a livepatch agent, so the patch cannot reach "
        f"{'it' if len(missing) == 1 else 'them'}; start one with 'livepatch attach PID' in "
        "each (or start the program with 'livepatch run'), then apply again"
    )


def with_main(
    request: dict[str, Any],
    master: int,
    on_silence: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """`request` for the members of the master's tree: with ``tree_main``, the script the
    master runs as ``__main__`` (see ``_other_program`` in operations), if it runs one."""
    with AgentClient(master) as client:
        main = client.request("status", on_silence=on_silence).get("main")
    return {**request, "tree_main": main} if isinstance(main, str) else request


def plan_tree(
    members: list[Member], request: dict[str, Any], on_update: Callable[[Member], None]
) -> None:
    """Plan in every member at once (``tree_main`` in `request` says whose script
    ``__main__`` is); each ends planned, skipped or failed, its answer in ``result``."""
    args: dict[str, Any] = {
        k: request[k] for k in ("text", "filename", "signature", "tree_main") if k in request
    }
    args["defer"] = True
    _each(members, lambda m: _plan(m, args, on_update))


def apply_tree(
    members: list[Member],
    request: dict[str, Any],
    on_update: Callable[[Member], None],
    *,
    timeout: float,
    defer: bool | None = None,
) -> None:
    """Plan, apply everywhere, roll back on failure. Raises TreeFailed/RollbackFailed.

    `defer`: True, keep the patch pending where its modules are not imported; None, the
    same, but refuse if no process has imported them; False, refuse wherever one is not.
    """
    master = next((m for m in members if m.master), None)
    if master is not None:  # (no master: it does not run Python, so has no __main__ to patch)
        try:
            request = with_main(request, master.pid, _silence(master, on_update))
        finally:
            master.note = None
    plan_tree(members, request, on_update)
    refused = [m for m in members if m.state == "failed"]
    if refused:
        first = refused[0]
        raise TreeFailed(
            f"pid {first.pid} refused the patch, so no process was changed: {first.error}"
        )
    _refuse_waiting(members, defer)
    live = [m for m in members if m.state != "skipped"]
    _each(live, lambda m: _apply(m, {**request, "defer": True}, on_update, timeout))
    failed = [m for m in members if m.state == "failed"]
    if not failed:
        return
    name = next((m.result.get("patch") for m in members if m.result.get("patch")), None)
    done = [m for m in members if m.state in ("applied", "deferred")]
    if name:
        _each(done, lambda m: _revert(m, name, request, on_update, timeout))
    stuck = [m for m in done if m.state != "reverted"]
    first = failed[0]
    if stuck:
        raise RollbackFailed(
            f"pid {first.pid} failed ({first.error}) and the patch could not be reverted in "
            f"pid {', '.join(str(m.pid) for m in stuck)}; revert it there by hand with "
            "'livepatch revert NAME --pid N'"
        )
    raise TreeFailed(
        f"pid {first.pid} failed ({first.error}); the patch was reverted in the "
        f"{len(done)} process(es) where it had applied"
    )


def _refuse_waiting(members: list[Member], defer: bool | None) -> None:
    """Refuse a patch that would only wait, where the caller did not ask it to."""
    live = [m for m in members if m.state != "skipped"]
    waiting = [m for m in live if m.result.get("missing_modules")]
    if not waiting or defer is True or (defer is None and len(waiting) < len(live)):
        return
    modules = sorted({name for m in waiting for name in m.result["missing_modules"]})
    hints = {h for m in waiting for h in m.result.get("hints") or []}
    where = (f"pid {waiting[0].pid} has not imported" if defer is False
             else f"no process of the tree of pid {members[0].pid} has imported")
    raise TreeFailed(
        f"{where} {', '.join(modules)}, so the patch would only wait for the import; "
        + ("; ".join(sorted(hints)) if hints else "check the module name")
        + ", or pass --defer to apply it when it is imported"
    )


def _silence(member: Member, on_update: Callable[[Member], None]) -> Callable[[float, str], None]:
    def note(waited: float, why: str) -> None:
        member.note = f"no answer from its agent for {waited:.0f}s; {why}"
        on_update(member)

    return note


def _each(members: list[Member], work: Callable[[Member], None]) -> None:
    threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _plan(member: Member, args: dict[str, Any], on_update: Callable[[Member], None]) -> None:
    try:
        with AgentClient(member.pid) as client:
            member.result = client.request("plan", read_timeout=60.0,
                                           on_silence=_silence(member, on_update), **args)
        member.state = "skipped" if member.result.get("state") == "skipped" else "planned"
        member.reason = member.result.get("reason")
    except PatchError as exc:
        member.state = "failed"
        member.failed(exc)
    member.note = None
    on_update(member)


def _apply(
    member: Member,
    args: dict[str, Any],
    on_update: Callable[[Member], None],
    timeout: float,
) -> None:
    def progress(message: dict[str, Any]) -> None:
        member.note = None
        if "transition" in message:  # not a heartbeat
            member.transition = message["transition"]
        on_update(member)

    member.state = "running"
    on_update(member)
    try:
        with AgentClient(member.pid) as client:
            member.result = client.request("apply", progress, read_timeout=timeout + 60.0,
                                           on_silence=_silence(member, on_update), **args)
        member.state = str(member.result.get("state", "applied"))
        member.transition = member.result.get("transition") or member.transition
    except PatchError as exc:
        gone = discovery.process_info(member.pid) is None
        # a worker that exits mid-apply is replaced by a fork of the (patched) master
        member.state = "exited" if gone and not member.master else "failed"
        member.failed(exc)
    member.note = None
    on_update(member)


def _revert(
    member: Member,
    name: str,
    request: dict[str, Any],
    on_update: Callable[[Member], None],
    timeout: float,
) -> None:
    args = {"name": name, "model": request.get("model", "hybrid"), "timeout": timeout}
    try:
        with AgentClient(member.pid) as client:
            client.request("revert", read_timeout=timeout + 60.0,
                           on_silence=_silence(member, on_update), **args)
        member.state = "reverted"
    except PatchError as exc:
        if discovery.process_info(member.pid) is None:
            member.state = "reverted"  # gone, and its patch with it
        else:
            member.failed(exc)
    member.note = None
    on_update(member)
