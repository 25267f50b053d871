"""A process that forks while a transition is in flight (a gunicorn master starting a
worker, a multiprocessing pool with the fork start method).

Only the forking thread lives on in the child. The transition's worker thread is not
there, nor are the tasks it waits for, and a lock a vanished thread held stays held. The
child's transition used to stay in flight for good: patched calls dispatched for ever,
every apply raised TransitionBusy, and a revert hung. Each case runs in a child process
of its own that forks again, so that a hang fails the test instead of hanging it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: both scripts' target: `hold` keeps a thread in the old version until HOLD is set
TARGET = r"""
import builtins, os, sys, tempfile, threading, time, pathlib
sys.path.insert(0, tempfile.mkdtemp())
(pathlib.Path(sys.path[0]) / "lp_fork.py").write_text(
    "import threading\nHOLD = threading.Event()\nHELD = threading.Event()\n"
    "def hold():\n    HELD.set()\n    HOLD.wait(60)\n"
    "def f():\n    return 1\n")
import lp_fork, livepatch
"""

SCRIPT = TARGET + r"""
MODEL = sys.argv[1]
patch = livepatch.loads(
    "import livepatch\npatch = livepatch.Patch('fork')\n"
    "@patch.function('lp_fork:f')\ndef f():\n    return 2\n"
    "@patch.function('lp_fork:hold')\ndef hold():\n    HELD.set()\n    HOLD.wait(60)\n")
holder = threading.Thread(target=lp_fork.hold, daemon=True)
holder.start()
lp_fork.HELD.wait()
t = livepatch.apply(patch, model=MODEL, wait=False, timeout=30)
time.sleep(0.2)
assert not t.done, t  # held by the thread inside the old hold()

def wait_until(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

pid = os.fork()
if pid == 0:
    code = 1
    try:
        # the holder is not in the child: its transition completes, by a new worker
        wait_until(lambda: livepatch.transition() is None)
        assert t.state.value == "complete", t
        assert [v.state for v in livepatch.patches()] == ["applied"]
        assert lp_fork.f() == 2 and lp_fork.f.__code__.co_filename != "<livepatch dispatch>"
        livepatch.revert("fork", model=MODEL, timeout=10)
        assert lp_fork.f() == 1
        livepatch.apply(patch, model=MODEL, timeout=10)
        assert lp_fork.f() == 2
        code = 0
    except BaseException as exc:
        print("child:", type(exc).__name__, exc, file=sys.stderr, flush=True)
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
lp_fork.HOLD.set()  # the parent's own transition completes as before
t.wait(10)
assert t.state.value == "complete" and lp_fork.f() == 2
print("ok")
"""


@pytest.mark.parametrize("model", ["hybrid", "two_universe", "stop"])
def test_a_child_forked_mid_transition_finishes_it(model):
    done = subprocess.run([sys.executable, "-c", SCRIPT, model], capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


FROM_THE_WORKER = TARGET + r"""
builtins.CHILDREN = []
patch = livepatch.loads(
    "import os, time, livepatch\npatch = livepatch.Patch('fork2')\n"
    "@patch.function('lp_fork:f')\ndef f():\n    return 2\n"
    "@patch.function('lp_fork:hold')\ndef hold():\n    HELD.set()\n    HOLD.wait(60)\n"
    "@patch.post_patch\ndef forks():\n"
    "    pid = os.fork()\n"
    "    if pid:\n        CHILDREN.append(pid)\n        return\n"
    "    time.sleep(0.5)\n"
    "    states = [v.state for v in livepatch.patches()]\n"
    "    good = livepatch.transition() is None and states == ['applied']\n"
    "    os._exit(0 if good else 3)\n")
holder = threading.Thread(target=lp_fork.hold, daemon=True)
holder.start()
lp_fork.HELD.wait()
t = livepatch.apply(patch, wait=False, timeout=30)
time.sleep(0.2)
lp_fork.HOLD.set()  # the worker finalizes, then runs post_patch in its own thread
t.wait(10)
assert len(CHILDREN) == 1, CHILDREN
_, status = os.waitpid(CHILDREN[0], 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
print("ok")
"""


def test_a_fork_from_a_post_patch_callback_leaves_the_child_patched():
    """post_patch runs in the transition's worker, after the transition has left the
    slot: a child forked there has the patch applied and no transition in flight."""
    done = subprocess.run([sys.executable, "-c", FROM_THE_WORKER], capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
