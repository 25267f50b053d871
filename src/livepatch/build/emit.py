"""Emitting the patch file: the same format a developer would write by hand.

The output is meant to be read before it is applied, so it is plain Python in a fixed
shape: a header listing every change carried (and why it is safe) and everything left
alone; then, module by module, the names the file takes from the live module, the imports
and values the new code needs (``patch.new``), changed constants under their new names,
new helpers, and one ``@patch.function`` per replaced function, with the old source as
``expect=`` so the engine refuses a process that runs anything else. Names the new code
imports with ``from ... import`` (and helpers shared between modules) are bound by a
``pre_patch`` callback and unbound by ``post_unpatch``; data changes accepted with
``--allow-data`` are rebound by a ``post_patch`` callback marked REVIEW.

Everything is ordered by module name and source position, so the same input gives
byte-identical output.
"""

from __future__ import annotations

import ast

from livepatch.build.analysis import DataRebind, Item, ModulePlan, Replacement
from livepatch.build.model import ImportBinding, mangle
from livepatch.build.segments import def_text, expr_text

_DATA_NEW = "_lp_new_data"
_DATA_OLD = "_lp_old_data"
_SYS = "_lp_sys"
_IMPORTS = "_lp_imports"
_BOUND = "_lp_bound"


def string_literal(text: str, indent: str = "    ") -> str:
    """A literal for `text`: raw and triple-quoted when that reads back exactly (its value
    then starts with a newline, which ``expect=`` ignores), else one line per source line."""
    return _literal(text, indent)


def _literal(text: str, indent: str) -> str:
    printable = all(ch.isprintable() or ch in "\n\t" for ch in text)
    if printable and "\r" not in text and not text.endswith("\\"):
        for quote in ("'''", '"""'):
            if quote in text or text.endswith(quote[0]):
                continue
            candidate = f"r{quote}\n{text}{quote}"
            try:
                if ast.literal_eval(candidate) == "\n" + text:
                    return candidate
            except (SyntaxError, ValueError):
                continue
    lines = text.splitlines(keepends=True) or [""]
    body = "".join(f"{indent}    {line!r}\n" for line in lines)
    return f"(\n{body}{indent})"


def patch_variable(taken: set[str]) -> str:
    name = "patch"
    while name in taken:
        name += "_"
    return name


def header(
    old_label: str,
    new_label: str,
    changes: list[Item],
    notes: list[Item],
) -> list[str]:
    out = [
        "# Live patch built by `livepatch build`. Review it before applying:",
        "# every replaced function checks (expect=) that the process runs the old source.",
        "#",
        f"# old: {old_label}",
        f"# new: {new_label}",
        "#",
    ]
    if changes:
        out.append("# Changes carried by this patch (and why each is safe to make live):")
        out.extend(f"#   {_one_line(item.text())}" for item in changes)
    else:
        out.append("# No code changes to carry.")
    if notes:
        out.append("#")
        out.append("# Reported and left alone:")
        out.extend(f"#   {_one_line(item.text())}" for item in notes)
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def import_lines(binding: ImportBinding) -> list[str]:
    if binding.attr is not None:
        alias = "" if binding.attr == binding.name else f" as {binding.name}"
        return [f"from {binding.module} import {binding.attr}{alias}"]
    if binding.binds_top:
        return [f"import {binding.module}"]
    top = binding.module
    alias = "" if top == binding.name else f" as {binding.name}"
    return [f"import {binding.module}{alias}"]


def module_section(
    plan: ModulePlan, patch_var: str, expects: dict[str, str]
) -> list[str]:
    """The lines for one module; `expects` maps each target to its expect= literal text."""
    new, module = plan.new, plan.new.name
    out = ["", "", f"# == {module} ({new.path}) " + "=" * max(3, 70 - len(module) - len(new.path))]
    if plan.live_names:
        out += ["", "# what the values below are computed from: the live module's objects"]
        out += _take_live(plan, sorted(plan.live_names))
    if plan.imports:
        out += ["", "# imports the new code needs; the live module gets the same names"]
        for binding in sorted(plan.imports, key=lambda b: (b.line, b.name)):
            out += import_lines(binding)
            if binding.attr is None:
                out.append(f'{patch_var}.new("{module}:{binding.name}", {binding.name})')
            else:
                out.append(
                    f'{_IMPORTS}.append(("{module}", "{binding.name}", {binding.name}, None))'
                )
    for binding in plan.borrowed:
        out += ["", f"# {binding.name}: the patch adds it to {binding.module}; bound with it below"]
    if plan.constants:
        out += [
            "",
            "# changed constants: the new code reads them under new names, old code keeps the",
            "# old values (kpatch: changed data becomes a new symbol)",
        ]
        for constant in plan.constants:
            value = expr_text(new, constant.unit.value, constant.edits)
            out.append(f"{constant.name} = {value}")
            out.append(f'{patch_var}.new("{module}:{constant.name}", {constant.name})')
    if plan.values:
        out += ["", "# new values the new code needs"]
        for item in sorted(plan.values, key=lambda v: v.unit.line):
            value = expr_text(new, item.unit.value, item.edits)
            if item.unit.owner:
                target = f"{module}:{item.unit.owner}.{mangle(item.unit.owner, item.unit.name)}"
                out.append(f'{patch_var}.new("{target}", {value})')
                continue
            out.append(f"{item.unit.name} = {value}")
            out.append(f'{patch_var}.new("{module}:{item.unit.name}", {item.unit.name})')
    for cls in sorted(plan.classes, key=lambda c: c.line):
        out += ["", "", "# a new class the new code needs (no methods: it runs no code of its own)"]
        out += def_text(new, cls.node).rstrip("\n").split("\n")
        out.append("")
        out.append(f'{cls.qualname}.__module__ = "{module}"')
        out.append(f'{patch_var}.new("{module}:{cls.qualname}", {cls.qualname})')
    for helper in plan.helpers:
        users = plan.shared.get(helper.unit.target)
        if users is None and helper.wrap is not None:
            # the descriptor is applied here; the engine rebuilds the function inside it
            out += ["", "", *_live_import(plan, helper.live)]
            out += def_text(new, helper.unit.node, helper.edits).rstrip("\n").split("\n")
            out.append("")
            name = helper.unit.node.name
            out.append(f'{patch_var}.new("{helper.target}", {helper.wrap}({name}))')
            continue
        if users is None:
            out += ["", "", *_live_import(plan, helper.live)]
            out.append(f'@{patch_var}.new("{helper.target}")')
            out += def_text(new, helper.unit.node, helper.edits).rstrip("\n").split("\n")
            continue
        names = ", ".join(f"{m}:{n}" for m, n in users)
        out += ["", "", *_live_import(plan, helper.live)]
        out += [f"# new helper, also imported by {names}: bound by _lp_bind_imports"]
        out += def_text(new, helper.unit.node, helper.edits).rstrip("\n").split("\n")
        name = helper.unit.node.name
        out.append("")
        out.append(f'{_IMPORTS}.append(("{module}", "{name}", {name}, "{module}"))')
        for user_module, user_name in users:
            out.append(f'{_IMPORTS}.append(("{user_module}", "{user_name}", {name}, "{module}"))')
    for rep in plan.replacements:
        out += ["", "", *_live_import(plan, rep.live)]
        scope = _scope_names(rep)
        pad = "    " if scope else ""
        if scope:
            # `nonlocal` needs an enclosing function even here; the engine compiles the
            # def in the live function's own context, these placeholders only let it load
            holder = "_lp_scope_" + rep.target.partition(":")[2].replace(".<locals>.", "_")
            holder = holder.replace(".", "_")
            out.append(f"def {holder}():")
            out += [f"    {name} = None" for name in scope]
        out += [f"{pad}@{patch_var}.function(", f'{pad}    "{rep.target}",']
        out.append(f"{pad}    expect={expects[rep.target]},")
        out.append(f"{pad})")
        out += def_text(new, rep.new.node, rep.edits, pad).rstrip("\n").split("\n")
        if scope:
            out += ["", "", f"{holder}()"]
    if plan.rebinds:
        out += ["", "# new values for data rebound by the callbacks at the end of this file"]
        for rebind in plan.rebinds:
            value = expr_text(new, rebind.unit.value, rebind.edits)
            out.append(f'{_DATA_NEW}["{_key(module, rebind)}"] = {value}')
    return out


def _live_import(plan: ModulePlan, names: list[str]) -> list[str]:
    """The live objects a signature's defaults name (a sentinel must be *the* sentinel)."""
    if not names:
        return []
    return [
        "# defaults below are evaluated when this file loads: with the live module's objects",
        *_take_live(plan, names),
        "",
        "",
    ]


def _take_live(plan: ModulePlan, names: list[str]) -> list[str]:
    """Bind `names` as the live module has them. Names it imported are imported the same
    way (the same objects, and the target module need not be importable just to load or
    check the patch); the rest come from the target module itself."""
    out: list[str] = []
    own = []
    for name in names:
        binding = plan.old.imports.get(name)
        if binding is None:
            own.append(name)
        else:
            out += import_lines(binding)
    if own:
        joined = ", ".join(own)
        module = plan.new.name
        out.append(_wrap_import(module, own) if len(joined) > 60 else
                   f"from {module} import {joined}")
    return out


def _scope_names(rep: Replacement) -> list[str]:
    if rep.new.code is None or not rep.new.code.co_freevars:
        return []
    if not any(isinstance(n, ast.Nonlocal) for n in ast.walk(rep.new.node)):
        return []
    return [n for n in rep.new.code.co_freevars if n != "__class__"]


def _wrap_import(module: str, names: list[str]) -> str:
    body = "".join(f"    {n},\n" for n in names)
    return f"from {module} import (\n{body})"


def _key(module: str, rebind: DataRebind) -> str:
    owner = f"{rebind.owner}." if rebind.owner else ""
    return f"{module}:{owner}{rebind.unit.name}"


def prelude(plans: list[ModulePlan]) -> list[str]:
    """Shared state of the callbacks at the end of the file, if any are needed."""
    rebinds = any(p.rebinds for p in plans)
    imports = _needs_bindings(plans)
    if not (rebinds or imports):
        return []
    out = ["", f"import sys as {_SYS}", ""]
    if imports:
        out.append(f"{_IMPORTS}: list = []  # (module, name, value, home): _lp_bind_imports")
        out.append(f"{_BOUND}: list = []  # what _lp_bind_imports bound, for the revert")
    if rebinds:
        out += [f"{_DATA_NEW}: dict = {{}}", f"{_DATA_OLD}: dict = {{}}"]
    return out


def _needs_bindings(plans: list[ModulePlan]) -> bool:
    return any(p.shared or any(b.attr is not None for b in p.imports) for p in plans)


def binding_callbacks(plans: list[ModulePlan], patch_var: str) -> list[str]:
    if not _needs_bindings(plans):
        return []
    return [
        "",
        "",
        "# == names imported with `from ... import`, and helpers shared between modules ====",
        "# Bound by callbacks rather than patch.new, which would rebuild an imported function",
        "# on the target module's globals; a helper with a home module runs with its globals.",
        "",
        "",
        f"@{patch_var}.pre_patch",
        "def _lp_bind_imports():",
        "    built = {}",
        "    values = []",
        f"    for module, name, value, home in {_IMPORTS}:",
        "        if home is not None:",
        "            if id(value) not in built:",
        f"                fn = type(value)(value.__code__, vars({_SYS}.modules[home]),",
        "                                 value.__name__, value.__defaults__)",
        "                fn.__kwdefaults__, fn.__doc__ = value.__kwdefaults__, value.__doc__",
        "                fn.__module__ = home",
        "                built[id(value)] = fn",
        "            value = built[id(value)]",
        "        values.append((module, name, value))",
        "    for module, name, value in values:",
        f"        if vars({_SYS}.modules[module]).get(name, value) is not value:",
        '            raise RuntimeError(f"{module}:{name} exists already; not shadowing it")',
        "    for module, name, value in values:",
        f"        setattr({_SYS}.modules[module], name, value)",
        f"    {_BOUND}[:] = values",
        "",
        "",
        f"@{patch_var}.post_unpatch",
        "def _lp_unbind_imports():",
        f"    for module, name, value in {_BOUND}:",
        f"        if vars({_SYS}.modules[module]).get(name) is value:",
        f"            delattr({_SYS}.modules[module], name)",
        f"    {_BOUND}.clear()",
    ]


def data_callbacks(plans: list[ModulePlan], patch_var: str) -> list[str]:
    rebinds = [(p.new.name, r) for p in plans for r in p.rebinds]
    if not rebinds:
        return []
    out = [
        "",
        "",
        "# == data (--allow-data): REVIEW ===================================================",
        "",
        "",
        f"@{patch_var}.post_patch",
        "def _lp_rebind_data():",
        '    """REVIEW: rebind changed data to the new version\'s values.',
        "",
        "    Old and new code both see the new values from here on; code that copied the old",
        "    object (``from m import NAME``, an instance attribute) keeps the old one.",
        '    """',
    ]
    for module, rebind in rebinds:
        holder = _holder(module, rebind)
        key = _key(module, rebind)
        name = rebind.unit.name
        name = mangle(rebind.owner, name) if rebind.owner else name
        out.append(f'    {_DATA_OLD}["{key}"] = getattr({holder}, "{name}")')
        out.append(f'    setattr({holder}, "{name}", {_DATA_NEW}["{key}"])')
    out += [
        "",
        "",
        f"@{patch_var}.post_unpatch",
        "def _lp_restore_data():",
        '    """Put the old values back (after a revert, or a reversed transition)."""',
    ]
    for module, rebind in rebinds:
        holder = _holder(module, rebind)
        key = _key(module, rebind)
        name = mangle(rebind.owner, rebind.unit.name) if rebind.owner else rebind.unit.name
        out.append(f'    if "{key}" in {_DATA_OLD}:')
        out.append(f'        setattr({holder}, "{name}", {_DATA_OLD}.pop("{key}"))')
    return out


def _holder(module: str, rebind: DataRebind) -> str:
    path = "".join(f".{part}" for part in rebind.owner.split(".")) if rebind.owner else ""
    return f'{_SYS}.modules["{module}"]{path}'
