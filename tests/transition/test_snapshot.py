"""Watching a transition from another thread (what ``livepatch status`` does in the agent):
the applied patches and the transition in flight must come as one consistent view."""

from __future__ import annotations

import threading

import livepatch
from livepatch import core

FUNCTIONS = 300


def test_a_transitioning_patch_is_never_seen_without_its_transition(tmp_module):
    """Apply lists the patch, builds the trampolines (several ms for 300 functions, handing
    the GIL over as it goes), then starts the transition. A watcher polling meanwhile must
    see either both or neither. A thread inside a patched function keeps each transition
    in flight until it is let go."""
    source = "import threading\ngate = threading.Event()\n"
    source += "def hold():\n    gate.wait(10)\n"
    source += "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(FUNCTIONS))
    m = tmp_module(source)
    body = f'@patch.function("{m.__name__}:hold")\ndef hold():\n    pass\n'
    body += "".join(
        f'@patch.function("{m.__name__}:f{i}")\ndef f{i}(x):\n    return x - {i}\n'
        for i in range(FUNCTIONS)
    )
    patch = livepatch.loads(
        f"import livepatch\npatch = livepatch.Patch('watched')\n{body}", filename="<watched>"
    )
    stop = threading.Event()
    seen = {"transitioning": 0, "alone": 0, "miscounted": 0}

    def watch() -> None:
        while not stop.is_set():
            applied, current = core.snapshot()
            if current is not None:
                view = current.to_dict()  # its counts are replaced as one, not one by one
                seen["miscounted"] += view["tasks_switched"] > view["tasks_total"]
            for p in applied:
                if p.state == "transitioning":
                    seen["transitioning"] += 1
                    if current is None or current.patch != p.name:
                        seen["alone"] += 1

    watcher = threading.Thread(target=watch, name="lptest-watcher")
    watcher.start()
    try:
        for _ in range(5):
            m.gate.clear()
            holder = threading.Thread(target=m.hold, name="lptest-holder")
            holder.start()
            t = livepatch.apply(patch, model="hybrid", wait=False)
            m.gate.set()
            holder.join(10)
            t.wait()
            livepatch.revert("watched", model="hybrid")
    finally:
        stop.set()
        m.gate.set()
        watcher.join(10)
    assert m.f7(10) == 17
    assert seen["transitioning"] > 0  # it did watch transitions
    assert seen["alone"] == 0
    assert seen["miscounted"] == 0
