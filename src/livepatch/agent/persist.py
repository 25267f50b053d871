"""Patches that outlive a process, and patches that wait for their module to be imported.

Two kernel ideas, brought to processes:

*Deferred patching* (kernel: `klp_module_coming`). The kernel applies a livepatch to a
module that is not loaded yet at the moment the module loads. A gunicorn master that does
not `--preload` never imports the application, so a patch for `app:handler` cannot apply
there; instead the agent keeps it *pending* and an import watcher applies it the moment
`app` finishes executing, before any of its functions can have run. Workers forked later
inherit the pending patch and come up patched.

*Per-program records.* Every patch applied through the agent is recorded under the
program's identity (its original command line, `sys.orig_argv`, and working directory;
or `LIVEPATCH_PROGRAM` when set), in `<state dir>/programs/<key>.json`. A process of the
same program that starts later with the agent loads the records and applies them, as
pending patches, when their modules are imported. Reverting removes the record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.abc
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from livepatch.agent import paths

PROGRAM_ENV = "LIVEPATCH_PROGRAM"


@dataclass
class PatchRecord:
    """Everything needed to apply a patch again in another process of the program."""

    name: str
    sha256: str
    text: str
    filename: str
    signature: str | None = None
    model: str = "hybrid"
    recorded_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchRecord:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def program_identity() -> list[str]:
    """What makes two processes "the same program": the command line and where it ran."""
    if os.environ.get(PROGRAM_ENV):
        return [os.environ[PROGRAM_ENV]]
    # orig_argv, not argv: at interpreter startup argv[0] is still '-m' or '-c', while
    # orig_argv is the command as typed for the whole life of the process.
    return [os.getcwd(), *sys.orig_argv]


def program_key() -> str:
    """The file name of the program's records: a readable stem and a digest of the
    identity (``uvicorn-<digest>`` for ``python -m uvicorn app:app --log-level debug``)."""
    ident = program_identity()
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    words = _command_name(ident[2:]) if len(ident) > 1 else ident[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(words))
    return f"{stem[:40]}-{digest}"


#: interpreter options that take the next word as their value
_VALUED = frozenset({"-X", "-W", "-Q"})


def _command_name(args: list[str]) -> str:
    """What the interpreter runs, from its arguments: the module of ``-m``, the script,
    ``-c``, or ``python`` (an option's value, ``--log-level debug``, is no name)."""
    words = iter(args)
    for word in words:
        if word.startswith("-m"):  # -m module, or -mmodule
            return word[2:] or next(words, "python")
        if word.startswith("-c"):
            return "python-c"
        if word in _VALUED:
            next(words, None)
        elif not word.startswith("-") or word == "-":
            return word if word != "-" else "python-stdin"
    return "python"


class ProgramRecords:
    """The JSON file of patches recorded for one program; writers are serialised by flock."""

    def __init__(self, key: str | None = None, directory: Path | None = None) -> None:
        self.key = key or program_key()
        self.path = (directory or paths.state_dir() / "programs") / f"{self.key}.json"

    def load(self) -> list[PatchRecord]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return []
        if not isinstance(data, dict):
            return []
        records = []
        for item in data.get("patches", []):
            with contextlib.suppress(TypeError, KeyError):
                records.append(PatchRecord.from_dict(item))
        return records

    def update(self, change: Callable[[list[PatchRecord]], list[PatchRecord]]) -> None:
        """Read, change and atomically rewrite the records, holding the program's lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            records = change(self.load())
            if not records:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                return
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            body = {
                "program": program_identity(),
                "patches": [r.to_dict() for r in records],
            }
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(body, handle, indent=1)
            os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def target_keys(patch: Any) -> list[str]:
    """Every target a patch names: the functions it replaces and the helpers it adds."""
    return [spec.target for spec in patch.functions] + [spec.target for spec in patch.news]


def target_modules(patch: Any) -> list[str]:
    """The modules a patch changes (every `module:` prefix of its targets)."""
    return sorted({key.partition(":")[0] for key in target_keys(patch) if ":" in key})


@dataclass
class Pending:
    """A loaded patch waiting for its modules."""

    patch: Any
    record: PatchRecord
    modules: list[str]
    on_done: Callable[[Pending, BaseException | None], None]

    def ready(self) -> bool:
        return all(_imported(m) for m in self.modules)


class DeferredPatches:
    """Pending patches and the import watcher that applies them (one per process)."""

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}
        self._lock = threading.RLock()
        self._watcher = _ImportWatcher(self)

    def after_fork(self) -> None:
        # A lock held by another thread at fork time would stay held forever in the child.
        self._lock = threading.RLock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "name": p.record.name,
                    "sha256": p.record.sha256,
                    "waiting_for": [m for m in p.modules if not _imported(m)],
                }
                for p in self._pending.values()
            ]

    def add(self, pending: Pending) -> None:
        with self._lock:
            self._pending[pending.record.name] = pending
            if self._watcher not in sys.meta_path:
                sys.meta_path.insert(0, self._watcher)

    def remove(self, name: str) -> bool:
        with self._lock:
            found = self._pending.pop(name, None) is not None
            if not self._pending and self._watcher in sys.meta_path:
                sys.meta_path.remove(self._watcher)
            return found

    def watched(self, module: str) -> bool:
        with self._lock:
            return any(module in p.modules for p in self._pending.values())

    def module_ready(self, module: str) -> None:
        """Called right after `module` executed: apply every pending patch now complete."""
        with self._lock:
            ready = [
                p
                for p in self._pending.values()
                if module in p.modules and all(m == module or _imported(m) for m in p.modules)
            ]
            for pending in ready:
                self.remove(pending.record.name)
        import livepatch

        for pending in ready:
            error: BaseException | None = None
            try:
                # The module has just finished executing, under its import lock: no task
                # can be running any of its functions yet, so no stack check is needed.
                livepatch.apply(pending.patch, model="immediate", wait=True)
            except livepatch.TransitionBusy:
                # Another patch is in transition; do not hold this import hostage to it.
                threading.Thread(
                    target=_apply_when_idle,
                    args=(pending,),
                    name="livepatch-deferred",
                    daemon=True,
                ).start()
                continue
            except BaseException as exc:  # never break the import that triggered us
                error = exc
            pending.on_done(pending, error)


def _apply_when_idle(pending: Pending, patience: float = 600.0) -> None:
    """Apply once no transition is in flight; the module may be in use by then, so the
    patch goes through its recorded model (with the stack checks) instead of immediate."""
    import livepatch

    error: BaseException | None = None
    deadline = time.monotonic() + patience
    while True:
        try:
            livepatch.apply(pending.patch, model=pending.record.model, wait=True)
            break
        except livepatch.TransitionBusy as exc:
            if time.monotonic() > deadline:
                error = exc
                break
            time.sleep(0.1)
        except BaseException as exc:
            error = exc
            break
    pending.on_done(pending, error)


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of watched modules to learn when they ran."""

    def __init__(self, deferred: DeferredPatches) -> None:
        self._deferred = deferred
        self._local = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if not self._deferred.watched(fullname) or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._local.busy = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _NotifyingLoader(spec.loader, self._deferred)
        return spec


class _NotifyingLoader(importlib.abc.Loader):
    """Delegates to the real loader; tells the deferred patches when the module ran."""

    def __init__(self, inner: Any, deferred: DeferredPatches) -> None:
        self._inner = inner
        self._deferred = deferred

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._inner.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._deferred.module_ready(module.__name__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _imported(name: str) -> bool:
    module = sys.modules.get(name)
    if module is None:
        return False
    spec = getattr(module, "__spec__", None)
    # a module still executing its body is in sys.modules already
    return not getattr(spec, "_initializing", False)
