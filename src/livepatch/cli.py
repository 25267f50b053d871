"""The `livepatch` command: patch running Python processes by pid.

Every command talks to the agent inside the target process (see `livepatch.agent`), shows
what happens with rich, and takes `--json` for scripts: then it prints exactly one JSON
document on stdout, also on failure (`{"ok": false, "code": ..., "message": ...}`).
Failures are one line on stderr saying what to do, and the exit code says what kind of
failure it was (`EXIT_CODES`, shown by `livepatch --help`).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from livepatch.agent import audit, boot, discovery, fleet, paths, signing
from livepatch.agent.client import AgentClient, LostConnection, Unreachable
from livepatch.agent.protocol import MODELS
from livepatch.errors import NotApplied, PatchError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_LOST = 4
EXIT_PARTIAL = 5

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_REFUSED: "refused or failed: the target (or the check) said no; nothing was changed",
    EXIT_USAGE: "bad usage or unreadable input file",
    EXIT_UNREACHABLE: "no such process, no agent in it, or its agent cannot be reached",
    EXIT_LOST: "the connection was lost mid-operation (target exited?); run 'status'",
    EXIT_PARTIAL: "--tree: the patch failed somewhere and could not be reverted everywhere",
}

_UNREACHABLE_CODES = {
    discovery.NoSuchProcess.code,
    discovery.NoAgent.code,
    Unreachable.code,
    "peer-refused",
    "agent-busy",
}

STARTUP_DIR = Path(__file__).parent / "_startup"

# Piped output is read by people in logs and CI, not cut to 80 columns: give it room.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CommandFailed(Exception):
    """A failure detected by the command itself (not by a target)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE, code: str = "usage") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, CommandFailed):
        return exc.exit_code
    if isinstance(exc, fleet.RollbackFailed):
        return EXIT_PARTIAL
    if isinstance(exc, LostConnection):
        return EXIT_LOST
    code = getattr(exc, "code", "")
    if code in _UNREACHABLE_CODES:
        return EXIT_UNREACHABLE
    return EXIT_REFUSED


def _fail(exc: BaseException, as_json: bool) -> NoReturn:
    code = getattr(exc, "code", "error")
    message = " ".join(str(exc).split()) or type(exc).__name__
    if as_json:
        document = {"ok": False, "code": code, "message": message}
        details = getattr(exc, "details", {})
        _print_json(document | {k: v for k, v in details.items() if k not in document})
    else:
        err.print(Text(f"livepatch: error: {message}", style="red"))
    sys.exit(exit_code_for(exc))


def handles_errors(fn: F) -> F:
    """Turn PatchError/CommandFailed into one line (or one JSON document) and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except (PatchError, CommandFailed) as exc:
            _fail(exc, as_json)
        except KeyboardInterrupt:
            err.print("livepatch: interrupted; the target carries on with what its agent had "
                      "started (a request it had not started yet is dropped)")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _silence(pid: int) -> Callable[[float, str], None]:
    """What to say (on stderr, so --json stays one document) while the agent of `pid`
    does not answer."""

    def say(waited: float, why: str) -> None:
        err.print(f"livepatch: pid {pid}: no answer from its agent for {waited:.0f}s; {why}; "
                  "still waiting (Ctrl-C gives up: a request the agent has not started yet "
                  "is dropped)")

    return say


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document instead of text."
    )(fn)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _help_epilog() -> str:
    lines = ["\b", "Exit codes:"]
    lines += [f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()]
    lines += ["  130  interrupted (Ctrl-C)"]
    return "\n".join(lines)


@click.group(epilog=_help_epilog(), context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="livepatch", prog_name="livepatch")
def main() -> None:
    """Live-patch running Python processes (kpatch/kGraft consistency models for CPython).

    Start a program with an agent (`livepatch run -- CMD`), then apply, inspect and
    revert patch files in it by pid.
    """


# ---------------------------------------------------------------------------- run


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Require patches signed by this Ed25519 public key (repeatable).",
)
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handles_errors
def run(command: tuple[str, ...], trusted_keys: tuple[str, ...], as_json: bool) -> None:
    """Run COMMAND with the agent in it and in every Python process it starts.

    Example: livepatch run -- gunicorn -w 4 app:application
    """
    env = dict(os.environ)
    env[boot.AGENT_ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(STARTUP_DIR), env.get("PYTHONPATH", "")] if p
    )
    if trusted_keys:
        keys = [str(Path(k).resolve()) for k in trusted_keys]
        old = env.get(signing.TRUSTED_KEYS_ENV)
        env[signing.TRUSTED_KEYS_ENV] = os.pathsep.join(keys + ([old] if old else []))
    if as_json:
        _print_json({"ok": True, "pid": os.getpid(), "command": list(command)})
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise CommandFailed(
            f"cannot run {command[0]!r}: {exc.strerror}; check the command name and PATH"
        ) from None


# ----------------------------------------------------------------------------- ps


@main.command()
@json_option
@handles_errors
def ps(as_json: bool) -> None:
    """List processes that run an agent: pid, command, applied patches."""
    rows = []
    for pid, path in discovery.agent_sockets().items():
        info = discovery.process_info(pid)
        if info is None:
            continue
        row: dict[str, Any] = {
            "pid": pid,
            "ppid": info.ppid,
            "uid": info.uid,
            "command": info.command_line,
            "socket": str(path),
        }
        try:
            with AgentClient(pid, timeout=2.0, path=path) as client:
                status = client.request("status")
            row["patches"] = [p.get("name") for p in status.get("patches", [])]
            row["pending"] = [p.get("name") for p in status.get("pending", [])]
            transition = status.get("transition")
            row["transition"] = transition.get("state") if transition else None
        except PatchError as exc:
            row["error"] = str(exc)
        rows.append(row)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no processes with a livepatch agent (start one with 'livepatch run -- CMD')")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("PID", "PPID", "UID", "PATCHES", "COMMAND"):
        table.add_column(column, no_wrap=column != "COMMAND")
    for row in rows:
        patches = ", ".join(row.get("patches", [])) or "-"
        if row.get("pending"):
            patches += " (pending: " + ", ".join(row["pending"]) + ")"
        if "error" in row:
            patches = "[red]unreachable[/red]"
        table.add_row(
            str(row["pid"]), str(row["ppid"]), str(row["uid"]), patches, row["command"][:100]
        )
    out.print(table)


# -------------------------------------------------------------------------- apply


def _read_patch(path: str, signature: str | None) -> dict[str, Any]:
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CommandFailed(f"cannot read patch file {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandFailed(f"patch file {path} is not UTF-8 text; save it as UTF-8") from None
    request: dict[str, Any] = {"text": text, "filename": str(file.resolve())}
    sig_path = Path(signature) if signature else Path(str(file) + ".sig")
    if signature or sig_path.exists():
        try:
            request["signature"] = sig_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandFailed(f"cannot read signature {sig_path}: {exc}") from None
    return request


def _transition_view(
    t: dict[str, Any] | None, title: str, blockers_shown: int | None = 10,
    frames_shown: int | None = 3,
) -> Group:
    """A transition: its state, a progress bar, and a table of what blocks it (the first
    `blockers_shown` tasks and `frames_shown` frames of each; None: all)."""
    if not t:
        return Group(Text(title))
    total = int(t.get("tasks_total") or 0)
    switched = int(t.get("tasks_switched") or 0)
    state = _shown_state(t)
    header = Text.assemble(
        (title, "bold"),
        f"  model {t.get('model')}  {t.get('direction')}  ",
        (state, _state_style(state)),
        f"  {float(t.get('elapsed') or 0):.2f}s",
        ("  forced" if t.get("forced") else "", "yellow"),
    )
    bar = ProgressBar(total=max(total, 1), completed=switched if total else 0, width=40)
    tasks = Text(f"  tasks switched {switched}/{total}")
    parts: list[Any] = [header, Group(bar, tasks)]
    blockers = t.get("blockers") or []
    if blockers:
        table = Table(box=None, pad_edge=False, show_header=True)
        table.add_column("blocked task", style="yellow", no_wrap=True)
        table.add_column("old frames")
        for blocker in blockers[:blockers_shown]:
            frames = list(blocker.get("frames") or [])[:frames_shown]
            if blocker.get("outermost"):  # waiting will not help: say so while it waits
                frames.append(f"({blocker['outermost']} is where this task's work starts: "
                              "it returns only when the task ends)")
            table.add_row(str(blocker.get("task")), "\n".join(frames) or "-")
        if blockers_shown is not None and len(blockers) > blockers_shown:
            table.add_row(f"... {len(blockers) - blockers_shown} more", "(--json lists all)")
        parts.append(table)
    return Group(*parts)


def _shown_state(t: dict[str, Any]) -> str:
    """A transition's state, and "reversing" for one running on its way back (after a
    timeout or a revert: its counts now run back towards the old code)."""
    state = str(t.get("state"))
    return "reversing" if state == "running" and t.get("reversed") else state


def _state_style(state: str) -> str:
    return {
        "complete": "green",
        "applied": "green",
        "running": "cyan",
        "reversing": "yellow",
        "reversed": "yellow",
        "failed": "red",
    }.get(state, "")


class _Progress:
    """Shows a transition as it goes: live on a terminal, one line per change otherwise."""

    def __init__(self, title: str, enabled: bool) -> None:
        self.title = title
        self.enabled = enabled
        self.live: Live | None = None
        self.last: tuple[Any, ...] | None = None
        self.noted = -10.0  # when the agent's work before a transition was last shown

    def __enter__(self) -> _Progress:
        if self.enabled and out.is_terminal:
            self.live = Live(_transition_view(None, self.title), console=out, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _working(self, seconds: float) -> None:
        """The agent's heartbeat before any transition: the first, then every 10 s."""
        if seconds - self.noted >= 10:
            self.noted = seconds
            text = (f"{self.title}: working for {seconds:.0f}s (loading and checking the "
                    "patch, running its pre_patch callbacks)")
            if self.live is not None:
                self.live.update(Group(Text(text)))
            else:
                out.print(text)

    def update(self, message: dict[str, Any]) -> None:
        t = message.get("transition")
        if self.enabled and "working" in message and t is None and self.last is None:
            # (a heartbeat can also come between two transition snapshots: not news)
            self._working(float(message["working"]))
        if not self.enabled or not isinstance(t, dict):
            return
        if self.live is not None:
            self.live.update(_transition_view(t, self.title))
            return
        blocked = len(t.get("blockers") or [])
        state = _shown_state(t)
        key = (state, t.get("tasks_switched"), t.get("tasks_total"), blocked)
        if key != self.last:
            self.last = key
            blockers = ", ".join(str(b.get("task")) for b in (t.get("blockers") or [])[:3])
            tasks = (f" tasks {t.get('tasks_switched')}/{t.get('tasks_total')}"
                     if t.get("tasks_total") else "")  # none counted yet (stop, before its check)
            out.print(
                f"{self.title}: {state}{tasks} {float(t.get('elapsed') or 0):.2f}s"
                + (f" blocked by {blockers}" if blockers else "")
            )


@main.command()
@click.argument("patch_file", metavar="PATCH", type=click.Path(dir_okay=False))
@click.option("--pid", type=int, required=True, help="Process to patch.")
@click.option("--model", type=click.Choice(MODELS), default="hybrid", show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(0.001, 86400),
    default=30.0,
    show_default=True,
    help="Seconds the transition may take before it is reversed.",
)
@click.option("--force", is_flag=True, help="Complete the transition at once (marks it forced).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Verify targets and fingerprints; show which threads run them. No change.",
)
@click.option(
    "--tree",
    is_flag=True,
    help="Patch the process and every descendant with an agent, all or nothing.",
)
@click.option(
    "--signature",
    type=click.Path(exists=True, dir_okay=False),
    help="Detached signature (default: PATCH.sig when it exists).",
)
@click.option(
    "--defer/--no-defer",
    default=None,
    help="Where the patched modules are not imported yet, apply on import "
    "(default: on with --tree).",
)
@click.option(
    "--no-persist",
    is_flag=True,
    help="Do not record the patch for processes of this program started later.",
)
@json_option
@handles_errors
def apply(
    patch_file: str,
    pid: int,
    model: str,
    timeout: float,
    force: bool,
    dry_run: bool,
    tree: bool,
    signature: str | None,
    defer: bool | None,
    no_persist: bool,
    as_json: bool,
) -> None:
    """Apply the patch file PATCH to process --pid."""
    request = _read_patch(patch_file, signature)
    if dry_run:
        _dry_run(pid, request, tree, tree if defer is None else defer, as_json)
        return
    request.update(model=model, timeout=timeout, force=force, persist=not no_persist)
    if tree:
        _apply_tree(pid, request, timeout, defer, as_json)
        return
    request["defer"] = bool(defer)
    with AgentClient(pid) as client, _Progress(f"pid {pid}", not as_json) as progress:
        result = client.request("apply", progress.update, read_timeout=timeout + 60.0,
                                on_silence=_silence(pid), **request)
    if as_json:
        _print_json({"ok": True, "pid": pid, **_strip_type(result)})
        return
    _report_outcome(pid, result, verb="applied")


def _report_outcome(pid: int, result: dict[str, Any], verb: str) -> None:
    state = result.get("state")
    t = result.get("transition") or {}
    if state == "deferred":
        out.print(
            f"[green]{result.get('patch')}[/green] pending in pid {pid}: applies when "
            f"{', '.join(result.get('waiting_for', []))} is imported"
        )
        for hint in result.get("hints") or []:
            out.print(f"  [yellow]{hint}[/yellow]")
        return
    if state == "cancelled":
        out.print(f"[green]{result.get('patch')}[/green] was pending in pid {pid}; cancelled")
        return
    forced = " [yellow](forced)[/yellow]" if t.get("forced") else ""
    # a revert of a patch still being applied turns that transition around
    how = "its apply, in flight, turned around: " if t.get("reversed") else ""
    out.print(
        f"[green]{result.get('patch')}[/green] {verb} in pid {pid}{forced}: {how}model "
        f"{t.get('model')}, {t.get('tasks_switched')}/{t.get('tasks_total')} tasks switched "
        f"in {float(t.get('elapsed') or 0):.3f}s"
    )
    if result.get("not_recorded"):
        out.print(f"  [yellow]not recorded for later processes of this program: "
                  f"{result['not_recorded']}[/yellow]")
    past = t.get("forced_past") or []
    if past:
        out.print(f"  [yellow]forced past {len(past)} task(s) in old code; they may mix "
                  "versions until their frames return:[/yellow]")
        for blocker in past:
            out.print(f"    {blocker.get('task')}: {', '.join(blocker.get('frames') or [])}")


def _dry_run(pid: int, request: dict[str, Any], tree: bool, defer: bool, as_json: bool) -> None:
    pids = [pid]
    if tree:  # a dry run refuses what the apply would
        members = fleet.tree_members(pid)
        fleet.refuse_unmanaged(pid, members)
        pids = [m.pid for m in members]
        if any(m.master for m in members):
            request = fleet.with_main(request, pid, _silence(pid))
    results = []
    for target in pids:
        with AgentClient(target) as client:
            args = {**request, "defer": defer}
            planned = client.request("plan", on_silence=_silence(target), **args)
            results.append({"pid": target, **_strip_type(planned)})
    if as_json:
        _print_json({"ok": True, "dry_run": True, "processes": results})
        return
    for res in results:
        if res.get("state") == "skipped":
            out.print(f"[bold]pid {res['pid']}[/bold]: skipped, {res.get('reason')}")
            continue
        out.print(
            f"[bold]pid {res['pid']}[/bold]: {res.get('patch')} would apply "
            f"(sha256 {str(res.get('sha256'))[:12]}); nothing was changed"
        )
        table = Table(box=None, pad_edge=False)
        table.add_column("target")
        table.add_column("verified")
        table.add_column("note")
        for change in res.get("changes", []):
            table.add_row(
                change.get("target", "?"),
                "[green]yes[/green]" if change.get("verified") else "[yellow]no[/yellow]",
                change.get("note") or "",
            )
        if res.get("changes"):
            out.print(table)
        for note in res.get("notes", []):
            out.print(f"  note: {note}")
        running = res.get("running") or []
        if running:
            out.print("  tasks running patched functions right now:")
            for entry in running:
                out.print(f"    {entry['task']}: {'; '.join(entry['frames'])}")
        else:
            out.print("  no task runs a patched function right now")


def _apply_tree(
    pid: int, request: dict[str, Any], timeout: float, defer: bool | None, as_json: bool
) -> None:
    members = fleet.tree_members(pid)
    fleet.refuse_unmanaged(pid, members)

    def view() -> Table:
        table = Table(box=None, pad_edge=False, title=f"tree of pid {pid}")
        for column in ("PID", "STATE", "TASKS", "BLOCKERS", "COMMAND"):
            table.add_column(column, no_wrap=column != "COMMAND")
        for m in members:
            t = m.transition or {}
            tasks = f"{t.get('tasks_switched', '-')}/{t.get('tasks_total', '-')}" if t else "-"
            blockers = ", ".join(str(b.get("task")) for b in (t.get("blockers") or [])[:2])
            state = m.state if not m.error else f"{m.state}: {m.error[:60]}"
            state += f" ({m.note or m.reason})" if m.note or m.reason else ""
            table.add_row(
                str(m.pid),
                Text(state, _state_style(m.state)),
                tasks,
                blockers or "-",
                m.command[:60],
            )
        return table

    live = Live(view(), console=out) if (not as_json and out.is_terminal) else None
    lines_printed: dict[int, tuple[str, str | None]] = {}

    def on_update(member: fleet.Member) -> None:
        if live is not None:
            live.update(view())
        elif not as_json and lines_printed.get(member.pid) != (member.state, member.note):
            lines_printed[member.pid] = (member.state, member.note)
            suffix = f": {member.error}" if member.error else ""
            suffix += f", {member.reason}" if member.reason else ""
            suffix += f" ({member.note})" if member.note else ""
            out.print(f"pid {member.pid}: {member.state}{suffix}")

    error: PatchError | None = None
    if live is not None:
        live.__enter__()
    try:
        fleet.apply_tree(members, request, on_update, timeout=timeout, defer=defer)
    except PatchError as exc:
        error = exc
    finally:
        if live is not None:
            live.update(view())
            live.__exit__(None, None, None)
    if as_json:
        payload: dict[str, Any] = {
            "ok": error is None,
            "processes": [m.to_dict() for m in members],
        }
        if error is not None:
            payload.update(code=error.code, message=str(error))
        _print_json(payload)
        if error is not None:
            sys.exit(exit_code_for(error))
        return
    if error is not None:
        raise error
    out.print(_tree_summary(members, pid))


def _tree_summary(members: list[fleet.Member], pid: int) -> str:
    """``patched 4 process(es) in the tree of pid N; pending in 1 (…); skipped 1 (…)``:
    a pending or skipped process is not patched, and must not be counted as one. Then
    whether processes started later get the patch."""
    applied = [m for m in members if m.state == "applied"]
    line = f"[green]patched {len(applied)} process(es)[/green] in the tree of pid {pid}"
    pending = [m for m in members if m.state == "deferred"]
    if pending:
        modules = sorted({n for m in pending for n in m.result.get("waiting_for") or []})
        line += (f"; pending in {len(pending)} (pid {', '.join(str(m.pid) for m in pending)}: "
                 f"applies when {', '.join(modules)} is imported)")
    skipped = [m for m in members if m.state == "skipped"]
    if skipped:
        line += (f"; skipped {len(skipped)} running another program "
                 f"(pid {', '.join(str(m.pid) for m in skipped)})")
    unrecorded = next((m.result["not_recorded"] for m in applied
                       if m.result.get("not_recorded")), None)
    if unrecorded:
        # a spawned worker started later runs the script afresh: the old code
        line += (f"\n  [yellow]not recorded for processes started later (spawned workers "
                 f"among them): {unrecorded}[/yellow]")
    return line


def _strip_type(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "type"}


# ------------------------------------------------------------------------- revert


@main.command()
@click.argument("name")
@click.option("--pid", type=int, required=True, help="Process to revert the patch in.")
@click.option("--model", type=click.Choice(MODELS), default="hybrid", show_default=True)
@click.option("--timeout", type=click.FloatRange(0.001, 86400), default=30.0, show_default=True)
@click.option("--force", is_flag=True, help="Complete the transition at once.")
@click.option("--tree", is_flag=True, help="Revert in the process and all its descendants.")
@json_option
@handles_errors
def revert(
    name: str, pid: int, model: str, timeout: float, force: bool, tree: bool, as_json: bool
) -> None:
    """Revert the applied patch NAME in process --pid."""
    pids = [m.pid for m in fleet.tree_members(pid)] if tree else [pid]

    def revert_in(target: int) -> dict[str, Any]:
        # a tree's processes revert at once (a fleet reverts in the time of its slowest
        # process, not the sum): then no live view per process, only the outcomes
        shown = not as_json and not tree
        with AgentClient(target) as client, _Progress(f"pid {target}", shown) as progress:
            return client.request(
                "revert",
                progress.update,
                read_timeout=timeout + 60.0,
                on_silence=_silence(target),
                name=name,
                model=model,
                timeout=timeout,
                force=force,
            )

    if not tree:
        outcomes: list[dict[str, Any] | PatchError] = [revert_in(pid)]
    else:
        with ThreadPoolExecutor(max_workers=min(len(pids), 16)) as pool:
            futures = [pool.submit(revert_in, target) for target in pids]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except PatchError as exc:
                outcomes.append(exc)
    # in a tree, a process that never had the patch (one the apply skipped, a helper
    # started since) has nothing to revert, so long as some process had it
    absent = tree and any(not isinstance(o, PatchError) for o in outcomes)
    results = []
    errors: list[tuple[int, PatchError]] = []
    for target, outcome in zip(pids, outcomes, strict=True):
        if absent and isinstance(outcome, PatchError) and outcome.code == NotApplied.code:
            results.append({"pid": target, "ok": True, "state": "absent"})
            if not as_json:
                out.print(f"{name} is not applied in pid {target}: nothing to revert there")
            continue
        if isinstance(outcome, PatchError):
            errors.append((target, outcome))
            results.append({"pid": target, "ok": False, "code": outcome.code,
                            "message": str(outcome)})
            continue
        results.append({"pid": target, **_strip_type(outcome)})
        if not as_json:
            _report_outcome(target, outcome, verb="reverted")
    if as_json:
        _print_json(
            {"ok": not errors, "processes": results} if tree else {"ok": True, **results[0]}
        )
    if errors:
        failed_pid, first = errors[0]
        if not as_json:
            err.print(f"livepatch: error: pid {failed_pid}: {first}")
        sys.exit(exit_code_for(first))


# ------------------------------------------------------------------------- status


@main.command()
@click.option("--pid", type=int, required=True, help="Process to inspect.")
@json_option
@handles_errors
def status(pid: int, as_json: bool) -> None:
    """Show a process's patches, the transition in flight and what blocks it."""
    with AgentClient(pid) as client:
        hello = client.request("hello", on_silence=_silence(pid))
        result = client.request("status", on_silence=_silence(pid))
    if as_json:
        _print_json({"ok": True, **_strip_type(result), "agent": _strip_type(hello)})
        return
    command = " ".join(result.get("argv") or [])[:80]
    out.print(f"[bold]pid {pid}[/bold]  python {hello.get('python')}  {command}")
    out.print(
        f"  signatures {'required' if hello.get('signatures_required') else 'not required'}"
        f"  program {result.get('program')}"
    )
    patches = result.get("patches") or []
    if patches:
        table = Table(box=None, pad_edge=False)
        for column in ("PATCH", "STATE", "FUNCTIONS", "VERIFIED", "APPLIED", "SHA256"):
            table.add_column(column)
        for p in patches:
            applied_at = p.get("applied_at")
            when = (
                time.strftime("%H:%M:%S", time.localtime(float(applied_at)))
                if isinstance(applied_at, (int, float))
                else str(applied_at or "-")
            )
            functions = p.get("functions") or []
            state = str(p.get("state"))
            if p.get("forced"):
                state += " (forced)"
            # verified: the live code was what the patch's expect= said (livepatch build
            # gives it); --json lists the others
            verified = len(functions) - len(p.get("unverified") or [])
            table.add_row(
                str(p.get("name")), state, str(len(functions)), f"{verified}/{len(functions)}",
                when, str(p.get("sha256"))[:12],
            )
        out.print(table)
    else:
        out.print("  no patches applied")
    for pending in result.get("pending") or []:
        out.print(
            f"  pending: {pending['name']} (waits for {', '.join(pending['waiting_for']) or '?'})"
        )
    transition = result.get("transition")
    if transition:
        # every frame, and blockers up to a screenful or so (a loop of a thousand
        # tasks may hold the transition): status is where an engineer looks for them
        out.print(_transition_view(transition, "transition in flight", 50, None))
    else:
        out.print("  no transition in flight")


# ---------------------------------------------------------------------------- log


@main.command()
@click.option(
    "--file",
    "log_file",
    type=click.Path(dir_okay=False),
    help="Audit log to read (default: this user's).",
)
@click.option("-n", "--lines", type=int, default=50, show_default=True, help="Newest N records.")
@click.option("--pid", type=int, help="Only records of this process.")
@json_option
@handles_errors
def log(log_file: str | None, lines: int, pid: int | None, as_json: bool) -> None:
    """Show the audit log: every apply, revert and refusal by the agents of this user."""
    path = Path(log_file) if log_file else paths.audit_log_path()
    records = [r for r in audit.read(path) if pid is None or r.get("pid") == pid]
    records = records[-lines:] if lines > 0 else records
    if as_json:
        _print_json(records)
        return
    if not records:
        out.print(f"no audit records in {path}")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("TIME", "PID", "EVENT", "PATCH", "MODEL", "RESULT", "PEER"):
        table.add_column(column, no_wrap=True)
    for r in records:
        ok = r.get("result") in ("ok", "deferred")
        table.add_row(
            str(r.get("iso_time", "")),
            str(r.get("pid", "")),
            str(r.get("event", "")),
            f"{r.get('patch') or '-'} {str(r.get('sha256') or '')[:8]}",
            str(r.get("model") or "-"),
            Text(str(r.get("result")), "green" if ok else "red"),
            f"uid {r.get('peer_uid')} pid {r.get('peer_pid')}",
        )
    out.print(table)


# -------------------------------------------------------------------------- check


@main.command()
@click.argument("patch_file", metavar="PATCH", type=click.Path(dir_okay=False))
@click.option(
    "--key",
    "public_key",
    type=click.Path(exists=True, dir_okay=False),
    help="Also verify PATCH.sig against this public key.",
)
@json_option
@handles_errors
def check(patch_file: str, public_key: str | None, as_json: bool) -> None:
    """Load and lint the patch file PATCH without a target process."""
    import livepatch
    from livepatch.locate import split_key

    request = _read_patch(patch_file, None)
    patch = livepatch.loads(request["text"], filename=request["filename"])
    problems: list[str] = []
    warnings: list[str] = []
    for key in patch.targets + [n.target for n in patch.news]:
        try:
            split_key(key)
        except PatchError as exc:
            problems.append(str(exc))
    if not patch.functions and not patch.news:
        problems.append("the patch replaces no function and adds nothing")
    for spec in patch.functions:
        if spec.expect is None:
            warnings.append(
                f"{spec.target}: no expect=; the patch will replace whatever code is live "
                "(give the old source or its fingerprint)"
            )
    signature_state = "absent"
    if "signature" in request:
        signature_state = "present, not verified (give --key)"
        if public_key:
            try:
                key_id = signing.TrustedKeys([Path(public_key)]).verify(
                    request["text"].encode(), request["signature"]
                )
                signature_state = f"valid ({key_id})"
            except PatchError as exc:
                problems.append(str(exc))
                signature_state = "INVALID"
    elif public_key:
        problems.append("no signature file (PATCH.sig) to verify; run 'livepatch sign'")
    report = {
        "ok": not problems,
        "name": patch.name,
        "description": patch.description,
        "cumulative": patch.cumulative,
        "sha256": patch.sha256,
        "functions": [
            {
                "target": s.target,
                "expect": "fingerprint"
                if (s.expect or "").startswith("sha256:")
                else ("source" if s.expect else None),
            }
            for s in patch.functions
        ],
        "new": [n.target for n in patch.news],
        "states": dict(patch.states),
        "callbacks": {
            name: len(getattr(patch.callbacks, name))
            for name in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")
        },
        "signature": signature_state,
        "problems": problems,
        "warnings": warnings,
    }
    if as_json:
        _print_json(report)
    else:
        kind = " (cumulative)" if patch.cumulative else ""
        out.print(f"[bold]{patch.name}[/bold]{kind}: {patch.description or 'no description'}")
        out.print(f"  sha256 {patch.sha256}  signature {signature_state}")
        for spec in patch.functions:
            expect = (
                "none"
                if not spec.expect
                else ("fingerprint" if spec.expect.startswith("sha256:") else "source")
            )
            out.print(f"  replaces {spec.target}  (expect: {expect})")
        for new in patch.news:
            out.print(f"  adds     {new.target}")
        for state_id, version in patch.states.items():
            out.print(f"  state    {state_id} v{version}")
        for w in warnings:
            out.print(f"  [yellow]warning:[/yellow] {w}")
        for p in problems:
            out.print(f"  [red]problem:[/red] {p}")
        if not problems:
            out.print("[green]ok[/green]")
    if problems:
        sys.exit(EXIT_REFUSED)


# ------------------------------------------------------------------ keygen / sign


@main.command()
@click.option(
    "--out",
    "prefix",
    default="livepatch-signing",
    show_default=True,
    help="Writes PREFIX.key (private, 0600) and PREFIX.pub.",
)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@json_option
@handles_errors
def keygen(prefix: str, force: bool, as_json: bool) -> None:
    """Make an Ed25519 key pair for signing patches."""
    private, public = Path(prefix + ".key"), Path(prefix + ".pub")
    for path in (private, public):
        if path.exists() and not force:
            raise CommandFailed(f"{path} exists; choose another --out or pass --force")
    key_id = signing.generate(private, public)
    if as_json:
        _print_json({"ok": True, "key_id": key_id, "private": str(private), "public": str(public)})
        return
    out.print(f"key {key_id}: private {private} (keep it secret), public {public}")
    out.print(f"trust it in a process with: livepatch run --trusted-key {public} -- CMD")


@main.command()
@click.argument("patch_file", metavar="PATCH", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--key",
    "private_key",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Private key from 'livepatch keygen'.",
)
@click.option("--out", "sig_out", type=click.Path(dir_okay=False), help="Default: PATCH.sig")
@json_option
@handles_errors
def sign(patch_file: str, private_key: str, sig_out: str | None, as_json: bool) -> None:
    """Sign PATCH: writes the detached signature PATCH.sig."""
    data = Path(patch_file).read_bytes()
    signature = signing.sign(data, Path(private_key))
    target = Path(sig_out or patch_file + ".sig")
    target.write_text(signature.dumps(), encoding="utf-8")
    if as_json:
        _print_json(
            {
                "ok": True,
                "signature": str(target),
                "key_id": signature.key_id,
                "sha256": signature.sha256,
            }
        )
        return
    out.print(f"signed {patch_file} with {signature.key_id}: {target}")


# --------------------------------------------------------------------------- demo


@main.command()
@json_option
@handles_errors
def demo(as_json: bool) -> None:
    """Run the end-to-end demo (a buggy HTTP service fixed under load)."""
    import importlib

    demo_module = importlib.import_module("livepatch.demo")
    sys.exit(demo_module.main(as_json=as_json))


# ------------------------------------------------- commands written by other modules


def _register_optional(name: str, module: str, attribute: str) -> None:
    """Register a command from another module; if it cannot load, that command says why."""
    try:
        imported = __import__(module, fromlist=[attribute])
        command = getattr(imported, attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module}.{attribute} is not a click command")
        main.add_command(command, name)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

        @click.command(
            name,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
            help=f"(unavailable: {reason})",
            add_help_option=False,
        )
        @click.pass_context
        def unavailable(ctx: click.Context) -> None:
            as_json = "--json" in ctx.args
            _fail(
                CommandFailed(
                    f"the '{name}' command is unavailable ({reason}); reinstall livepatch",
                    exit_code=EXIT_REFUSED,
                    code="command-unavailable",
                ),
                as_json,
            )

        main.add_command(unavailable, name)


_register_optional("build", "livepatch.build.command", "build_command")
_register_optional("attach", "livepatch.agent.attach", "attach_command")


if __name__ == "__main__":
    main()
