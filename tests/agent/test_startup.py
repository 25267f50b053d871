"""Starting the agent at interpreter startup: the .pth hook (cheap when not asked for),
and multiprocessing children getting agents of their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lp_harness import LIVEPATCH, STARTUP

import livepatch

SRC = str(Path(livepatch.__file__).resolve().parent.parent)

# Run with -S (no site-packages, so not the venv's own copy of the hook): livepatch is put
# on sys.path by hand, then the directory holding the .pth is processed as site-packages.
PROBE = (
    "import site, sys\n"
    "sys.path.insert(0, sys.argv[2])\n"
    "site.addsitedir(sys.argv[1])\n"  # processes the .pth exactly as site-packages would
    "loaded = 'livepatch' in sys.modules\n"
    "import livepatch.agent as a\n"
    "print(loaded, a.running(), a.socket_path())\n"
)


def test_pth_hook_starts_the_agent_only_when_asked(lp) -> None:
    site_dir = lp.tmp / "site"
    site_dir.mkdir()
    install = [sys.executable, "-m", "livepatch.agent.boot", "install", str(site_dir)]
    subprocess.run(install, check=True, capture_output=True, timeout=30)
    assert (site_dir / "livepatch-agent.pth").read_text() == (
        STARTUP / "livepatch-agent.pth"
    ).read_text()
    off = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(site_dir), SRC],
        env=lp.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert off.stdout.split() == ["False", "False", "None"], off.stderr
    on = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(site_dir), SRC],
        env={**lp.env, "LIVEPATCH_AGENT": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    loaded, running, path = on.stdout.split()
    assert (loaded, running) == ("True", "True"), on.stderr
    assert path.startswith(str(lp.socket_dir))


SPAWNER = """
import json, multiprocessing as mp, os
import livepatch.agent as a

def child(q):
    import livepatch.agent as a
    q.put((os.getpid(), a.running()))

if __name__ == "__main__":
    out = {}
    for method in ("spawn", "fork", "forkserver"):
        ctx = mp.get_context(method)
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        out[method] = q.get(timeout=30)
        p.join(30)
    print(json.dumps({"parent": [os.getpid(), a.running()], **out}))
"""


def test_multiprocessing_children_get_their_own_agents(lp) -> None:
    script = lp.tmp / "spawner.py"
    script.write_text(SPAWNER)
    done = subprocess.run(
        [str(LIVEPATCH), "run", "--", sys.executable, "-W", "ignore", str(script)],
        env=lp.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["parent"][1] is True
    pids = {report["parent"][0]}
    for method in ("spawn", "fork", "forkserver"):
        pid, running = report[method]
        assert running is True, method
        assert pid not in pids
        pids.add(pid)
