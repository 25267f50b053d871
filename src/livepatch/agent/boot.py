"""Starting the agent at interpreter startup, when `LIVEPATCH_AGENT` asks for it.

Two hooks call `from_environment()` before the program's own code runs:

* `livepatch-agent.pth` in site-packages (installed with the package). Python executes
  `import` lines of `.pth` files at startup in *every* process of that environment, so the
  line checks the variable first and costs one dictionary lookup when it is unset.
* `livepatch/_startup/sitecustomize.py`, which `livepatch run` puts on PYTHONPATH, so
  `run` works even where the `.pth` file is not installed.

Children inherit the environment, so subprocesses and multiprocessing children get agents
too, and forked children (gunicorn workers) get one from `start()`'s fork hook. The
variable's value is `1` (or any value other than empty and `0`). A failure to start is
printed as one line on stderr and never stops the program.
"""

from __future__ import annotations

import os
import sys

AGENT_ENV = "LIVEPATCH_AGENT"


def wanted(environ: dict[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(AGENT_ENV, "")
    return value not in ("", "0")


def from_environment() -> None:
    """Start the agent if `LIVEPATCH_AGENT` is set; never raise."""
    if not wanted():
        return
    try:
        from livepatch import agent

        agent.start()
    except BaseException as exc:  # the program must start even if its agent cannot
        try:
            print(
                f"livepatch: agent not started in pid {os.getpid()}: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
        except Exception:
            pass
