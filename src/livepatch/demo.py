"""`make demo`: fix a bug in a live HTTP service under load, without dropping a request.

The demo does what a user would do, with the real command line:

1. starts the shop service (`livepatch/_demo/service.py`, copied to a temporary
   directory) with `livepatch run -- python service.py`, on 127.0.0.1;
2. drives steady load at it from several client threads, checking every answer;
3. after a while runs `livepatch apply fix_price_label.py --pid N` while the load runs,
   and shows the transition as the command reports it;
4. shows that every request succeeded and that the answers changed from the buggy
   "$2.5" to "$2.50" at the moment of the patch, then `status`, then `revert`;
5. stops everything it started.

Exit status 0 means: no request failed, the bug was visible before the patch, gone after
it, and back after the revert.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

LOAD_THREADS = 4
#: how long each phase of load runs (tests shorten it)
PHASE_SECONDS = float(os.environ.get("LIVEPATCH_DEMO_PHASE_SECONDS", "2.0"))
BUGGY, FIXED = "$2.5", "$2.50"

console = Console(highlight=False)


@dataclass
class Phase:
    """Counts of answers seen while one phase of the demo ran."""

    name: str
    ok: int = 0
    failed: int = 0
    buggy: int = 0
    fixed: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "ok": self.ok,
            "failed": self.failed,
            "buggy": self.buggy,
            "fixed": self.fixed,
        }


class Load:
    """Client threads sending GET /quote?item=pear&qty=1 back to back, over keep-alive."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.phase = Phase("before")
        self.phases = [self.phase]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(LOAD_THREADS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def next_phase(self, name: str) -> Phase:
        with self._lock:
            self.phase = Phase(name)
            self.phases.append(self.phase)
        return self.phase

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.is_set():
            # a request belongs to the phase in which it was sent: one sent during the
            # revert may be answered by the new code, and arrive after the revert returned
            with self._lock:
                phase = self.phase
            try:
                conn.request("GET", "/quote?item=pear&qty=1")
                response = conn.getresponse()
                body = json.loads(response.read())
                good = response.status == 200
                label = body.get("total")
            except (OSError, ValueError, http.client.HTTPException) as exc:
                good, label = False, None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if good:
                    phase.ok += 1
                    phase.buggy += label == BUGGY
                    phase.fixed += label == FIXED
                else:
                    phase.failed += 1
                    if len(phase.errors) < 3:
                        phase.errors.append(error)
        conn.close()


def _livepatch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "livepatch.cli", *args]
    console.print(f"[dim]$ livepatch {' '.join(args)}[/dim]")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    for line in (done.stdout + done.stderr).rstrip().splitlines():
        console.print(f"  [cyan]{line}[/cyan]")
    return done


def _start_service(workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    service = subprocess.Popen(
        [sys.executable, "-m", "livepatch.cli", "run", "--", sys.executable, "service.py"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert service.stdout is not None
    line = service.stdout.readline()
    if not line.startswith("listening on "):
        service.kill()
        raise RuntimeError(f"the demo service did not start (it printed {line!r})")
    port = int(line.split()[-1])
    socket = Path(env["LIVEPATCH_SOCKET_DIR"]) / f"agent-{service.pid}.sock"
    deadline = time.monotonic() + 10
    while not socket.exists():
        if time.monotonic() > deadline:
            service.kill()
            raise RuntimeError("the demo service started without its agent")
        time.sleep(0.02)
    return service, port


def main(as_json: bool = False) -> int:
    global console
    if as_json:  # stdout carries the one JSON document; the narrative goes to stderr
        console = Console(highlight=False, stderr=True)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="livepatch-demo-"))
    for name in ("shop.py", "service.py", "fix_price_label.py"):
        source = resources.files("livepatch._demo").joinpath(name)
        (workdir / name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    env = dict(os.environ)
    env.update(
        LIVEPATCH_SOCKET_DIR=str(workdir / "run"),
        LIVEPATCH_STATE_DIR=str(workdir / "state"),
        LIVEPATCH_PROGRAM="livepatch-demo",
    )
    service: subprocess.Popen[str] | None = None
    load: Load | None = None
    outcome: dict[str, Any] = {}
    try:
        console.rule("[bold]livepatch demo")
        console.print(f"service files in {workdir}")
        service, port = _start_service(workdir, env)
        console.print(
            f"shop service: pid {service.pid}, http://127.0.0.1:{port}/quote?item=pear&qty=1 "
            f"(a pear costs 250 cents; the bug shows it as {BUGGY!r})"
        )
        load = Load(port)
        load.start()
        console.print(f"load: {LOAD_THREADS} client threads, back to back")
        time.sleep(PHASE_SECONDS)

        console.rule("apply the fix while the load runs")
        _livepatch("check", str(workdir / "fix_price_label.py"), env=env)
        load.next_phase("during apply")
        applied = _livepatch(
            "apply", str(workdir / "fix_price_label.py"), "--pid", str(service.pid), env=env
        )
        load.next_phase("after apply")
        time.sleep(PHASE_SECONDS)
        _livepatch("status", "--pid", str(service.pid), env=env)

        console.rule("revert it, still under load")
        load.next_phase("during revert")
        reverted = _livepatch("revert", "fix-price-label", "--pid", str(service.pid), env=env)
        load.next_phase("after revert")
        time.sleep(PHASE_SECONDS / 2)
        load.stop()
        outcome = _summary(load, applied.returncode, reverted.returncode)
    finally:
        if load is not None:
            load.stop()
        if service is not None:
            _stop(service)
        shutil.rmtree(workdir, ignore_errors=True)
    outcome["seconds"] = round(time.monotonic() - started, 1)
    if as_json:
        print(json.dumps(outcome, indent=2))
    else:
        verdict = "[green]success[/green]" if outcome["ok"] else "[red]FAILED[/red]"
        console.print(f"{verdict} in {outcome['seconds']}s; everything the demo started is stopped")
    return 0 if outcome["ok"] else 1


def _summary(load: Load, apply_rc: int, revert_rc: int) -> dict[str, Any]:
    table = Table(title="requests by phase")
    for column in ("phase", "ok", "failed", f"answered {BUGGY}", f"answered {FIXED}"):
        table.add_column(column, justify="right" if column != "phase" else "left")
    for phase in load.phases:
        table.add_row(
            phase.name, str(phase.ok), str(phase.failed), str(phase.buggy), str(phase.fixed)
        )
    console.print(table)
    by_name = {p.name: p for p in load.phases}
    failed = sum(p.failed for p in load.phases)
    checks = {
        "no request failed": failed == 0,
        "the bug was visible before the patch": by_name["before"].buggy > 0
        and by_name["before"].fixed == 0,
        "livepatch apply succeeded": apply_rc == 0,
        "the bug is gone after the patch": by_name["after apply"].ok > 0
        and by_name["after apply"].buggy == 0,
        "livepatch revert succeeded": revert_rc == 0,
        "the old behaviour is back after the revert": by_name["after revert"].ok > 0
        and by_name["after revert"].fixed == 0,
    }
    for check, passed in checks.items():
        console.print(("[green]✔[/green] " if passed else "[red]✘[/red] ") + check)
    for phase in load.phases:
        for error in phase.errors:
            console.print(f"[red]{phase.name}: {error}[/red]")
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "phases": [p.to_dict() for p in load.phases],
    }


def _stop(service: subprocess.Popen[str]) -> None:
    try:
        os.killpg(service.pid, signal.SIGINT)
        service.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        service.kill()
        service.wait(timeout=5)


if __name__ == "__main__":
    sys.exit(main(as_json="--json" in sys.argv[1:]))
