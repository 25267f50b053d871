"""The builder: two versions of the source in, one reviewed-looking patch file out.

This is kpatch-build's pipeline for Python: read both versions, keep the modules whose
text differs, cut each into units and compare them (`analysis`), refuse the whole build
if any change cannot be made live, and otherwise emit the patch file (`emit`).

Before returning, the builder checks its own output the way the engine will: each
``expect=`` must compile, in the target's context, to exactly the old code (otherwise a
fingerprint is used instead), each replacement must parse back to exactly the new
version's ``def`` (renames applied), and the whole file must compile. A builder bug
therefore shows up as a refusal here, not as a wrong patch in a production process.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import CodeType

from livepatch import codegen
from livepatch.build import emit
from livepatch.build.analysis import (
    Item,
    ModuleAnalysis,
    ModulePlan,
    NoteKind,
    Options,
    Replacement,
)
from livepatch.build.compare import canon
from livepatch.build.model import ModuleModel, ParseFailed, parse_module
from livepatch.build.refusal import BuildRefused, Hint, Reason, Refusal
from livepatch.build.segments import SegmentError, def_text
from livepatch.build.sources import SourceTree, read_git, read_pair
from livepatch.errors import PatchError
from livepatch.fingerprint import fingerprint, same_code

PathOrSources = str | os.PathLike[str] | Mapping[str, str]


@dataclass
class BuildResult:
    """The patch text plus what went into it (for ``--json`` and for tests)."""

    text: str
    name: str
    changes: list[Item] = field(default_factory=list)
    notes: list[Item] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return [c.what for c in self.changes]

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "modules": list(self.modules),
            "changes": [c.to_dict() for c in self.changes],
            "notes": [n.to_dict() for n in self.notes],
        }


def build(
    old: PathOrSources,
    new: PathOrSources,
    *,
    module: str | None = None,
    root: str | None = None,
    allow_data: bool = False,
    allow_signature_change: bool = False,
    include_docstrings: bool = False,
    name: str | None = None,
    description: str | None = None,
) -> str:
    """The text of a patch file that turns `old` into `new` in a live process.

    `old` and `new` are two files, two package folders, or two ``{module: source}``
    mappings. Raises `BuildRefused` (an `UnsafeChange`) naming each change that cannot be
    made live, with file:line and what to do instead.
    """
    return build_result(
        old, new, module=module, root=root, allow_data=allow_data,
        allow_signature_change=allow_signature_change,
        include_docstrings=include_docstrings, name=name, description=description,
    ).text


def build_result(
    old: PathOrSources,
    new: PathOrSources,
    *,
    module: str | None = None,
    root: str | None = None,
    allow_data: bool = False,
    allow_signature_change: bool = False,
    include_docstrings: bool = False,
    name: str | None = None,
    description: str | None = None,
) -> BuildResult:
    """Like `build`, returning the changes and notes too."""
    old_tree, new_tree = read_pair(old, new, root=root, module=module)
    options = Options(allow_data, allow_signature_change, include_docstrings)
    return build_trees(old_tree, new_tree, options, name=name, description=description)


def build_git(
    spec: str,
    paths: Iterable[str] = (),
    *,
    repo: str | os.PathLike[str] = ".",
    root: str | None = None,
    allow_data: bool = False,
    allow_signature_change: bool = False,
    include_docstrings: bool = False,
    name: str | None = None,
    description: str | None = None,
) -> BuildResult:
    """Build from ``OLDREV..NEWREV`` in the git repository at `repo` (optionally limited)."""
    old_tree, new_tree = read_git(spec, paths, repo=repo, root=root)
    options = Options(allow_data, allow_signature_change, include_docstrings)
    return build_trees(old_tree, new_tree, options, name=name, description=description)


def build_trees(
    old: SourceTree,
    new: SourceTree,
    options: Options,
    *,
    name: str | None = None,
    description: str | None = None,
) -> BuildResult:
    refusals: list[Refusal] = []
    notes: list[Item] = []
    changes: list[Item] = []
    plans: list[ModulePlan] = []
    new_modules = {m for m in new.files if m not in old.files}
    digest = hashlib.sha256()
    for module in sorted(set(old.files) | set(new.files)):
        before, after = old.files.get(module), new.files.get(module)
        if before is None and after is not None:
            notes.append(Item(after.path, 1, module, NoteKind.NEW_MODULE))
            continue
        if after is None and before is not None:
            notes.append(Item(before.path, 1, module, NoteKind.REMOVED_MODULE))
            continue
        assert before is not None and after is not None
        if before.text == after.text:
            continue
        for part in (module, before.text, after.text):
            digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
        try:
            old_model, new_model = parse_module(before), parse_module(after)
        except ParseFailed as exc:
            refusals.append(exc.refusal)
            continue
        outcome = ModuleAnalysis(old_model, new_model, options, new_modules).run()
        refusals += outcome.refusals
        notes += outcome.notes
        changes += outcome.changes
        if outcome.plan is not None and not outcome.plan.empty:
            plans.append(outcome.plan)
    refusals += _share_helpers(plans)
    if refusals:
        raise BuildRefused(refusals)
    expects: dict[str, str] = {}
    for plan in plans:
        for rep in plan.replacements:
            try:
                expects[rep.target] = _expect_literal(plan.old, rep)
                _check_replacement(plan.new, rep)
            except _Unreproducible as exc:
                refusals.append(exc.refusal)
    if refusals:
        raise BuildRefused(refusals)
    key = lambda item: (item.path, item.line, item.what, item.kind.name)
    changes.sort(key=key)
    notes.sort(key=key)
    patch_name = name or f"build-{digest.hexdigest()[:10]}"
    text = _render(old, new, plans, changes, notes, expects, patch_name, description)
    return BuildResult(text, patch_name, changes, notes, [p.new.name for p in plans])


def _share_helpers(plans: list[ModulePlan]) -> list[Refusal]:
    """Resolve ``from .util import helper`` where the patch adds `helper` to util itself.

    The helper does not exist in the live module when the patch file loads, so the import
    cannot run then; both bindings are made by one callback at apply time instead.
    """
    refusals = []
    by_module = {plan.new.name: plan for plan in plans}
    for plan in plans:
        for binding in list(plan.imports):
            provider = by_module.get(binding.module)
            if binding.attr is None or provider is None:
                continue
            if binding.attr in provider.old.bindings:
                continue  # the live module has it: an ordinary import
            if not any(h.unit.target == binding.attr for h in provider.helpers):
                refusals.append(Refusal(
                    plan.new.path, binding.line, f"{plan.new.name}:{binding.name}",
                    Reason.NOT_UNDERSTOOD,
                    f"the new code imports {binding.attr} from {binding.module}, where it is "
                    "new and not a function this patch adds", Hint.UPGRADE,
                ))
                continue
            plan.imports.remove(binding)
            plan.borrowed.append(binding)
            provider.shared.setdefault(binding.attr, []).append((plan.new.name, binding.name))
    return refusals


def _render(
    old: SourceTree,
    new: SourceTree,
    plans: list[ModulePlan],
    changes: list[Item],
    notes: list[Item],
    expects: dict[str, str],
    patch_name: str,
    description: str | None,
) -> str:
    taken: set[str] = set()
    for plan in plans:
        taken |= plan.live_names | {b.name for b in plan.imports}
        taken |= {n for r in plan.replacements for n in r.live}
        taken |= {n for h in plan.helpers for n in h.live}
        taken |= {c.name for c in plan.constants}
        taken |= {v.unit.name for v in plan.values if not v.unit.owner}
        taken |= {r.new.node.name for r in plan.replacements}
        taken |= {h.unit.node.name for h in plan.helpers}
        taken |= {c.qualname for c in plan.classes}
    if "livepatch" in taken:
        raise BuildRefused([Refusal(plans[0].new.path, 1, plans[0].new.name,
                                    Reason.NOT_UNDERSTOOD,
                                    "the patch would need a name 'livepatch' of its own",
                                    Hint.UPGRADE)])
    patch_var = emit.patch_variable(taken)
    if description is None:
        replaced = sum(len(p.replacements) for p in plans)
        modules = ", ".join(p.new.name for p in plans) or "nothing"
        description = f"livepatch build: {replaced} function(s) replaced in {modules}"
    lines = emit.header(old.label, new.label, changes, notes)
    lines += ["from __future__ import annotations", "", "import livepatch"]
    lines += emit.prelude(plans)
    lines += [
        "",
        f"{patch_var} = livepatch.Patch(",
        f"    {patch_name!r},",
        f"    description={description!r},",
        ")",
    ]
    for plan in plans:
        lines += emit.module_section(plan, patch_var, expects)
    lines += emit.binding_callbacks(plans, patch_var)
    lines += emit.data_callbacks(plans, patch_var)
    text = "\n".join(lines).rstrip("\n") + "\n"
    try:
        compile(text, "<livepatch build output>", "exec", dont_inherit=True)
    except SyntaxError as exc:  # a builder bug: never hand out a broken file
        raise BuildRefused([Refusal("<output>", exc.lineno or 1, patch_name,
                                    Reason.NOT_UNDERSTOOD,
                                    f"the generated patch does not compile ({exc.msg})",
                                    Hint.UPGRADE)]) from None
    return text


class _Unreproducible(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message())
        self.refusal = refusal


def _unreproducible(model: ModuleModel, rep: Replacement, why: str) -> _Unreproducible:
    return _Unreproducible(Refusal(model.path, rep.new.line, rep.target, Reason.NOT_UNDERSTOOD,
                                   why, Hint.UPGRADE))


def _context(model: ModuleModel, code: CodeType, qualname: str) -> codegen.Context:
    """The engine's compilation context for a target, as the live module will give it."""
    base = codegen.Context.of(code, qualname)
    return dataclasses.replace(base, imports=model.import_names)


def _expect_literal(old: ModuleModel, rep: Replacement) -> str:
    """``expect=`` as the old source when it compiles back to the old code, else a fingerprint."""
    code = rep.old.code
    if code is None:
        raise _unreproducible(old, rep, "the compiler made no code object for the old def")
    try:
        text = def_text(old, rep.old.node)
    except SegmentError as exc:
        raise _unreproducible(old, rep, f"its old source cannot be extracted ({exc})") from None
    ctx = _context(old, code, rep.old.qualname)
    try:
        node = codegen.parse_def(text, f"expect of {rep.target}")
        compiled = codegen.compile_expected(node, ctx, f"<expect of {rep.target}>")
        if same_code(compiled, code):
            return emit.string_literal(text)
    except PatchError:
        pass
    # the engine would not accept the source: pin the code (and literal defaults) instead
    if rep.old.nested:
        return repr(fingerprint(code))
    args = rep.old.node.args
    try:
        defaults = tuple(ast.literal_eval(d) for d in args.defaults) or None
        kwdefaults = {
            a.arg: ast.literal_eval(d)
            for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
            if d is not None
        } or None
    except ValueError:
        raise _unreproducible(old, rep, "its old source does not compile back to the live "
                              "code, and its defaults are not literals") from None
    return repr(fingerprint(code, defaults, kwdefaults))


def _check_replacement(new: ModuleModel, rep: Replacement) -> None:
    """The replacement text parses to exactly the new version's def (renames applied), so
    it compiles, in the live context, to what the new version compiles to."""
    try:
        text = def_text(new, rep.new.node, rep.edits)
        tree = ast.parse(text)
    except (SegmentError, SyntaxError) as exc:
        raise _unreproducible(new, rep, f"its new source cannot be moved ({exc})") from None
    node = tree.body[0]
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    if canon(node, decorators=False) != canon(rep.new.node, decorators=False,
                                               rename=rep.renames or None):
        raise _unreproducible(new, rep, "the replacement text does not reproduce the new "
                              "version's def (the builder cannot move it)")


__all__ = ["BuildResult", "build", "build_git", "build_result", "build_trees"]
