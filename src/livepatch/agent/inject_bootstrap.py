"""The Python that `livepatch attach` runs inside the target, and its report back.

The stub's helper thread (`inject_stub`) runs this bootstrap with the GIL held, in a
fresh namespace, while the target's own threads go on. It does as little as it can:

1. If `threading` has not been imported yet, import it and make sure it recorded the
   real main thread. On 3.11 and 3.12 the module records *the importing thread* as the
   main thread, which here is the short-lived helper: `threading.main_thread()` would be
   wrong for the rest of the process's life and `is_alive()` would turn False when the
   helper exits (asyncio, concurrent.futures and the interpreter's shutdown all rely on
   it). The stub passes the ident of the process's main thread, and the record is
   re-keyed to it if that thread runs Python. 3.13 asks the runtime for the main thread
   and needs no repair.
2. Make `livepatch` importable: append (never prepend, so the target's own packages keep
   precedence) the directory `livepatch` was imported from by the attaching process, and
   that environment's site-packages for its dependencies. `attach` only does this for a
   target running the same Python version.
3. Call `livepatch.agent.start()`, which starts the control socket on its own thread.
4. Write a one-line JSON report to the file the attaching process waits for, with an
   atomic rename so a half-written report is never read.

It never applies a patch and never raises: every failure becomes the report.
"""

from __future__ import annotations

import inspect
from typing import Any


def bootstrap_source(params: dict[str, Any]) -> str:
    """The program the stub runs: `_bootstrap` and a call to it with `params`."""
    for value in params.values():
        # the parameters are written as a literal; only plain data may go in it
        if not isinstance(value, str | int | float | bool | list | type(None)):
            raise TypeError(f"bootstrap parameter of type {type(value).__name__}")
    # annotations stay unevaluated: the target's namespace has no `Any`
    return (
        "from __future__ import annotations\n"
        f"{inspect.getsource(_bootstrap)}\n"
        f"_bootstrap({params!r}, _main_thread_ident)\n"
    )


def _bootstrap(params: dict[str, Any], main_ident: int) -> None:  # pragma: no cover - in target
    import json
    import os
    import sys

    def report(**fields: Any) -> None:
        path = params["result"]
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(fields, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # the attaching process gave up and removed its directory

    def forget_helper(ident: int, was_known: bool) -> None:
        # threading.current_thread() in this helper (starting the agent's thread calls it)
        # registers a _DummyThread that would be listed forever after the helper exits
        threading = sys.modules.get("threading")
        if threading is None or was_known:
            return
        with threading._active_limbo_lock:  # type: ignore[attr-defined]
            record = threading._active.get(ident)  # type: ignore[attr-defined]
            if isinstance(record, threading._DummyThread):  # type: ignore[attr-defined]
                del threading._active[ident]  # type: ignore[attr-defined]

    try:
        import _thread

        repaired = False
        me = _thread.get_ident()
        known = sys.modules.get("threading")
        was_known = known is not None and me in known._active  # type: ignore[attr-defined]
        if "threading" not in sys.modules:
            import threading

            record: Any = threading._main_thread  # type: ignore[attr-defined]
            # only re-key to a thread that runs Python: in a program that embeds Python,
            # the process's first thread need not be the interpreter's main thread
            if record.ident == me and main_ident != me and main_ident in sys._current_frames():
                if not hasattr(record, "_tstate_lock"):
                    raise RuntimeError("threading recorded the wrong main thread")
                # the tstate lock stands for "the main thread is alive": hold it until
                # threading._shutdown, run by the real main thread at exit, releases it
                alive = _thread.allocate_lock()
                alive.acquire()
                with threading._active_limbo_lock:  # type: ignore[attr-defined]
                    active = threading._active  # type: ignore[attr-defined]
                    active.pop(record.ident, None)
                    stale = record._tstate_lock
                    record._tstate_lock = alive
                    record._ident = main_ident
                    record._native_id = os.getpid()
                    active[main_ident] = record
                with threading._shutdown_locks_lock:  # type: ignore[attr-defined]
                    threading._shutdown_locks.discard(stale)  # type: ignore[attr-defined]
                    threading._shutdown_locks.add(alive)  # type: ignore[attr-defined]
                repaired = True
        if params["expect_version"] and list(sys.version_info[:2]) != params["expect_version"]:
            raise RuntimeError(f"expected Python {params['expect_version']}, found {sys.version}")
        marker = params.get("marker")
        if marker:
            # used by the tests of the injection itself: proves the bootstrap ran, no agent
            forget_helper(me, was_known)
            report(ok=True, pid=os.getpid(), marker=marker, repaired=repaired)
            return
        for entry in params["path"]:
            if entry not in sys.path:
                sys.path.append(entry)
        import livepatch.agent

        started = livepatch.agent.start()
        socket = getattr(started, "socket_path", started)
        if socket is None:
            from livepatch.agent import paths

            socket = paths.socket_path(os.getpid())
        forget_helper(me, was_known)
        report(
            ok=True,
            pid=os.getpid(),
            version=sys.version.split()[0],
            socket=str(socket),
            livepatch=os.path.dirname(livepatch.__file__ or ""),
            repaired=repaired,
        )
    except BaseException as exc:
        report(
            ok=False,
            error=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500],
            code=getattr(exc, "code", None),
        )
