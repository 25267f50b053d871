"""Analysis: what a live patch must carry to turn one version of a module into the other.

For a pair of module versions this decides, unit by unit (see `model`):

* which functions are *replaced* — changed bodies, and (kpatch's rule that a function
  referencing changed data is itself changed) unchanged bodies that read a changed
  constant; a change confined to nested ``def``\\ s replaces just those, so closures made
  before the patch get the new code too;
* which names are *added* — new functions, imports the new code needs, changed immutable
  constants under a new name (old code keeps the old value), new values;
* what is *reported and left alone* — formatting, docstring and annotation edits, unused
  changed constants such as ``__version__``, removed functions (kpatch leaves dead code
  too);
* what is *refused* — every change a function-level patch cannot carry: changed kinds,
  free variables, decorators, class layout, mutable data, import-time statements.

Nothing from the target is imported or run: the analysis sees source and the code objects
the compiler makes from it.
"""

from __future__ import annotations

import ast
import builtins
import enum
from dataclasses import dataclass, field

from livepatch.build.compare import (
    Status,
    canon,
    compare_functions,
    dump,
    signature_problem,
    skeleton,
)
from livepatch.build.instance_state import missing_state
from livepatch.build.model import (
    ClassUnit,
    DataUnit,
    FunctionUnit,
    Guard,
    ImportBinding,
    ModuleModel,
    decorator_name,
)
from livepatch.build.names import (
    Edit,
    Usage,
    expression_edits,
    expression_reads,
    rename_edits,
    usage,
)
from livepatch.build.refusal import Hint, Reason, Refusal
from livepatch.build.values import ValueKind, classify

BUILTINS = frozenset(dir(builtins))
_MODULE_ATTRS = frozenset({"__name__", "__file__", "__doc__", "__spec__", "__loader__",
                           "__package__", "__builtins__", "__path__", "__cached__"})
_METADATA = frozenset({"__all__", "__version__", "__author__", "__license__", "__copyright__",
                       "__email__", "__status__", "__credits__", "__maintainer__", "__date__"})
_DESCRIPTORS = frozenset({"staticmethod", "classmethod", "property"})
_ENUM_BASES = frozenset({"Enum", "IntEnum", "StrEnum", "Flag", "IntFlag", "ReprEnum"})
_FIELD_DECORATORS = frozenset({"dataclass", "dataclasses.dataclass", "attr.s", "attr.attrs",
                               "attrs.define", "attr.define", "attrs.frozen", "attr.frozen",
                               "attrs.mutable", "attr.mutable", "define", "frozen", "mutable"})
_FIELD_BASES = frozenset({"NamedTuple", "TypedDict", "BaseModel", "Struct"})


class ChangeKind(enum.Enum):
    """What the patch does about one change."""

    REPLACED = "replaced"
    NESTED = "replaced (nested function: closures made before the patch too)"
    DATA_USER = "replaced so it reads the changed constant"
    HELPER = "added"
    CONSTANT = "added under a new name"
    IMPORT = "added (import the new code needs)"
    VALUE = "added (value the new code needs)"
    CLASS = "added (new class the new code needs)"
    DATA_CALLBACK = "rebound by a post_patch callback (--allow-data)"


class NoteKind(enum.Enum):
    """What the patch leaves alone, and says so."""

    FORMATTING = "formatting or comments changed; not a code change"
    DOCSTRING = "docstring changed; left alone (the live docstring stays)"
    ANNOTATIONS = "annotations changed; left alone (they do not change the code)"
    UNUSED_CONSTANT = "changed, but no function uses it; the process keeps the old value"
    METADATA = "metadata changed; the process keeps the old value"
    REMOVED = "removed in the new version; left in place (dead code, like kpatch)"
    UNUSED_NEW = "new in the new version, but nothing the patch changes uses it; not added"
    MODULE_DOCSTRING = "module docstring changed; left alone"
    GUARDED = "changed inside a block that does not run on import; left alone"
    FUTURE = "__future__ imports changed; the live module keeps its compiler flags"
    SIGNATURE = "signature changed (--allow-signature-change): callers may break"
    NEW_MODULE = "new module; not added (nothing the patch changes imports it)"
    REMOVED_MODULE = "module removed in the new version; left loaded"
    FREEVARS_DROPPED = "no longer uses a free variable; the engine keeps the cell"
    INSTANCE_STATE = "REVIEW: may read an attribute live instances lack"
    OLD_CLOSURES = (
        "replaced whole; closures of its nested functions made before the patch keep "
        "their old code (only new calls make new ones)"
    )


@dataclass(frozen=True)
class Item:
    """One line of the patch header: a change carried, or something left alone."""

    path: str
    line: int
    what: str
    kind: ChangeKind | NoteKind
    detail: str = ""

    def text(self) -> str:
        extra = f" — {self.detail}" if self.detail else ""
        return f"{self.path}:{self.line}: {self.what}: {self.kind.value}{extra}"

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "line": self.line,
            "what": self.what,
            "kind": self.kind.name.lower(),
            "text": self.text(),
        }


@dataclass
class Replacement:
    target: str  # "module:Qual.name"
    old: FunctionUnit
    new: FunctionUnit
    edits: list[Edit]
    def_time: set[str]
    renames: dict[str, str] = field(default_factory=dict)
    live: list[str] = field(default_factory=list)  # def-time names taken from the live module


@dataclass
class Helper:
    target: str
    unit: FunctionUnit
    def_time: set[str]
    live: list[str] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    wrap: str | None = None  # "staticmethod", "classmethod" or "property"


@dataclass
class Constant:
    name: str  # the new name
    old_name: str
    unit: DataUnit
    edits: list[Edit]


@dataclass
class NewValue:
    unit: DataUnit
    edits: list[Edit]


@dataclass
class DataRebind:
    owner: str  # "" (module) or class qualname
    unit: DataUnit
    edits: list[Edit] = field(default_factory=list)


@dataclass
class ModulePlan:
    """Everything the patch file does for one module."""

    old: ModuleModel
    new: ModuleModel
    live_names: set[str] = field(default_factory=set)  # taken from the live module at load
    imports: list[ImportBinding] = field(default_factory=list)
    constants: list[Constant] = field(default_factory=list)
    values: list[NewValue] = field(default_factory=list)
    helpers: list[Helper] = field(default_factory=list)
    replacements: list[Replacement] = field(default_factory=list)
    rebinds: list[DataRebind] = field(default_factory=list)
    classes: list[ClassUnit] = field(default_factory=list)  # new method-less classes
    #: new helpers other modules of the patch import: name → [(module, bound name)]
    shared: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    #: imports of names that another module's section provides (a shared helper)
    borrowed: list[ImportBinding] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.imports or self.constants or self.values or self.helpers
                    or self.replacements or self.rebinds or self.classes)


@dataclass(frozen=True)
class Options:
    allow_data: bool = False
    allow_signature_change: bool = False
    include_docstrings: bool = False


@dataclass
class Outcome:
    plan: ModulePlan | None
    changes: list[Item] = field(default_factory=list)
    notes: list[Item] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


class ModuleAnalysis:
    """Compare the two versions of one module; fill a ModulePlan, notes and refusals."""

    def __init__(
        self, old: ModuleModel, new: ModuleModel, options: Options, new_modules: set[str]
    ) -> None:
        self.old, self.new, self.options = old, new, options
        self.new_modules = new_modules
        self.plan = ModulePlan(old, new)
        self.outcome = Outcome(self.plan)
        self.module = new.name
        # function target → why it is replaced (only top-level units and methods)
        self.whole: dict[str, ChangeKind] = {}
        self.nested: dict[str, ChangeKind] = {}
        self.helpers: dict[str, FunctionUnit] = {}
        self.wraps: dict[str, str] = {}  # new methods' descriptor: staticmethod, ...
        self.renames: dict[str, str] = {}
        self.new_classes: dict[str, ClassUnit] = {}
        self.usages: dict[str, Usage] = {}

    # -- reporting ----------------------------------------------------------------------

    def refuse(
        self, line: int, what: str, reason: Reason, detail: str, hint: Hint, old: bool = False
    ) -> None:
        path = self.old.path if old else self.new.path
        self.outcome.refusals.append(
            Refusal(path, line, self._name(what), reason, detail, hint)
        )

    def note(
        self, line: int, what: str, kind: NoteKind, detail: str = "", old: bool = False
    ) -> None:
        path = self.old.path if old else self.new.path
        self.outcome.notes.append(Item(path, line, self._name(what), kind, detail))

    def change(self, line: int, what: str, kind: ChangeKind, detail: str = "") -> None:
        self.outcome.changes.append(Item(self.new.path, line, self._name(what), kind, detail))

    def _name(self, what: str) -> str:
        if ":" in what or what == self.module:
            return what
        return f"{self.module}:{what}"

    def _usage(self, unit: FunctionUnit) -> Usage:
        key = f"{id(unit)}"
        if key not in self.usages:
            self.usages[key] = usage(unit.node)
        return self.usages[key]

    # -- the passes ---------------------------------------------------------------------

    def run(self) -> Outcome:
        self.bindings()
        self.functions()
        self.classes()
        self.instance_state()
        self.module_level()
        self.data()
        self.dependencies()
        self.assemble()
        return self.outcome

    def bindings(self) -> None:
        for name, kind in self.new.bindings.items():
            before = self.old.bindings.get(name)
            if before is not None and before != kind and "several" not in (before, kind):
                if "statement" in (before, kind):
                    continue  # reported by the statement comparison
                self.refuse(
                    self._line_of(name), name, Reason.NOT_UNDERSTOOD,
                    f"the name was a {before} and is now a {kind}", Hint.UPGRADE,
                )

    def _line_of(self, name: str) -> int:
        for stmt in self.new.tree.body:
            if name in _bound_by(stmt):
                return stmt.lineno
        return 1

    def functions(self) -> None:
        old, new = self.old, self.new
        for target, unit in new.functions.items():
            if unit.nested:
                continue
            before = old.functions.get(target)
            if before is None:
                if any(c not in old.classes for c in unit.classes):
                    continue  # part of a new class
                self.new_function(unit)
                continue
            self.compare_unit(before, unit)
        for target, unit in old.functions.items():
            if unit.nested or target in new.functions:
                continue
            if any(c not in new.classes for c in unit.classes):
                continue  # the class is reported
            self.note(unit.line, target, NoteKind.REMOVED, old=True)

    def new_function(self, unit: FunctionUnit) -> None:
        if unit.duplicate:
            self.refuse(unit.line, unit.target, Reason.NOT_UNDERSTOOD,
                        "new function defined more than once", Hint.UPGRADE)
            return
        names = [decorator_name(d) or "?" for d in unit.node.decorator_list]
        wrap = names[0] if len(names) == 1 and names[0] in _DESCRIPTORS else None
        if names and (wrap is None or not unit.classes):
            self.refuse(
                unit.line, unit.target, Reason.DECORATOR,
                f"new function is decorated ({', '.join(names)}); a patch adds plain "
                "functions, and staticmethod/classmethod/property methods, only",
                Hint.UPGRADE,
            )
            return
        # the engine gives a new *method* a __class__ cell bound to the live class, so
        # zero-argument super() works there; nothing else can be closed over
        allowed = {"__class__"} if unit.classes else set()
        if unit.code is not None and set(unit.code.co_freevars) - allowed:
            self.refuse(
                unit.line, unit.target, Reason.FREE_VARIABLES,
                "the new function closes over "
                f"{', '.join(sorted(set(unit.code.co_freevars) - allowed))}", Hint.UPGRADE,
            )
            return
        self.helpers[unit.target] = unit
        if wrap is not None:
            self.wraps[unit.target] = wrap

    def compare_unit(self, old: FunctionUnit, new: FunctionUnit) -> None:
        if _text(self.old, old) == _text(self.new, new) and old.classes == new.classes:
            return  # the same text in the same place: at most a line shift, not a change
        verdict = compare_functions(old, new)
        if verdict.status is Status.SAME:
            if _text(self.old, old) != _text(self.new, new):
                self.note(new.line, new.target, NoteKind.FORMATTING)
            return
        if old.duplicate or new.duplicate:
            self.refuse(new.line, new.target, Reason.NOT_UNDERSTOOD,
                        "the function is defined more than once; which one is live is unclear",
                        Hint.UPGRADE)
            return
        if verdict.problem is not None:
            self._refuse_verdict(new, verdict.problem, verdict.problem_kind)
            return
        if verdict.status is Status.DOCSTRING and not self.options.include_docstrings:
            self.note(new.line, new.target, NoteKind.DOCSTRING)
            return
        if verdict.status is Status.ANNOTATIONS:
            self.note(new.line, new.target, NoteKind.ANNOTATIONS)
            return
        self._check_freevars_dropped(old, new)
        nested = self.nested_targets(old, new)
        if nested is None:
            self.whole[new.target] = ChangeKind.REPLACED
            stale = self._changed_children(old, new)
            if stale:
                self.note(new.line, new.target, NoteKind.OLD_CLOSURES, ", ".join(stale))
        else:
            for target in nested:
                self.nested[target] = ChangeKind.NESTED

    def _check_freevars_dropped(self, old: FunctionUnit, new: FunctionUnit) -> None:
        if old.code is not None and new.code is not None:
            dropped = sorted(set(old.code.co_freevars) - set(new.code.co_freevars))
            if dropped:
                self.note(new.line, new.target, NoteKind.FREEVARS_DROPPED, ", ".join(dropped))

    def _refuse_verdict(self, unit: FunctionUnit, problem: str, kind: str | None) -> None:
        if kind == "signature":
            if self.options.allow_signature_change:
                self.note(unit.line, unit.target, NoteKind.SIGNATURE, problem)
                self.whole[unit.target] = ChangeKind.REPLACED
                return
            self.refuse(unit.line, unit.target, Reason.SIGNATURE, problem, Hint.ALLOW_SIGNATURE)
        elif kind == "kind":
            self.refuse(unit.line, unit.target, Reason.KIND, problem, Hint.UPGRADE)
        elif kind == "freevars":
            hint = Hint.SUPER if "__class__" in problem else Hint.UPGRADE
            self.refuse(unit.line, unit.target, Reason.FREE_VARIABLES, problem, hint)
        else:
            self.refuse(unit.line, unit.target, Reason.DECORATOR, problem, Hint.UPGRADE)

    def _changed_children(self, old: FunctionUnit, new: FunctionUnit) -> list[str]:
        """Nested defs of `new` whose code differs: closures of them made before the patch
        keep the old code when the parent is replaced whole."""
        before = {u.target: u for u in self.old.functions.values() if u.parent == old.target}
        changed = []
        for child in self.new.functions.values():
            if child.parent != new.target:
                continue
            twin = before.get(child.target)
            if twin is None or canon(twin.node) != canon(child.node):
                changed.append(child.qualname.rpartition(".")[2])
        return changed

    def nested_targets(self, old: FunctionUnit, new: FunctionUnit) -> list[str] | None:
        """Targets for a change confined to nested defs, or None to replace `new` whole."""
        if old.target != old.qualname:
            # property accessors (``x.fset``) and private methods (``_Cart__m``): the
            # engine finds nested functions through the qualname, which names neither
            return None
        old_children = [u for u in self.old.functions.values() if u.parent == old.target]
        new_children = [u for u in self.new.functions.values() if u.parent == new.target]
        if not new_children:
            return None
        if sorted(u.target for u in old_children) != sorted(u.target for u in new_children):
            return None
        if any(u.duplicate for u in [*old_children, *new_children]):
            return None
        if skeleton(old.node, [u.node for u in old_children]) != skeleton(
            new.node, [u.node for u in new_children]
        ):
            return None
        by_target = {u.target: u for u in old_children}
        targets: list[str] = []
        for child in new_children:
            before = by_target[child.target]
            verdict = compare_functions(before, child)
            if verdict.status is Status.SAME:
                continue
            if verdict.problem is not None or verdict.status is not Status.CHANGED:
                if verdict.status in (Status.DOCSTRING, Status.ANNOTATIONS) and not (
                    verdict.problem
                ):
                    continue
                return None
            if self._usage(child).def_time or self._usage(before).def_time:
                return None  # defaults evaluated in the parent: the patch file cannot
            deeper = self.nested_targets(before, child)
            targets.extend([child.target] if deeper is None else deeper)
        return targets or None

    # -- classes ------------------------------------------------------------------------

    def classes(self) -> None:
        old, new = self.old, self.new
        for qualname, unit in new.classes.items():
            before = old.classes.get(qualname)
            if before is None:
                outer = qualname.rpartition(".")[0]
                if not outer or outer in old.classes:
                    self.new_classes[qualname] = unit
                continue
            self.compare_class(before, unit)
        for qualname, unit in old.classes.items():
            if qualname not in new.classes and qualname.rpartition(".")[0] in (
                "", *new.classes
            ):
                self.note(unit.line, qualname, NoteKind.REMOVED, old=True)

    def instance_state(self) -> None:
        """Refuse replaced or added methods that read an attribute only the new version
        gives instances: the live ones lack it (see `instance_state`)."""
        changed = {*self.whole, *self.helpers}
        changed |= {target.partition(".<locals>")[0] for target in self.nested}
        for unit in self.new.classes.values():
            if _is_enum(unit.node) or _has_fields(unit.node):
                continue  # members and fields are compared as such
            for miss in missing_state(self.old, self.new, unit, changed):
                reads = (f"reads self.{miss.attribute}, which only the new "
                         f"{miss.assigned_in} sets")
                if miss.bases:  # a base defined elsewhere may give it: say so, not refuse
                    self.note(miss.line, miss.method.target, NoteKind.INSTANCE_STATE,
                              f"{reads}; unless {' or '.join(miss.bases)} gives instances "
                              f"{miss.attribute}, those made before the patch have none")
                    continue
                self.refuse(
                    miss.line, miss.method.target, Reason.INSTANCE_STATE,
                    f"{reads}: instances made before the patch have no {miss.attribute}",
                    Hint.INSTANCE_DEFAULT,
                )

    def compare_class(self, old: ClassUnit, new: ClassUnit) -> None:
        what, line = new.qualname, new.line
        o, n = old.node, new.node
        if dump(o.bases) != dump(n.bases):
            self.refuse(line, what, Reason.BASES,
                        "its bases changed; live instances keep the old MRO", Hint.UPGRADE)
        old_meta = [k for k in o.keywords if k.arg == "metaclass"]
        new_meta = [k for k in n.keywords if k.arg == "metaclass"]
        if dump(old_meta) != dump(new_meta):
            self.refuse(line, what, Reason.METACLASS, "its metaclass changed", Hint.UPGRADE)
        elif dump(o.keywords) != dump(n.keywords):
            self.refuse(line, what, Reason.BASES, "its class keywords changed", Hint.UPGRADE)
        if dump(o.decorator_list) != dump(n.decorator_list):
            self.refuse(line, what, Reason.DECORATOR,
                        "its class decorators changed; they ran when the class was made",
                        Hint.UPGRADE)
        if _is_enum(n):
            self._compare_members(old, new)
        fields_class = _has_fields(n)
        if dump(old.fields) != dump(new.fields):
            if fields_class and _field_layout(old) != _field_layout(new):
                self.refuse(line, what, Reason.FIELDS,
                            "its fields changed; live instances have the old layout",
                            Hint.SHADOW)
            else:
                self.note(line, what, NoteKind.ANNOTATIONS)
        if dump(old.statements) != dump(new.statements):
            stmt = _first_difference(old.statements, new.statements)
            self.refuse(getattr(stmt, "lineno", line), what, Reason.SIDE_EFFECT,
                        "a statement in the class body changed; it ran when the class was made",
                        Hint.UPGRADE)
        if not _is_enum(n):
            self._compare_class_data(old, new, fields_class)

    def _compare_members(self, old: ClassUnit, new: ClassUnit) -> None:
        if _members(old) != _members(new):
            self.refuse(new.line, new.qualname, Reason.ENUM, "its members changed; live "
                        "members are singletons other code holds", Hint.UPGRADE)

    def _compare_class_data(self, old: ClassUnit, new: ClassUnit, fields_class: bool) -> None:
        for name, unit in new.data.items():
            before = old.data.get(name)
            if before is not None and dump(before.value) == dump(unit.value):
                continue
            what = f"{new.qualname}.{name}"
            if name == "__slots__":
                self.refuse(unit.line, what, Reason.SLOTS,
                            "__slots__ changed; live instances have the old layout", Hint.SHADOW)
                continue
            if fields_class and isinstance(unit.stmt, ast.AnnAssign):
                self.refuse(unit.line, what, Reason.FIELDS,
                            "a field changed; live instances have the old layout", Hint.SHADOW)
                continue
            if before is None:
                # a new name on the live class: added before any new code runs, like a helper
                kind = self.value_kind(unit.value)
                if kind in (ValueKind.IMMUTABLE, ValueKind.MUTABLE):
                    self.plan.values.append(NewValue(unit, []))
                    self.change(unit.line, what, ChangeKind.VALUE, "new class attribute")
                else:
                    self.refuse(unit.line, what, Reason.CLASS_DATA,
                                f"new class attribute whose value is a {kind.value} the "
                                "builder will not run", Hint.CALLBACK)
                continue
            self._class_rebind(new, unit, what, "class attribute changed")
        for name, unit in old.data.items():
            if name not in new.data:
                self.note(unit.line, f"{new.qualname}.{name}", NoteKind.REMOVED, old=True)

    def _class_rebind(self, cls: ClassUnit, unit: DataUnit, what: str, detail: str) -> None:
        kind = self.value_kind(unit.value)
        if kind is ValueKind.CODE:
            self.refuse(unit.line, what, Reason.LAMBDA, f"{detail} to a lambda; turn it into a "
                        "def", Hint.UPGRADE)
        elif self.options.allow_data and kind in (ValueKind.IMMUTABLE, ValueKind.MUTABLE):
            self.plan.rebinds.append(DataRebind(cls.qualname, unit))
            self.change(unit.line, what, ChangeKind.DATA_CALLBACK,
                        f"REVIEW: {detail}; instances and subclasses see the new value")
        elif self.options.allow_data:
            self.refuse(unit.line, what, Reason.CLASS_DATA,
                        f"{detail}; its value is computed by a call the builder will not run",
                        Hint.CALLBACK)
        else:
            self.refuse(unit.line, what, Reason.CLASS_DATA,
                        f"{detail}; instances and subclasses read it live", Hint.ALLOW_DATA)

    # -- module level -------------------------------------------------------------------

    def module_level(self) -> None:
        old, new = self.old, self.new
        if old.docstring != new.docstring:
            self.note(1, self.module, NoteKind.MODULE_DOCSTRING)
        for guard in Guard:
            if dump(old.guarded.get(guard, [])) != dump(new.guarded.get(guard, [])):
                stmts = new.guarded.get(guard) or old.guarded.get(guard) or []
                line = stmts[0].lineno if stmts else 1
                self.note(line, self.module, NoteKind.GUARDED, guard.value)
        if old.future_flags != new.future_flags:
            self.note(1, self.module, NoteKind.FUTURE)
        if dump(old.statements) != dump(new.statements):
            stmt = _first_difference(old.statements, new.statements)
            in_new = any(s is stmt for s in new.statements)
            self.refuse(
                getattr(stmt, "lineno", 1), self.module, Reason.SIDE_EFFECT,
                "a module-level statement changed; it ran when the module was imported and "
                "will not run again", Hint.UPGRADE, old=not in_new,
            )

    # -- data ---------------------------------------------------------------------------

    def value_kind(self, expr: ast.expr, model: ModuleModel | None = None) -> ValueKind:
        model = model or self.new
        re_names = {n for n, b in model.imports.items() if b.module == "re" and b.attr is None}
        seen: set[str] = set()

        refs = frozenset(
            n for n, kind in model.bindings.items() if kind in ("function", "class", "import")
        )

        def resolve(name: str) -> ValueKind | None:
            unit = model.data.get(name)
            if unit is None or name in seen:
                return None
            seen.add(name)
            return classify(unit.value, resolve, re_names, refs)

        return classify(expr, resolve, re_names, refs)

    def readers(self, name: str) -> list[FunctionUnit]:
        """Top-level units and methods of the new version that read global `name`."""
        found = []
        for unit in self.new.functions.values():
            if unit.nested:
                continue
            use = self._usage(unit)
            if name in use.all_reads or name in use.ambiguous or name in use.writes:
                found.append(unit)
        return found

    def data(self) -> None:
        old, new = self.old, self.new
        changed: dict[str, DataUnit] = {}
        for name, unit in new.data.items():
            before = old.data.get(name)
            if before is not None and dump(before.value) != dump(unit.value):
                changed[name] = unit
        # a value computed from a changed value changed too
        grew = True
        while grew:
            grew = False
            for name, unit in new.data.items():
                if name not in changed and name in old.data:
                    if expression_reads(unit.value) & set(changed):
                        changed[name] = unit
                        grew = True
        # constants the renamed constants are computed from must be renamed too, or the
        # new value would be computed from the live (old) one
        immutable = {n for n in changed if self.value_kind(changed[n].value) is ValueKind.IMMUTABLE}
        self.derived_from: set[str] = set()
        work = [n for n in immutable if self.readers(n)]
        while work:
            for dep in expression_reads(changed[work.pop()].value) & immutable:
                if dep not in self.derived_from:
                    self.derived_from.add(dep)
                    work.append(dep)
        for name in sorted(changed, key=lambda n: changed[n].line):
            self.changed_value(name, changed[name])
        for name, unit in old.data.items():
            if name not in new.data and name not in new.bindings:
                self.note(unit.line, name, NoteKind.REMOVED, old=True)
        self._refuse_unchanged_readers_of(changed)

    def _refuse_unchanged_readers_of(self, changed: dict[str, DataUnit]) -> None:
        names = set(changed)
        if not names:
            return
        for stmt in self.new.statements:
            hit = expression_reads(stmt) & names
            if hit:
                self.refuse(stmt.lineno, self.module, Reason.NOT_UNDERSTOOD,
                            f"an import-time statement reads {', '.join(sorted(hit))}, which "
                            "changed; it will not run again", Hint.UPGRADE)
        for cls in self.new.classes.values():
            for stmt in [*cls.statements, *(d.stmt for d in cls.data.values())]:
                hit = expression_reads(stmt) & names
                if hit:
                    self.refuse(stmt.lineno, cls.qualname, Reason.CLASS_DATA,
                                f"the class body reads {', '.join(sorted(hit))}, which changed; "
                                "the class keeps the old value", Hint.ALLOW_DATA)
            for dec in cls.node.decorator_list + cls.node.bases:
                hit = expression_reads(dec) & names
                if hit:
                    self.refuse(cls.line, cls.qualname, Reason.NOT_UNDERSTOOD,
                                f"the class statement reads {', '.join(sorted(hit))}, which "
                                "changed", Hint.UPGRADE)
        for unit in self.new.functions.values():
            if unit.nested:
                continue
            for dec in unit.node.decorator_list:
                hit = expression_reads(dec) & names
                if hit:
                    self.refuse(unit.line, unit.target, Reason.DECORATOR,
                                f"a decorator reads {', '.join(sorted(hit))}, which changed; "
                                "the live decorator keeps the old value", Hint.UPGRADE)

    def changed_value(self, name: str, unit: DataUnit) -> None:
        kind = self.value_kind(unit.value)
        readers = self.readers(name)
        if _is_dunder(name) and not readers and name not in self.derived_from:
            # __version__, __version_info__, __all__...: metadata nothing here reads
            self.note(unit.line, name, NoteKind.METADATA, _short(self.old, self.old.data[name]))
            return
        if kind is ValueKind.CODE:
            self.refuse(unit.line, name, Reason.LAMBDA, "a lambda changed; lambdas cannot be "
                        "patched by name — turn it into a def", Hint.UPGRADE)
            return
        if kind is ValueKind.IMMUTABLE:
            if not readers and name not in self.derived_from:
                kind_note = NoteKind.METADATA if name in _METADATA else NoteKind.UNUSED_CONSTANT
                self.note(unit.line, name, kind_note, _short(self.old, self.old.data[name]))
                return
            bad = [r for r in readers if name in self._usage(r).writes
                   or name in self._usage(r).ambiguous]
            if bad:
                self.refuse(bad[0].line, bad[0].target, Reason.NOT_UNDERSTOOD,
                            f"it rebinds or shadows {name}, a changed constant, so the "
                            "builder cannot give it the new value under a new name",
                            Hint.UPGRADE)
                return
            new_name = self._fresh_name(name)
            self.renames[name] = new_name
            self.plan.constants.append(Constant(new_name, name, unit, []))
            self.change(unit.line, name, ChangeKind.CONSTANT,
                        f"as {new_name}; old code keeps the old value, new code reads the new")
            for reader in readers:
                if reader.target in self.whole or reader.target not in self.old.functions:
                    continue  # already replaced, or new (helpers are renamed as they are emitted)
                inside = [t for t in self.nested if _descends(t, reader.target, self.new)]
                for t in inside:
                    del self.nested[t]
                self.whole[reader.target] = (
                    ChangeKind.REPLACED if inside else ChangeKind.DATA_USER
                )
            return
        if name in _METADATA and not readers:
            self.note(unit.line, name, NoteKind.METADATA)
            return
        if kind is ValueKind.UNKNOWN and not self.options.allow_data:
            self.refuse(unit.line, name, Reason.MUTABLE_DATA,
                        "its value is computed by a call (possibly mutable, possibly with side "
                        "effects); the live module keeps the old object", Hint.ALLOW_DATA)
            return
        if kind is ValueKind.UNKNOWN:
            self.refuse(unit.line, name, Reason.MUTABLE_DATA,
                        "its value is computed by a call the builder will not run",
                        Hint.CALLBACK)
            return
        if not self.options.allow_data:
            self.refuse(unit.line, name, Reason.MUTABLE_DATA,
                        "mutable data changed; live code and other modules hold the old object",
                        Hint.ALLOW_DATA)
            return
        self.plan.rebinds.append(DataRebind("", unit))
        self.change(unit.line, name, ChangeKind.DATA_CALLBACK,
                    "REVIEW: old and new code both see the new value after the patch")

    def _fresh_name(self, name: str) -> str:
        taken = set(self.old.bindings) | set(self.new.bindings) | set(self.renames.values())
        number = 2
        while f"{name}__lp{number}" in taken:
            number += 1
        return f"{name}__lp{number}"

    # -- what the emitted code needs ------------------------------------------------------

    def dependencies(self) -> None:
        """Bring in the new names that the emitted code reads; refuse what cannot come."""
        old, new = self.old, self.new
        provided: set[str] = set(self.renames.values())
        pending: set[str] = set()
        for target in [*self.whole, *self.helpers]:
            unit = new.functions[target]
            pending |= self._usage(unit).all_reads
        for target in self.nested:
            pending |= self._usage(new.functions[target]).reads
        for constant in self.plan.constants:
            pending |= expression_reads(constant.unit.value)
        for rebind in self.plan.rebinds:
            pending |= expression_reads(rebind.unit.value)
        done: set[str] = set()
        while pending:
            name = pending.pop()
            if name in done:
                continue
            done.add(name)
            if name in provided or name in old.bindings or name in _MODULE_ATTRS:
                continue
            if name in self.renames:
                continue
            if name in new.imports:
                binding = new.imports[name]
                if _module_is_new(binding.module, self.new_modules):
                    self.refuse(binding.line, name, Reason.NEW_MODULE,
                                f"the new code imports {binding.module}, a module that is new "
                                "in this version; a patch cannot add modules", Hint.UPGRADE)
                    continue
                self.plan.imports.append(binding)
                provided.add(name)
                self.change(binding.line, name, ChangeKind.IMPORT,
                            f"from {binding.module}" if binding.attr else "")
                continue
            if name in new.data:
                value = new.data[name]
                kind = self.value_kind(value.value)
                if kind in (ValueKind.IMMUTABLE, ValueKind.MUTABLE):
                    self.plan.values.append(NewValue(value, []))
                    provided.add(name)
                    pending |= expression_reads(value.value)
                    self.change(value.line, name, ChangeKind.VALUE)
                else:
                    self.refuse(value.line, name, Reason.NOT_UNDERSTOOD,
                                f"the new code needs {name}, whose value is a "
                                f"{kind.value} the builder will not run", Hint.CALLBACK)
                continue
            if name in self.new_classes or name in new.classes:
                unit_c = new.classes[name]
                why = _not_simple(unit_c) if name in self.new_classes else "it is not new"
                if why is None:
                    # a class without methods (an exception, a marker) runs no code of its
                    # own, so it can be made in the patch file and added like a value
                    self.plan.classes.append(unit_c)
                    provided.add(name)
                    pending |= _class_reads(unit_c)
                    self.change(unit_c.line, name, ChangeKind.CLASS, "no methods")
                    continue
                self.refuse(unit_c.line, name, Reason.NEW_CLASS,
                            f"the new code needs this new class, and {why}: its methods "
                            "would not see the module's globals", Hint.UPGRADE)
                continue
            if name in new.functions and name in self.helpers:
                continue
            if name in BUILTINS or old.star_import or new.star_import:
                continue
            if name in new.bindings:
                self.refuse(self._line_of(name), name, Reason.NOT_UNDERSTOOD,
                            f"the new code needs {name}, which the new version binds in a way "
                            "the builder does not follow", Hint.UPGRADE)
        for name, data in new.data.items():
            if name not in old.bindings and name not in provided:
                self.note(data.line, name, NoteKind.UNUSED_NEW)
        for name, binding in new.imports.items():
            if name not in old.bindings and name not in provided:
                self.note(binding.line, name, NoteKind.UNUSED_NEW)
            elif name in old.imports and old.imports[name].key() != binding.key():
                if any(name in self._usage(new.functions[t]).all_reads
                       for t in [*self.whole, *self.helpers, *self.nested]):
                    self.refuse(binding.line, name, Reason.IMPORT_CHANGED,
                                "the import changed and the new code uses it; the live module "
                                "keeps the old binding", Hint.UPGRADE)
                else:
                    self.note(binding.line, name, NoteKind.FORMATTING, "import source changed; "
                              "the live module keeps the old binding")
        for name, binding in old.imports.items():
            if name not in new.bindings:
                self.note(binding.line, name, NoteKind.REMOVED, old=True)
        for qualname, cls in self.new_classes.items():
            if "." not in qualname and qualname not in provided and not any(
                r.what == self._name(qualname) for r in self.outcome.refusals
            ):
                self.note(cls.line, qualname, NoteKind.UNUSED_NEW, "new class")

    # -- assembling the plan ---------------------------------------------------------------

    def assemble(self) -> None:
        new, old = self.new, self.old
        module = self.module
        for target, unit in new.functions.items():
            if target in self.whole:
                before = old.functions[target]
                edits = rename_edits(unit.node, self.renames) if self.renames else []
                use = self._usage(unit)
                self.plan.replacements.append(
                    Replacement(f"{module}:{target}", before, unit, edits, set(use.def_time),
                                dict(self.renames), self._live_names(unit, use.def_time))
                )
                kind = self.whole[target]
                detail = _safe_because(before, unit)
                if kind is ChangeKind.DATA_USER:
                    used = sorted(n for n in self.renames if n in use.all_reads)
                    detail = f"its body is unchanged; it reads {', '.join(used)}"
                self.change(unit.line, target, kind, detail)
            elif target in self.nested:
                before = old.functions[target]
                self.plan.replacements.append(
                    Replacement(f"{module}:{target}", before, unit, [], set())
                )
                self.change(unit.line, target, ChangeKind.NESTED, _safe_because(before, unit))
            elif target in self.helpers:
                use = self._usage(unit)
                self.plan.helpers.append(Helper(f"{module}:{target}", unit, set(use.def_time),
                                                self._live_names(unit, use.def_time),
                                                rename_edits(unit.node, self.renames),
                                                self.wraps.get(target)))
                self.change(unit.line, target, ChangeKind.HELPER, "new function")
        for constant in self.plan.constants:
            constant.edits = expression_edits(constant.unit.value, self.renames)
            self._live_names_expr(constant.unit, self.renames)
        for value in self.plan.values:
            value.edits = expression_edits(value.unit.value, self.renames)
            self._live_names_expr(value.unit, self.renames)
        for rebind in self.plan.rebinds:
            rebind.edits = expression_edits(rebind.unit.value, self.renames)
            self._live_names_expr(rebind.unit, self.renames)
        made = {c.qualname for c in self.plan.classes}
        for cls in self.plan.classes:
            for name in sorted(_class_reads(cls) - made):
                if self._need_live(name, cls.line, cls.qualname):
                    self.plan.live_names.add(name)

    def _live_names(self, unit: FunctionUnit, names: set[str]) -> list[str]:
        return [n for n in sorted(names) if self._need_live(n, unit.line, unit.target)]

    def _live_names_expr(self, unit: DataUnit, renames: dict[str, str]) -> None:
        for name in sorted(expression_reads(unit.value)):
            if name not in renames and self._need_live(name, unit.line, unit.name):
                self.plan.live_names.add(name)

    def _need_live(self, name: str, line: int, what: str) -> bool:
        """Must the patch file take `name` from the live module to evaluate a default or a
        value when it loads? (Renamed constants and new names are its own.)"""
        if name in self.renames.values() or name in self.renames:
            return False
        provided = {b.name for b in self.plan.imports}
        provided |= {v.unit.name for v in self.plan.values if not v.unit.owner}
        provided |= {c.qualname for c in self.plan.classes}
        if name in provided:
            return False
        if name in self.old.bindings:
            return True
        if name not in BUILTINS:
            self.refuse(line, what, Reason.NOT_UNDERSTOOD,
                        f"a default value or constant reads {name}, which is not a global of "
                        "the live module (a class attribute?)", Hint.UPGRADE)
        return False


# -- helpers --------------------------------------------------------------------------------


def _text(model: ModuleModel, unit: FunctionUnit) -> str:
    node = unit.node
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return "".join(model.lines[first - 1 : node.end_lineno])


def _short(model: ModuleModel, unit: DataUnit) -> str:
    from livepatch.build.segments import expr_text

    try:
        text = expr_text(model, unit.value)
    except Exception:  # the note is informative only
        return ""
    text = " ".join(text.split())
    return f"keeps {text[:60]}{'...' if len(text) > 60 else ''}"


def _safe_because(old: FunctionUnit, new: FunctionUnit) -> str:
    parts = ["same kind, free variables and decorators"]
    if signature_problem(old.node.args, new.node.args) is None:
        if dump(old.node.args) == dump(new.node.args):
            parts.append("same signature")
        else:
            parts.append("compatible signature")
    return "; ".join(parts)


def _first_difference(old: list[ast.stmt], new: list[ast.stmt]) -> ast.stmt:
    for a, b in zip(old, new, strict=False):
        if dump(a) != dump(b):
            return b
    if len(new) > len(old):
        return new[len(old)]
    return old[len(new)] if len(old) > len(new) else (new or old)[0]


def _bound_by(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    names = set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).partition(".")[0])
    return names


def _is_enum(node: ast.ClassDef) -> bool:
    for base in node.bases:
        name = decorator_name(base).split(".")[-1]
        if name in _ENUM_BASES or name.endswith("Enum"):
            return True
    return False


def _has_fields(node: ast.ClassDef) -> bool:
    if any(decorator_name(d) in _FIELD_DECORATORS for d in node.decorator_list):
        return True
    return any(decorator_name(b).split(".")[-1] in _FIELD_BASES for b in node.bases)


def _members(cls: ClassUnit) -> dict[str, str]:
    return {k: dump(v.value) for k, v in cls.data.items() if not k.startswith("_")}


def _field_layout(cls: ClassUnit) -> list[tuple[str, bool]]:
    """Field names in order, and whether each is a ClassVar/InitVar (not a field at all):
    what decides an instance's layout. The annotated type alone does not."""
    return [
        (dump(f.target), any(w in dump(f.annotation) for w in ("ClassVar", "InitVar")))
        for f in cls.fields
    ]


def _not_simple(cls: ClassUnit) -> str | None:
    """Why a new class cannot be made in the patch file (None: it can)."""
    node = cls.node
    if node.decorator_list:
        return "it is decorated"
    if node.keywords:
        return "it has class keywords"
    for stmt in node.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return "it defines methods or classes"
        if not isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.Pass, ast.Expr)):
            return "its body runs statements"
        if isinstance(stmt, ast.Expr) and not isinstance(stmt.value, ast.Constant):
            return "its body runs statements"
    return None


def _class_reads(cls: ClassUnit) -> set[str]:
    """Globals a method-less class statement reads (bases, attribute values)."""
    names: set[str] = set()
    for base in cls.node.bases:
        names |= expression_reads(base)
    local: set[str] = set()
    for stmt in cls.node.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            names |= expression_reads(stmt.value) - local
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            local |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _descends(target: str, ancestor: str, model: ModuleModel) -> bool:
    unit = model.functions.get(target)
    while unit is not None and unit.parent is not None:
        if unit.parent == ancestor:
            return True
        unit = model.functions.get(unit.parent)
    return False


def _module_is_new(name: str, new_modules: set[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in new_modules)
