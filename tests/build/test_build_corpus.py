"""The build corpus: before/after pairs, each with the outcome `livepatch build` must give.

Every case is a folder under ``fixtures/corpus/`` with ``v1.py`` (what the process runs),
``v2.py`` (the fix) and ``expect.txt``:

    outcome: patch | empty | refuse
    options: allow_data, allow_signature_change      (optional)
    targets: f Cart.add NAME                         (patch: names in the change list)
    header: text | other text                        (substrings of the patch header)
    reason: kind                                     (refuse: a Reason name)
    line: 3                                          (refuse: the line in v2.py)
    hint: livepatch upgrade                          (refuse: part of the hint)
    same: yes                                        (v1 and v2 behave alike on the calls)
    setup:        statements run before the patch (instances, callbacks, warm caches)
    calls:        expressions that must give the v2 result after the patch
    keeps:        expressions that must give the *old* result after the patch

A patch case imports v1 fresh under a unique module name, builds the patch, applies it
with the real engine (``model="immediate"``), evaluates the calls and compares them with
the same calls against v2 imported on its own; then it reverts and checks the calls give
the v1 results again.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import livepatch
from livepatch.build import BuildRefused, build_result

CORPUS = Path(__file__).parent / "fixtures" / "corpus"


@dataclass
class Case:
    name: str
    folder: Path
    outcome: str
    options: set[str] = field(default_factory=set)
    targets: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    reason: str | None = None
    line: int | None = None
    hint: str | None = None
    same: bool = False
    setup: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    keeps: list[str] = field(default_factory=list)

    @property
    def module(self) -> str:
        return f"lp_corpus_{self.name}"


def parse_case(folder: Path) -> Case:
    case = Case(folder.name, folder, outcome="")
    block: list[str] | None = None
    for raw in (folder / "expect.txt").read_text().splitlines():
        if not raw.strip():
            continue
        if raw.startswith((" ", "\t")):
            assert block is not None, f"{folder}: indented line outside a block"
            block.append(raw.strip())
            continue
        key, _, value = raw.partition(":")
        value = value.strip()
        if key in ("setup", "calls", "keeps"):
            block = getattr(case, key)
        elif key == "outcome":
            case.outcome = value
        elif key == "options":
            case.options = {v.strip() for v in value.split(",")}
        elif key == "targets":
            case.targets = value.split()
        elif key == "header":
            case.header = [v.strip() for v in value.split("|")]
        elif key == "reason":
            case.reason = value
        elif key == "line":
            case.line = int(value)
        elif key == "hint":
            case.hint = value
        elif key == "same":
            case.same = value == "yes"
        else:
            raise AssertionError(f"{folder}/expect.txt: unknown key {key!r}")
    assert case.outcome in ("patch", "empty", "refuse"), folder
    return case


CASES = sorted((parse_case(d) for d in CORPUS.iterdir() if d.is_dir()), key=lambda c: c.name)


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert sum(c.outcome == "refuse" for c in CASES) >= 15


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def _collect(agen: Any) -> list[Any]:
    return [item async for item in agen]


def _raised(fn: Any, *args: Any) -> BaseException | None:
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


def _namespace(module: ModuleType, setup: list[str]) -> dict[str, Any]:
    """Local names for the calls; globals stay the live module's, so rebinding shows."""
    local: dict[str, Any] = {
        "run": asyncio.run,
        "collect": lambda agen: asyncio.run(_collect(agen)),
        "_raised": _raised,
    }
    for stmt in setup:
        exec(stmt, vars(module), local)
    local["__module__"] = module
    return local


def _outcome(expr: str, local: dict[str, Any]) -> tuple[str, str]:
    try:
        return ("value", repr(eval(expr, vars(local["__module__"]), local)))
    except Exception as exc:
        return ("raised", f"{type(exc).__name__}: {exc}")


@pytest.fixture
def loaded(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in list(sys.modules):
        if name.startswith("lp_corpus_"):
            del sys.modules[name]
    for applied in livepatch.patches():
        livepatch.revert(applied.name, model="immediate")


def _build(case: Case) -> Any:
    return build_result(
        case.folder / "v1.py",
        case.folder / "v2.py",
        module=case.module,
        allow_data="allow_data" in case.options,
        allow_signature_change="allow_signature_change" in case.options,
        name=f"corpus-{case.name.replace('_', '-')}",
    )


@pytest.mark.parametrize("case", [c for c in CASES if c.outcome == "refuse"], ids=lambda c: c.name)
def test_refused(case: Case) -> None:
    with pytest.raises(BuildRefused) as info:
        _build(case)
    refusals = info.value.refusals
    reasons = {r.reason.name.lower() for r in refusals}
    assert case.reason in reasons, f"{case.name}: got {reasons}: {info.value}"
    hit = next(r for r in refusals if r.reason.name.lower() == case.reason)
    if case.line is not None:
        assert hit.line == case.line, hit.message()
        assert f"v2.py:{case.line}:" in hit.message() or f"v1.py:{case.line}:" in hit.message()
    if case.hint is not None:
        assert case.hint in hit.message()
    # the exception's message is one line: file:line, what, reason, hint
    message = str(info.value)
    assert "\n" not in message and ".py:" in message and "; " in message
    assert info.value.code == "build-refused"
    assert isinstance(info.value, livepatch.UnsafeChange)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.outcome != "refuse"], ids=lambda c: c.name
)
def test_patch_makes_v1_behave_as_v2(case: Case, loaded: None) -> None:
    result = _build(case)
    text = result.text
    assert _build(case).text == text, "output must be deterministic"
    header = text.split("\nfrom __future__", 1)[0]
    for snippet in case.header:
        assert snippet in header, f"{snippet!r} not in header:\n{header}"
    changed = {c.what.partition(":")[2] for c in result.changes}
    for target in case.targets:
        assert target in changed, f"{target} not among {sorted(changed)}"
    if case.outcome == "empty":
        assert not result.changes, result.changes
    # every expect= is the old source (the engine verifies it), not an opaque fingerprint
    assert "sha256:" not in text

    v2 = _import(case.module + "__v2", case.folder / "v2.py")
    wanted = [_outcome(c, _namespace(v2, case.setup)) for c in case.calls]

    v1 = _import(case.module, case.folder / "v1.py")
    probe = _namespace(v1, case.setup)
    before = [_outcome(c, probe) for c in case.calls]
    kept = [_outcome(c, probe) for c in case.keeps]
    # a fresh setup for the patched run: instances, closures and callbacks made *before*
    # the patch, and not yet used by the calls
    ns = _namespace(v1, case.setup)
    if case.same:
        assert before == wanted
    else:
        assert before != wanted, "the case does not exercise the change"

    patch = livepatch.loads(text, filename=f"<build {case.name}>")
    livepatch.apply(patch, model="immediate")
    try:
        after = [_outcome(c, ns) for c in case.calls]
        assert after == wanted, f"{case.name}: patched v1 does not behave as v2"
        assert [_outcome(c, ns) for c in case.keeps] == kept
    finally:
        livepatch.revert(patch.name, model="immediate")
    if not case.same:
        ns = _namespace(v1, case.setup)
        assert [_outcome(c, ns) for c in case.calls] == before, "revert must restore v1"
