"""`livepatch build`: the command-line face of the builder.

``livepatch build OLD NEW [-o FILE]`` compares two files or two package folders;
``livepatch build --git OLDREV..NEWREV [PATH...]`` compares two revisions of the
repository you stand in. The patch file goes to FILE (or stdout); the list of changes and
of what was left alone goes to stderr, so ``build ... > fix.py`` stays clean.

Exit codes follow the rest of the CLI: 0 written, 1 refused (each unsafe change is listed
with file:line, reason and hint), 2 bad usage or unreadable input. With ``--json`` one
JSON document is printed on stdout, on failure too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from livepatch.build.builder import BuildResult, build_git, build_result
from livepatch.build.refusal import BuildInputError, BuildRefused
from livepatch.errors import PatchError

EXIT_REFUSED = 1
EXIT_USAGE = 2


def _emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _fail(exc: PatchError, as_json: bool) -> None:
    code = EXIT_REFUSED if isinstance(exc, BuildRefused) else EXIT_USAGE
    if as_json:
        payload: dict[str, Any] = {"ok": False, "code": exc.code, "message": str(exc)}
        if isinstance(exc, BuildRefused):
            payload["refusals"] = [r.to_dict() for r in exc.refusals]
        _emit_json(payload)
    else:
        if isinstance(exc, BuildRefused):
            click.echo(f"livepatch build: refused {len(exc.refusals)} change(s):", err=True)
            for refusal in exc.refusals:
                click.echo(f"  {refusal.message()}", err=True)
        else:
            click.echo(f"livepatch build: {exc}", err=True)
    sys.exit(code)


@click.command(name="build")
@click.argument("sources", nargs=-1, metavar="OLD NEW | PATH...")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the patch here "
              "(default: stdout).")
@click.option("--git", "git_range", metavar="OLDREV..NEWREV",
              help="Compare two revisions of the current git repository; arguments are then "
              "paths that limit the comparison.")
@click.option("--root", help="Folder that module names are relative to (default: derived "
              "from the __init__.py layout).")
@click.option("--module", help="Module name, when OLD and NEW are two single files.")
@click.option("--allow-data", is_flag=True, help="Turn changed mutable data into a reviewable "
              "post_patch callback instead of refusing.")
@click.option("--allow-signature-change", is_flag=True, help="Accept signature changes that "
              "may break existing callers (with a warning in the header).")
@click.option("--include-docstrings", is_flag=True, help="Patch functions whose docstring is "
              "the only change (skipped by default).")
@click.option("--name", help="Patch name (default: build-<hash of the inputs>).")
@click.option("--description", help="Patch description.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
def build_command(
    sources: tuple[str, ...],
    output: str | None,
    git_range: str | None,
    root: str | None,
    module: str | None,
    allow_data: bool,
    allow_signature_change: bool,
    include_docstrings: bool,
    name: str | None,
    description: str | None,
    as_json: bool,
) -> None:
    """Build a patch file from two versions of the source (kpatch-build for Python).

    \b
      livepatch build old/cart.py new/cart.py -o fix.py
      livepatch build old/shop new/shop -o fix.py
      livepatch build --git v1.2..v1.3 src/shop -o fix.py
    """
    options = dict(
        root=root,
        allow_data=allow_data,
        allow_signature_change=allow_signature_change,
        include_docstrings=include_docstrings,
        name=name,
        description=description,
    )
    try:
        if git_range is not None:
            if module is not None:
                raise BuildInputError("--module is for two single files, not --git")
            result = build_git(git_range, sources, **options)  # type: ignore[arg-type]
        else:
            if len(sources) != 2:
                raise BuildInputError("pass OLD and NEW (two files or two folders), or --git")
            result = build_result(sources[0], sources[1], module=module, **options)  # type: ignore[arg-type]
    except PatchError as exc:
        _fail(exc, as_json)
        return
    _deliver(result, output, as_json)


def _deliver(result: BuildResult, output: str | None, as_json: bool) -> None:
    if output is not None:
        try:
            Path(output).write_text(result.text, encoding="utf-8")
        except OSError as exc:
            _fail(BuildInputError(f"cannot write {output}: {exc}"), as_json)
    if as_json:
        payload: dict[str, Any] = {"ok": True, "output": output, **result.to_dict()}
        if output is None:
            payload["text"] = result.text
        _emit_json(payload)
        return
    if output is None:
        sys.stdout.write(result.text)
    summary = click.style if sys.stderr.isatty() else (lambda text, **_: text)
    click.echo(summary(f"livepatch build: {len(result.changes)} change(s), "
                       f"{len(result.notes)} left alone", bold=True), err=True)
    for item in result.changes:
        click.echo(f"  + {item.text()}", err=True)
    for item in result.notes:
        click.echo(f"  = {item.text()}", err=True)
    if output is not None:
        click.echo(f"wrote {output}", err=True)
