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

Installing the hook: `python -m livepatch.agent.boot install [SITE_DIR]` copies the `.pth`
file into this interpreter's site-packages (or SITE_DIR); `uninstall` removes it.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

AGENT_ENV = "LIVEPATCH_AGENT"


def wanted(environ: dict[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(AGENT_ENV, "")
    return value not in ("", "0")


_attempted = False


def from_environment() -> None:
    """Start the agent if `LIVEPATCH_AGENT` is set; never raise."""
    global _attempted
    # Both hooks may be present (the .pth and `livepatch run`'s PYTHONPATH): try once.
    if _attempted or not wanted():
        return
    _attempted = True
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


PTH_NAME = "livepatch-agent.pth"


def pth_source() -> Path:
    """The hook file shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "_startup" / PTH_NAME


def install(site_dir: Path | None = None) -> Path:
    """Copy the .pth hook into `site_dir` (default: this interpreter's site-packages)."""
    target_dir = site_dir or Path(sysconfig.get_paths()["purelib"])
    target = target_dir / PTH_NAME
    shutil.copyfile(pth_source(), target)
    return target


def uninstall(site_dir: Path | None = None) -> bool:
    target = (site_dir or Path(sysconfig.get_paths()["purelib"])) / PTH_NAME
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    return True


def _main(argv: list[str]) -> int:
    usage = "usage: python -m livepatch.agent.boot install|uninstall [SITE_DIR]"
    if not argv or argv[0] not in ("install", "uninstall"):
        print(usage, file=sys.stderr)
        return 2
    site_dir = Path(argv[1]) if len(argv) > 1 else None
    try:
        if argv[0] == "install":
            print(f"installed {install(site_dir)}")
        else:
            print("removed" if uninstall(site_dir) else "not installed")
    except OSError as exc:
        print(f"livepatch: cannot {argv[0]} the hook: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
