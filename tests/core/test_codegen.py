"""codegen compiles a patch's ``def`` in the target's context without changing the tree
it was given (planning shares it across compiles), including trees built by a program
rather than parsed, whose nodes carry no line numbers."""

from __future__ import annotations

import argparse
import ast
import asyncio.tasks
import dis
import importlib
import json.decoder
import types
import typing

import pytest

from livepatch import codegen
from livepatch.errors import PatchError, UnsafeChange
from livepatch.fingerprint import same_code

core = importlib.import_module("livepatch.core")

SOURCE = '''
@decorated
def f(x):
    """Doc."""
    return x + 1
'''


def parsed() -> ast.FunctionDef:
    node = ast.parse(SOURCE).body[0]
    assert isinstance(node, ast.FunctionDef)
    return node


def context(freevars: tuple[str, ...] = (), class_name: str | None = None) -> codegen.Context:
    qualname = f"{class_name}.f" if class_name else "f"
    return codegen.Context(qualname, freevars, class_name, 0)


@pytest.mark.parametrize(
    "ctx",
    [context(), context(freevars=("unused",)), context(class_name="Cart")],
    ids=["plain", "padded free variable", "in a class"],
)
def test_compiling_leaves_the_given_tree_as_it_was(ctx: codegen.Context) -> None:
    node = parsed()
    before = ast.dump(node, include_attributes=True)
    first = codegen.compile_function(node, ctx, "<patch>")
    second = codegen.compile_function(node, ctx, "<patch>")
    assert ast.dump(node, include_attributes=True) == before
    assert first.co_freevars == second.co_freevars == ctx.freevars
    assert first.co_qualname == ctx.qualname
    assert first.co_firstlineno == 3  # the def's own line in the patch source


def test_a_tree_built_without_line_numbers_compiles_at_the_def_line() -> None:
    node = ast.FunctionDef(
        name="f",
        args=ast.arguments(posonlyargs=[], args=[ast.arg("x")], kwonlyargs=[],
                           kw_defaults=[], defaults=[]),
        body=[ast.Return(ast.BinOp(ast.Name("x", ast.Load()), ast.Add(), ast.Constant(2)))],
        decorator_list=[],
        lineno=7,
        **({"type_params": []} if "type_params" in ast.FunctionDef._fields else {}),
    )
    code = codegen.compile_function(node, context(), "<built>")
    fn = types.FunctionType(code, {})
    assert fn(1) == 3
    assert {line for _, _, line in code.co_lines() if line is not None} == {7}
    assert getattr(node.body[0], "lineno", None) is None  # the caller's tree is untouched


def test_a_def_that_does_not_compile_names_the_patch_line() -> None:
    node = ast.parse("def f():\n    return (yield)\n").body[0]
    assert isinstance(node, ast.FunctionDef)
    node.body.append(ast.parse("nonlocal q", mode="exec").body[0])
    with pytest.raises(PatchError, match="does not compile in the target's context"):
        codegen.compile_function(node, context(), "<patch>")


def _names_by_dis(code: types.CodeType) -> set[str]:
    names = {
        str(i.argval) for i in dis.get_instructions(code)
        if i.opname in ("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_by_dis(const)
    return names


# more than 256 names: their indexes need EXTENDED_ARG
MANY = "def f():\n    global s0\n    s0 = 1\n    del s0\n    return (" + ", ".join(
    f"g{i}" for i in range(400)) + ")\n" + "".join(f"n{i} = m{i}\n" for i in range(300))


@pytest.mark.parametrize("source", [argparse, asyncio.tasks, json.decoder, typing, MANY],
                         ids=["argparse", "asyncio.tasks", "json.decoder", "typing", "many"])
def test_global_names_read_from_bytecode_agree_with_dis(source: object) -> None:
    """Planning reads the globals a replacement uses straight from its bytecode (dis made
    an object per instruction); on whole stdlib modules and on code with more than 256
    names (EXTENDED_ARG), it must find exactly what dis finds."""
    if isinstance(source, str):
        code = compile(source, "<many>", "exec")
    else:
        assert isinstance(source, types.ModuleType) and source.__file__ is not None
        with open(source.__file__, encoding="utf-8") as f:
            code = compile(f.read(), source.__file__, "exec")
    found = core._global_names(code)
    assert found == _names_by_dis(code)
    if source is MANY:
        assert {"g399", "m299", "s0"} <= found


# -- a replacement's own code, when it needs no context --------------------------------

PATCH_FILE = '''
import os
import json as j

def deco(f):
    return f

@deco
def plain(x):
    """Doc."""
    return x + 1

@deco
def busy(x, *args, k=3, **kw):
    y = [i for i in range(x) if os.path.exists(str(i))]
    g = lambda z: z + x
    try:
        return j.dumps(y), g(1), {n: n for n in args}, os.getpid()
    except Exception as exc:
        raise ValueError("no") from exc
    finally:
        del y

@deco
def shadows(os):
    return os.path, j.loads("1")

@deco
def generator(n):
    total = yield from range(n)
    def inner(a):
        return a * n
    return inner(total)

@deco
async def coroutine(xs):
    async with xs as x:
        return [y async for y in x], (z := 1), f"{z!r:>4}"

@deco
def private(self):
    return self.__secret, dict(__key=1)

@deco
def calls_super(self):
    return super().calls_super()

@deco
def matches(v):
    match v:
        case {"k": [a, *rest]} if a:
            return rest
        case _:
            return None
'''


def patch_file() -> tuple[dict[str, types.FunctionType], dict[str, codegen.FunctionNode]]:
    """Each def of PATCH_FILE as the patch file's own code made it, and its tree."""
    namespace: dict[str, object] = {}
    exec(compile(PATCH_FILE, "patch.py", "exec", dont_inherit=True), namespace)
    nodes = {n.name: n for n in ast.parse(PATCH_FILE).body if isinstance(n, codegen.FunctionNode)}
    functions = {k: v for k, v in namespace.items() if isinstance(v, types.FunctionType)}
    return functions, nodes


def same_but_first_line(fast: types.CodeType, compiled: types.CodeType) -> bool:
    """Equal but for the first line: the decorator's, not the def's, as CPython gives a
    decorated def. The prologue a frame starts with (making cells, starting a generator)
    sits on that line, so its instructions' positions differ the same way."""
    moved = fast.replace(co_firstlineno=compiled.co_firstlineno,
                         co_linetable=compiled.co_linetable)

    def at(code: types.CodeType) -> list[object]:
        first = code.co_firstlineno
        return ["first" if p[0] == first else p for p in code.co_positions()]

    return moved == compiled and at(fast) == at(compiled)


@pytest.mark.parametrize("method", [False, True], ids=["function", "method"])
@pytest.mark.parametrize("name", ["plain", "busy", "shadows", "generator", "coroutine",
                                  "matches"])
def test_a_top_level_replacement_uses_its_own_code_as_compiling_would_make_it(
    name: str, method: bool
) -> None:
    functions, nodes = patch_file()
    ours = codegen.imports_in("patch.py", PATCH_FILE.splitlines(keepends=True))
    assert ours == ("j", "os")
    owner = "Cart" if method else None
    qualname = f"Cart.Target_{name}" if method else f"Target_{name}"
    ctx = codegen.Context(qualname, (), owner, 0, imports=("j", "os", "sys"))
    fast = codegen.compiled_already(functions[name].__code__, ctx, ours, "shown.py")
    compiled = codegen.compile_function(nodes[name], ctx, "shown.py")
    assert fast is not None
    assert same_but_first_line(fast, compiled)
    assert fast.co_firstlineno == compiled.co_firstlineno - 1  # the decorator's line
    assert fast.co_qualname == compiled.co_qualname == qualname
    nested = [c for c in fast.co_consts if isinstance(c, types.CodeType)]
    assert all(c.co_filename == "shown.py" for c in [fast, *nested])
    # code equality leaves qualified names out: compare the nested ones too
    assert [c.co_qualname for c in nested] == [
        c.co_qualname for c in compiled.co_consts if isinstance(c, types.CodeType)
    ]


@pytest.mark.parametrize(
    ("name", "ctx"),
    [
        ("busy", codegen.Context("f", ("cell",), None, 0, ("j", "os"))),
        ("private", codegen.Context("Cart.f", (), "Cart", 0, ("j", "os"))),
        ("calls_super", codegen.Context("Cart.f", (), "Cart", 0, ("j", "os"))),
        ("busy", codegen.Context("f", (), None, codegen._FUTURE_MASK & 0x1000000, ("j", "os"))),
        ("busy", codegen.Context("f", (), None, 0, ("j",))),  # os: the patch file's only
    ],
    ids=["free variable", "private name in a method", "super in a method",
         "future annotations", "another import"],
)
def test_a_replacement_that_needs_its_context_is_compiled(
    name: str, ctx: codegen.Context
) -> None:
    functions, nodes = patch_file()
    code = functions[name].__code__
    assert codegen.compiled_already(code, ctx, ("j", "os"), "shown.py") is None
    if ctx.imports == ("j",) or ctx.class_name:
        # why: the compiler treats `os.path` differently when the file's top level
        # imports `os`, and mangles `__secret` in a class (`super()` needs a cell there)
        try:
            compiled = codegen.compile_function(nodes[name], ctx, "shown.py")
        except UnsafeChange:
            assert name == "calls_super"  # the live method has no __class__ cell
            return
        assert not same_but_first_line(code.replace(co_flags=compiled.co_flags,
                                                    co_filename="shown.py",
                                                    co_qualname=ctx.qualname), compiled)


CONTEXTS = {
    "function": codegen.Context("f", (), None, 0),
    "method": codegen.Context("Cart.f", (), "Cart", 0),
    "imports": codegen.Context("f", (), None, 0, ("j", "os", "sys")),
    "future": codegen.Context("f", (), None, codegen._FUTURE_MASK & 0x1000000),
    "free variable": codegen.Context("f", ("cell",), None, 0),
}


@pytest.mark.parametrize("where", CONTEXTS)
@pytest.mark.parametrize("name", ["plain", "busy", "shadows", "generator", "coroutine",
                                  "matches", "private"])
def test_expected_source_compiles_to_what_its_context_makes(name: str, where: str) -> None:
    """expect= is compiled alone when its context could not change it (the cheap path);
    either way the code equals what compiling in the target's context makes."""
    _, nodes = patch_file()
    ctx = CONTEXTS[where]
    expected = codegen.compile_expected(nodes[name], ctx, "<expect>")
    assert same_code(expected, codegen.compile_plain(nodes[name], ctx, "<expect>"))
    alone = codegen._compile_alone(nodes[name], ctx, "<expect>")
    needs_context = (
        where == "free variable"
        or (where == "method" and name == "private")  # self.__secret is mangled
        or (where == "imports" and name in ("busy", "shadows"))  # they use os or j
    )
    assert (alone is None) == needs_context
