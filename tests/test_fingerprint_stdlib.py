"""Fingerprints on real code: every function of a set of stdlib modules, recompiled from its
own source in its context, must match the live code — and a one-token edit must not."""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Iterator

import pytest

from livepatch import codegen
from livepatch.fingerprint import fingerprint, same_code

MODULES = [
    "json.decoder", "json.encoder", "email.message", "http.client", "argparse", "textwrap",
    "functools", "dataclasses", "asyncio.tasks", "logging", "collections", "ipaddress",
    "shutil", "typing", "enum", "inspect",
]


def functions(module: types.ModuleType) -> Iterator[tuple[str, types.FunctionType]]:
    def walk(obj: object, prefix: str, depth: int) -> Iterator[tuple[str, types.FunctionType]]:
        for name, value in list(vars(obj).items()):
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            qualname = prefix + name
            if (
                isinstance(value, types.FunctionType)
                and value.__module__ == module.__name__
                and value.__code__.co_qualname == qualname
            ):
                yield qualname, value
            elif (
                isinstance(value, type)
                and value.__module__ == module.__name__
                and value.__qualname__ == qualname
                and depth < 2
            ):
                yield from walk(value, qualname + ".", depth + 1)

    yield from walk(module, "", 0)


def recompile(
    module: types.ModuleType, qualname: str, fn: types.FunctionType, source: str,
    from_text: bool = True,
) -> types.CodeType:
    node = codegen.parse_def(source, qualname)
    ctx = codegen.Context.of(fn.__code__, qualname, module)
    if from_text:  # what planning does with expect=: the text where it can, else the tree
        return codegen.compile_expected(source, node, ctx, "<recompiled>")
    return codegen.compile_plain(node, ctx, "<recompiled>")


@pytest.mark.parametrize("from_text", [True, False], ids=["expected", "plain"])
@pytest.mark.parametrize("name", MODULES)
def test_live_code_matches_its_own_source(name: str, from_text: bool) -> None:
    module = importlib.import_module(name)
    checked = 0
    mismatched = []
    for qualname, fn in functions(module):
        code = recompile(module, qualname, fn, inspect.getsource(fn), from_text)
        checked += 1
        if not same_code(code, fn.__code__):
            mismatched.append(qualname)
        elif fingerprint(code) != fingerprint(fn.__code__):
            mismatched.append(qualname + " (fingerprint)")
    assert checked > 5
    assert mismatched == []


def test_a_one_token_edit_does_not_match() -> None:
    module = importlib.import_module("textwrap")
    fn = module.TextWrapper._split
    source = inspect.getsource(fn)
    edited = source.replace("self.wordsep_re", "self.wordsep_simple_re", 1)
    assert edited != source
    assert not same_code(recompile(module, "TextWrapper._split", fn, edited), fn.__code__)
    assert not same_code(recompile(module, "TextWrapper._split", fn, edited, False),
                         fn.__code__)
