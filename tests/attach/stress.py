"""Stress run of the injection (not a test): N injections into each kind of target.

    .venv/bin/python tests/attach/stress.py [N]

For every installed Python 3.11-3.13 and every target mode (sleeping, busy, blocked on a
pipe), start one target, inject the marker bootstrap N times, check after each that it
reported and that the target still runs correctly, and print the median and worst time
of the ptrace injection proper and of the whole round trip; also inject N times while
lines stream into a pipe-blocked target and check every line comes back in order. Then
time N full attaches (agent included) into fresh targets of this interpreter's version.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from attach_targets import OURS, TARGET, VERSIONS, Target, find_python  # noqa: E402

from livepatch.agent import inject_stub  # noqa: E402
from livepatch.agent.attach import attach, run_bootstrap  # noqa: E402
from livepatch.agent.inject_probe import probe  # noqa: E402


def main(n: int) -> int:
    sockets = tempfile.mkdtemp(prefix="lp-stress-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LIVEPATCH"))}
    env |= {"LIVEPATCH_SOCKET_DIR": sockets, "LIVEPATCH_STATE_DIR": sockets + "/state"}
    os.environ.update({"LIVEPATCH_SOCKET_DIR": sockets, "LIVEPATCH_STATE_DIR": sockets + "/state"})
    failures = 0
    timed_inject = inject_stub.inject
    ptrace_times: list[float] = []

    def measured(pid: int, library: Path) -> None:
        t = time.perf_counter()
        timed_inject(pid, library)
        ptrace_times.append(time.perf_counter() - t)

    inject_stub.inject = measured
    import livepatch.agent.attach as attach_module

    attach_module.inject = measured  # type: ignore[attr-defined]
    for version in VERSIONS:
        python = find_python(version)
        if python is None:
            print(f"python{version}: not installed")
            continue
        print(f"python{version} pipe under load: {_pipe_under_load(python, env, n)}")
        for mode in ("sleep", "busy", "pipe"):
            target = Target([python, str(TARGET), mode], env)
            ptrace_times.clear()
            rounds: list[float] = []
            ok = 0
            try:
                info = probe(target.pid)
                for i in range(n):
                    t = time.perf_counter()
                    report = run_bootstrap(info, time.monotonic() + 10, 10, marker=f"m{i}")
                    rounds.append(time.perf_counter() - t)
                    if mode == "pipe":
                        target.send(f"n{i}")
                        alive = target.expect("echo", timeout=5) == f"echo n{i}"
                    else:
                        alive = "CORRUPT" not in target.expect("tick", timeout=5)
                    ok += bool(report.get("marker") == f"m{i}" and alive and target.alive())
            finally:
                target.stop()
            failures += n - ok
            print(
                f"python{version} {mode:5}: {ok}/{n} ok; ptrace inject median "
                f"{statistics.median(ptrace_times) * 1e3:.1f} ms, "
                f"max {max(ptrace_times) * 1e3:.1f} ms;"
                f" round trip median {statistics.median(rounds) * 1e3:.1f} ms"
            )
    python = find_python(OURS)
    if python:
        elapsed = []
        for _ in range(n):
            target = Target([python, str(TARGET), "sleep"], env)
            try:
                elapsed.append(attach(target.pid, timeout=30).elapsed)
                target.expect("tick")
            except Exception as exc:
                failures += 1
                print("attach failed:", exc)
            finally:
                target.stop()
        print(
            f"full attach (python{OURS}, agent included): {len(elapsed)}/{n} ok; median "
            f"{statistics.median(elapsed) * 1e3:.0f} ms, max {max(elapsed) * 1e3:.0f} ms"
        )
    return 1 if failures else 0


def _pipe_under_load(python: str, env: dict[str, str], n: int) -> str:
    """Inject n times while lines stream into the target's stdin; every line must echo."""
    target = Target([python, str(TARGET), "pipe"], env)
    stop = threading.Event()
    sent: list[int] = []

    def writer() -> None:
        while not stop.is_set():
            target.send(f"n{len(sent)}")
            sent.append(len(sent))
            time.sleep(0.0005)

    feeding = threading.Thread(target=writer)
    try:
        info = probe(target.pid)
        feeding.start()
        reports = [run_bootstrap(info, time.monotonic() + 10, 10, marker=f"m{i}") for i in range(n)]
        stop.set()
        feeding.join()
        target.send("exit")
        echoed = []
        while (line := target.expect("", timeout=10)) != "bye":
            echoed.append(int(line.split()[1][1:]))
        status = target.proc.wait(timeout=10)
    finally:
        stop.set()
        target.stop()
    ok = sum(r.get("marker") == f"m{i}" for i, r in enumerate(reports))
    complete = echoed == list(range(len(sent)))
    return (
        f"{ok}/{n} injections ok; {len(sent)} lines sent, {len(echoed)} echoed, "
        f"{'complete and in order' if complete else 'LOST OR REORDERED'}; exit status {status}"
    )


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30))
