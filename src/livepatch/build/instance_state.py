"""Instance state: attributes the new code reads that live instances were never given.

A live patch replaces code, not objects. When the new version of a class gives its
instances a new attribute (``self.warmup = 100`` in ``__init__``) and a replaced method
reads it (``self.warmup``), every instance made before the patch lacks it: the first call
of the new method on one raises ``AttributeError`` — in a training loop on day three, in
every request of a server. kpatch has the same trap with a field added to a struct, and
the same ways out: a default every object sees, or a shadow variable.

So, for each class that exists in both versions, this finds the attributes only the new
version assigns on ``self`` (nowhere in the old class, not a class attribute of either
version, not provided by a base class of the same module) and the replaced or added
methods that read them unguarded. Reads are guarded when the method looks before it reads
(``hasattr``/``getattr`` with that name, an ``except AttributeError``) or assigns the
attribute itself; ``__init__`` and its kin run on new instances only. A class whose
instances take attributes the source does not name (``__getattr__``, ``setattr`` with a
computed name, ``__dict__`` updates) is left alone: nothing here can know what its live
instances hold.

Attributes are read by name, statically, on the method's first parameter only; an
attribute read through another name (``other.warmup``) is not seen.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass

from livepatch.build.model import ClassUnit, FunctionUnit, ModuleModel, decorator_name

#: methods that run on instances the new code makes, never on the live ones
_CONSTRUCTION = frozenset({"__init__", "__new__", "__post_init__", "__init_subclass__",
                           "__set_name__", "__class_getitem__"})
#: methods through which an instance can hold attributes the source does not name
_DYNAMIC = frozenset({"__getattr__", "__getattribute__", "__setstate__", "__dict__"})


@dataclass(frozen=True)
class MissingState:
    """A replaced or added method reads an attribute instances made before the patch lack
    — for certain, or unless one of `bases` (defined elsewhere, so unseen) gives it."""

    method: FunctionUnit
    attribute: str
    line: int  # of the read
    assigned_in: str  # the new method that assigns it ("__init__")
    bases: tuple[str, ...] = ()


def missing_state(
    old: ModuleModel, new: ModuleModel, cls: ClassUnit, changed: set[str]
) -> list[MissingState]:
    """The unguarded reads, in methods of `cls` whose targets are in `changed`, of
    attributes that only the new version of `cls` assigns."""
    old_cls = old.classes.get(cls.qualname)
    if old_cls is None:
        return []  # a new class: no instance of it is alive
    old_methods, new_methods = _methods(old, old_cls), _methods(new, cls)
    if _dynamic(old_methods) or _dynamic(new_methods):
        return []
    # the old class's annotations without a value declare what its instances hold (a
    # dataclass's fields are assigned by code the source does not show)
    declared = {f.target.id for f in old_cls.fields if isinstance(f.target, ast.Name)}
    unseen = _unseen_bases(old, old_cls)
    known = (_assigned(old_methods) | _class_names(old, old_cls) | _class_names(new, cls)
             | _base_names(old, old_cls) | _base_names(new, cls) | declared)
    fresh: dict[str, FunctionUnit] = {}  # attribute → a new method that assigns it
    for method in sorted(new_methods, key=lambda m: _name(m) not in _CONSTRUCTION):
        for name in _self_stores(method) - known:
            fresh.setdefault(name, method)
    found = []
    for method in new_methods:
        if method.target not in changed or _name(method) in _CONSTRUCTION:
            continue
        me = _instance_parameter(method)
        if me is None:
            continue
        guarded = _guarded(method, me)
        if guarded is None:
            continue
        for node in ast.walk(method.node):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
                    and isinstance(node.value, ast.Name) and node.value.id == me
                    and node.attr in fresh and node.attr not in guarded):
                found.append(MissingState(method, node.attr, node.lineno,
                                          _name(fresh[node.attr]), unseen))
                guarded.add(node.attr)  # one report per attribute and method
    return found


def _name(method: FunctionUnit) -> str:
    return method.qualname.rpartition(".")[2]


def _methods(model: ModuleModel, cls: ClassUnit) -> list[FunctionUnit]:
    return [u for u in model.functions.values()
            if not u.nested and u.classes and u.classes[-1] == cls.qualname]


def _instance_parameter(method: FunctionUnit) -> str | None:
    """The name the method calls its instance, or None for static and class methods."""
    decorators = {decorator_name(d) for d in method.node.decorator_list}
    if decorators & {"staticmethod", "classmethod"}:
        return None
    args = method.node.args
    positional = [*args.posonlyargs, *args.args]
    return positional[0].arg if positional else None


def _self_stores(method: FunctionUnit) -> set[str]:
    """Attributes the method assigns on its instance."""
    me = _instance_parameter(method)
    if me is None:
        return set()
    names = set()
    for node in ast.walk(method.node):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store | ast.Del)
                and isinstance(node.value, ast.Name) and node.value.id == me):
            names.add(node.attr)
        elif (_calls(node, "setattr") and isinstance(node, ast.Call) and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            names.add(node.args[1].value)
    return names


def _assigned(methods: list[FunctionUnit]) -> set[str]:
    return {name for method in methods for name in _self_stores(method)}


def _class_names(model: ModuleModel, cls: ClassUnit) -> set[str]:
    """Names the class itself binds: methods, properties, data, nested classes."""
    names = set(cls.data)
    names |= {_name(u) for u in _methods(model, cls)}
    names |= {q.rpartition(".")[2] for q in model.classes
              if q.rpartition(".")[0] == cls.qualname}
    for stmt in cls.node.body:  # __slots__ and the like also name instance attributes
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name) and target.id == "__slots__":
                    names |= _strings(stmt.value)
    return names


def _base_names(model: ModuleModel, cls: ClassUnit, seen: frozenset[str] = frozenset()) -> set[str]:
    """What base classes give instances: those defined in the same module (recursively),
    and builtin ones (``Exception`` gives ``args``)."""
    names: set[str] = set()
    for base in cls.node.bases:
        name = decorator_name(base) or ""
        builtin = getattr(builtins, name, None)
        if isinstance(builtin, type) and name not in model.classes:
            names |= set(dir(builtin))
            continue
        found = model.classes.get(name)
        if found is None or found.qualname in seen:
            continue
        methods = _methods(model, found)
        names |= _assigned(methods) | _class_names(model, found)
        names |= _base_names(model, found, seen | {cls.qualname})
    return names


def _unseen_bases(model: ModuleModel, cls: ClassUnit,
                  seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Bases of `cls`, or of its bases in the same module, defined elsewhere: what they
    give instances cannot be read here (``threading.Thread`` gives ``name``)."""
    unseen: list[str] = []
    for base in cls.node.bases:
        name = decorator_name(base) or ast.unparse(base)
        found = model.classes.get(name)
        if found is not None and found.qualname not in seen:
            unseen += _unseen_bases(model, found, seen | {cls.qualname})
        elif found is None and not isinstance(getattr(builtins, name, None), type):
            unseen.append(name)
    return tuple(dict.fromkeys(unseen))


def _dynamic(methods: list[FunctionUnit]) -> bool:
    """Whether instances may hold attributes the source does not name."""
    if any(_name(m) in _DYNAMIC for m in methods):
        return True
    for method in methods:
        me = _instance_parameter(method)
        for node in ast.walk(method.node):
            if isinstance(node, ast.Attribute) and node.attr == "__dict__":
                return True
            if isinstance(node, ast.Call) and _calls(node, "setattr", "vars") and node.args:
                first = node.args[0]
                computed = len(node.args) < 2 or not isinstance(node.args[1], ast.Constant)
                if isinstance(first, ast.Name) and first.id == me and (
                        computed or _calls(node, "vars")):
                    return True
    return False


def _guarded(method: FunctionUnit, me: str) -> set[str] | None:
    """Attributes the method checks for, or assigns, before relying on them; None if it
    catches AttributeError (any of them, then)."""
    names = _self_stores(method)
    for node in ast.walk(method.node):
        if isinstance(node, ast.ExceptHandler) and node.type is not None and any(
                isinstance(n, ast.Name) and n.id == "AttributeError"
                for n in ast.walk(node.type)):
            return None
        if (isinstance(node, ast.Call) and _calls(node, "hasattr", "getattr")
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Name)
                and node.args[0].id == me and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            names.add(node.args[1].value)
    return names


def _calls(node: ast.AST, *names: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in names)


def _strings(node: ast.expr) -> set[str]:
    return {n.value for n in ast.walk(node)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}
