"""The invariant workload: encode/decode/work under threads, asyncio tasks and generators.

The target module has ``encode`` (tags its value with its version), ``decode`` (records a
violation when the tag is not its own) and three callers with the same body in both
versions — ``work`` (a thread calls it), ``work_gen`` (a generator suspended between the
two calls, finished by *another* thread) and ``work_async`` (a coroutine suspended
between the two calls). A violation is exactly "one stack ran an old and a new version".
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any

import livepatch

TARGET = '''
import asyncio, time
VIOLATIONS = []
DECODED = [0]

def checkpoint():
    time.sleep(0)  # let other threads run between the two calls

def encode(v):
    return ("v1", v)

def decode(x):
    DECODED[0] += 1
    if x[0] != "v1":
        VIOLATIONS.append(("v1 decoded", x[0]))
    return x[1]

def work(v):
    x = encode(v)
    checkpoint()
    return decode(x)

def work_gen(v):
    x = encode(v)
    yield x
    return decode(x)

async def work_async(v):
    x = encode(v)
    await asyncio.sleep(0)
    return decode(x)
'''

PATCH = '''
@patch.function("M:encode")
def encode(v):
    return ("v2", v)

@patch.function("M:decode")
def decode(x):
    DECODED[0] += 1
    if x[0] != "v2":
        VIOLATIONS.append(("v2 decoded", x[0]))
    return x[1]

@patch.function("M:work")
def work(v):
    x = encode(v)
    checkpoint()
    return decode(x)

@patch.function("M:work_gen")
def work_gen(v):
    x = encode(v)
    yield x
    return decode(x)

@patch.function("M:work_async")
async def work_async(v):
    x = encode(v)
    await asyncio.sleep(0)
    return decode(x)
'''


@dataclass
class Workload:
    """Threads, asyncio tasks and cross-thread generators hammering the target."""

    module: types.ModuleType
    threads: int = 16
    tasks: int = 200
    #: seconds each thread/task sleeps outside the patched functions per iteration
    idle: float = 0.0
    safepoints: bool = True
    #: hand generators to other threads (False: a thread finishes its own at once)
    handoff: bool = True
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._gens: queue.Queue[Any] = queue.Queue(maxsize=64)
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.iterations = 0

    def _thread_main(self, index: int) -> None:
        m = self.module
        try:
            while not self._stop.is_set():
                m.work(index)
                if not self.handoff:
                    g = m.work_gen(index)
                    next(g)
                    _finish(g)
                elif index % 2 == 0:  # make a generator, suspend it between the two calls
                    g = m.work_gen(index)
                    next(g)
                    try:
                        self._gens.put(g, timeout=0.05)
                    except queue.Full:
                        _finish(g)
                else:  # finish one another thread started
                    try:
                        # idle load: block until a generator comes, so none lingers
                        _finish(self._gens.get(timeout=0.05 if self.idle else 0.002))
                    except queue.Empty:
                        pass
                self.iterations += 1
                if self.safepoints:
                    livepatch.safepoint()
                if self.idle:
                    time.sleep(self.idle)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    async def _task_main(self, index: int) -> None:
        m = self.module
        while not self._stop.is_set():
            await m.work_async(index)
            if self.safepoints:
                livepatch.safepoint()
            await asyncio.sleep(self.idle)

    def _loop_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            await asyncio.gather(*(self._task_main(i) for i in range(self.tasks)))

        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            loop.close()

    def start(self) -> Workload:
        for i in range(self.threads):
            self._threads.append(
                threading.Thread(target=self._thread_main, args=(i,), name=f"lptest-worker-{i}")
            )
        if self.tasks:
            self._threads.append(threading.Thread(target=self._loop_main, name="lptest-loop"))
        for t in self._threads:
            t.start()
        time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)
        while not self._gens.empty():
            _finish(self._gens.get_nowait())
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"workload threads did not stop: {alive}"
        assert not self.errors, self.errors


def _finish(g: Any) -> None:
    try:
        next(g)
    except StopIteration:
        pass
