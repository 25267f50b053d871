"""A process that froze its heap (``gc.freeze()``, as pre-fork servers do) is patched as
consistently as any other.

``gc.get_referrers`` does not look at frozen objects, and livepatch finds two things
with it: the closures of a nested function, and generators suspended in an old version.
Before livepatch.heap unfroze them, a nested function's old closures kept the old code
after its patch completed, and a generator suspended in the old version did not hold up
finalization.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import livepatch
from livepatch import TransitionTimeout

from .conftest import patch_for

TARGET = """
def version():
    return 1

def gen():
    yield version()
    yield version()

def make_handler(n):
    def handler():
        return n * 10
    return handler
"""

PATCH = """
@patch.function("M:version")
def version():
    return 2

@patch.function("M:gen")
def gen():
    yield version()
    yield version()
"""

NESTED = """
@patch.function("M:make_handler.<locals>.handler")
def handler():
    return n * 100
"""


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze everything made so far for the block, and never leave it frozen after."""
    gc.freeze()
    assert gc.get_freeze_count() > 0
    try:
        yield
    finally:
        gc.unfreeze()


def test_a_generator_made_before_the_freeze_holds_up_finalization(
    tmp_module, caplog: pytest.LogCaptureFixture
) -> None:
    m = tmp_module(TARGET)
    g = m.gen()
    assert next(g) == 1  # suspended in the old version
    with frozen_heap(), caplog.at_level(logging.WARNING, logger="livepatch"), \
            pytest.raises(TransitionTimeout) as info:
        livepatch.apply(patch_for(m, "frozen-gen", PATCH), timeout=0.3)
    assert "lingering" in str(info.value) and "gen" in str(info.value)
    assert m.version() == 1 and livepatch.patches() == []
    assert next(g) == 1  # it finishes in the old world it started in
    assert any("unfroze" in r.getMessage() and "generators" in r.getMessage()
               for r in caplog.records), caplog.text


class _WhileParked(logging.Handler):
    """Records, for each log record, whether the world was parked when it was written."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        from livepatch import stopworld

        self.seen.append((record.getMessage(), stopworld._active))


def test_stop_logs_the_unfreeze_after_the_world_resumes(tmp_module) -> None:
    """stop scans for generators with every other thread parked, and one may be parked
    holding logging's lock: the unfreeze's log line must wait until they run again."""
    m = tmp_module(TARGET)
    g = m.gen()
    assert next(g) == 1  # suspended in the old version: stop's check finds it
    handler = _WhileParked()
    logger = logging.getLogger("livepatch")
    logger.addHandler(handler)
    try:
        with frozen_heap(), pytest.raises(TransitionTimeout):
            livepatch.apply(patch_for(m, "frozen-stop", PATCH), model="stop", timeout=0.2)
    finally:
        logger.removeHandler(handler)
    unfroze = [parked for message, parked in handler.seen if "unfroze" in message]
    assert unfroze == [False], handler.seen
    assert next(g) == 1 and m.version() == 1


def test_closures_made_before_the_freeze_get_the_new_code(tmp_module) -> None:
    m = tmp_module(TARGET)
    handlers = [m.make_handler(n) for n in (1, 2, 3)]
    with frozen_heap():
        livepatch.apply(patch_for(m, "frozen-nested", NESTED))
    assert [h() for h in handlers] == [100, 200, 300]
    assert m.make_handler(4)() == 400
    livepatch.revert("frozen-nested")
    assert [h() for h in handlers] == [10, 20, 30]


def test_a_plan_leaves_the_heap_frozen_and_says_applying_will_not(tmp_module) -> None:
    m = tmp_module(TARGET)
    g = m.gen()
    next(g)
    with frozen_heap():  # the generator is among the frozen objects, as in a server
        count = gc.get_freeze_count()
        the_plan = livepatch.plan(patch_for(m, "frozen-plan", PATCH))
        assert gc.get_freeze_count() == count  # a dry run changes nothing
    assert any("gc.freeze()" in note and "gc.unfreeze()" in note and "gen" in note
               for note in the_plan.notes), the_plan.notes
    g.close()


def test_the_agents_dry_run_leaves_the_heap_frozen(tmp_module) -> None:
    """``livepatch apply --dry-run`` lists who runs the patch's functions, suspended
    generators too; the agent did that outside ``heap.looking_only``, so a dry run of a
    patch with a generator target unfroze the heap."""
    from livepatch.agent.operations import running_targets

    m = tmp_module(TARGET)
    g = m.gen()
    assert next(g) == 1
    patch = patch_for(m, "frozen-dry", PATCH)
    with frozen_heap():
        running = running_targets(patch)
        assert gc.get_freeze_count() > 0  # unfreezing makes it 0
    assert running == []  # frozen, so not seen: as the plan says
    seen = [r["task"] for r in running_targets(patch)]
    assert len(seen) == 1 and seen[0].startswith(f"generator gen suspended at {m.__file__}:")
    assert seen[0].endswith(" in gen"), seen
