"""Sources: the two versions a build compares, read from files, folders or git.

A live patch names its targets by *module*, so every source file must get the module
name the running process imported it under. Like the import system, we derive it from the
package layout: a folder with an ``__init__.py`` is a package, and a file's module name runs
from its topmost enclosing package down to the file (``src/shop/cart.py`` →
``shop.cart``). ``root`` overrides the search (names are then relative to it), and a
single pair of files can be given its module name outright.

Only files whose text differs are parsed later, so reading a whole tree stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from livepatch.build.refusal import BuildInputError


@dataclass(frozen=True)
class SourceFile:
    """One module's source text and where it came from (shown in messages)."""

    module: str
    path: str
    text: str


@dataclass
class SourceTree:
    """Module name → source of one version of the code."""

    label: str
    files: dict[str, SourceFile] = field(default_factory=dict)

    def add(self, source: SourceFile) -> None:
        if source.module in self.files:
            other = self.files[source.module].path
            raise BuildInputError(
                f"{source.path} and {other} are both module {source.module}; pass --root"
            )
        self.files[source.module] = source


def module_name(relpath: PurePosixPath, packages: set[PurePosixPath] | None) -> str:
    """The dotted module name of `relpath` (posix, relative to the tree's base).

    With `packages` (the folders holding an ``__init__.py``), the name starts at the
    topmost package above the file; without it, every folder is part of the name.
    """
    parts = list(relpath.parts)
    stem = parts[-1].removesuffix(".py")
    parents = parts[:-1]
    if packages is not None:
        keep = 0
        for depth in range(len(parents), 0, -1):
            if PurePosixPath(*parents[:depth]) in packages:
                keep += 1
            else:
                break
        parents = parents[len(parents) - keep :]
    names = [*parents] if stem == "__init__" else [*parents, stem]
    if not names:
        raise BuildInputError(f"{relpath} is a package __init__ outside any package; pass --root")
    return ".".join(names)


def decode(data: bytes, where: str) -> str:
    """Source bytes to text as the import system decodes them: the PEP 263 coding
    declaration or a BOM decides the encoding, and newlines are universal."""
    try:
        return importlib.util.decode_source(data)
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise BuildInputError(f"cannot decode {where}: {exc}") from None


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BuildInputError(f"{path} does not exist; check the path") from None
    except OSError as exc:
        raise BuildInputError(f"cannot read {path}: {exc}") from None
    return decode(data, str(path))


def _python_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        found.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return found


def read_folder(folder: Path, label: str, root: str | None = None) -> SourceTree:
    """Every ``.py`` file under `folder`, named from the package layout (or from `root`)."""
    if not folder.is_dir():
        raise BuildInputError(f"{folder} is not a folder; pass two files or two folders")
    base = folder
    if root is not None:
        base = folder / root
        if not base.is_dir():
            raise BuildInputError(f"--root {root} is not a folder inside {folder}")
    elif (folder / "__init__.py").exists():
        # the folder is itself a package: its name is part of every module name
        base = folder.parent
        while (base / "__init__.py").exists() and base.parent != base:
            base = base.parent
    tree = SourceTree(label)
    files = _python_files(base if root is not None else folder)
    rels = [PurePosixPath(f.relative_to(base).as_posix()) for f in files]
    packages = None
    if root is None:
        packages = {r.parent for r in rels if r.name == "__init__.py"}
        inside = PurePosixPath(folder.relative_to(base).as_posix())
        packages |= {p for p in (inside, *inside.parents) if str(p) != "."}
    for file, rel in zip(files, rels, strict=True):
        tree.add(SourceFile(module_name(rel, packages), str(file), _read(file)))
    return tree


def module_of_file(file: Path, root: str | None) -> str:
    """The module name of a lone file: relative to `root`, or from its package folders."""
    resolved = file.resolve()
    if root is not None:
        base = Path(root).resolve()
        try:
            rel = resolved.relative_to(base)
        except ValueError:
            raise BuildInputError(f"{file} is not inside --root {root}") from None
        return module_name(PurePosixPath(rel.as_posix()), None)
    base = resolved.parent
    while (base / "__init__.py").exists() and base.parent != base:
        base = base.parent
    return module_name(PurePosixPath(resolved.relative_to(base).as_posix()), None)


def read_pair(
    old: str | os.PathLike[str] | Mapping[str, str],
    new: str | os.PathLike[str] | Mapping[str, str],
    *,
    root: str | None = None,
    module: str | None = None,
) -> tuple[SourceTree, SourceTree]:
    """Read OLD and NEW: two files, two folders, or two ``{module: source}`` mappings."""
    if isinstance(old, Mapping) or isinstance(new, Mapping):
        if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
            raise BuildInputError("pass two {module: source} mappings, or two paths")
        return _from_mapping(old, "old"), _from_mapping(new, "new")
    old_path, new_path = Path(old), Path(new)
    for path in (old_path, new_path):
        if not path.exists():
            raise BuildInputError(f"{path} does not exist; check the path")
    if old_path.is_dir() != new_path.is_dir():
        raise BuildInputError("pass two files or two folders, not one of each")
    if old_path.is_dir():
        if module is not None:
            raise BuildInputError("--module names a single file; folders are named by layout")
        return (
            read_folder(old_path, str(old_path), root),
            read_folder(new_path, str(new_path), root),
        )
    name = module or module_of_file(new_path, root)
    old_tree, new_tree = SourceTree(str(old_path)), SourceTree(str(new_path))
    old_tree.add(SourceFile(name, str(old_path), _read(old_path)))
    new_tree.add(SourceFile(name, str(new_path), _read(new_path)))
    return old_tree, new_tree


def _from_mapping(sources: Mapping[str, str], label: str) -> SourceTree:
    tree = SourceTree(label)
    for name in sorted(sources):
        path = name.replace(".", "/") + ".py"
        tree.add(SourceFile(name, path, sources[name]))
    return tree


# -- git ---------------------------------------------------------------------------------


def _git(repo: Path, *args: str, data: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args],
            input=data,
            capture_output=True,
            timeout=120,
            check=False,
        )
    except FileNotFoundError:
        raise BuildInputError("git is not installed; pass two folders instead") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise BuildInputError(f"git {' '.join(args[:2])} failed: {err[-1] if err else '?'}")
    return done.stdout


def split_range(spec: str) -> tuple[str, str]:
    old, sep, new = spec.partition("..")
    if not sep or not old or not new or new.startswith("."):
        raise BuildInputError(f"--git wants OLDREV..NEWREV, not {spec!r}")
    return old, new


def read_git(
    spec: str,
    paths: Iterable[str] = (),
    *,
    repo: str | os.PathLike[str] = ".",
    root: str | None = None,
) -> tuple[SourceTree, SourceTree]:
    """The ``.py`` files that differ between two revisions, named by each one's layout."""
    old_rev, new_rev = split_range(spec)
    top = Path(_git(Path(repo), "rev-parse", "--show-toplevel").decode().strip())
    limit = ["--", *paths] if paths else []
    if paths:
        # paths are relative to where the user stands, like git's own pathspecs
        here = Path(repo).resolve()
        limit = ["--", *(os.path.relpath(here / p, top) for p in paths)]
    changed = _git(top, "diff", "--name-only", "-z", old_rev, new_rev, *limit).split(b"\0")
    wanted = sorted({c.decode() for c in changed if c.endswith(b".py")})
    trees = []
    for rev in (old_rev, new_rev):
        listing = _git(top, "ls-tree", "-r", "--name-only", "-z", rev).split(b"\0")
        names = {PurePosixPath(n.decode()) for n in listing if n}
        trees.append(_read_rev(top, rev, wanted, names, root))
    return trees[0], trees[1]


def _read_rev(
    top: Path, rev: str, wanted: list[str], names: set[PurePosixPath], root: str | None
) -> SourceTree:
    tree = SourceTree(rev)
    present = [w for w in wanted if PurePosixPath(w) in names]
    if not present:
        return tree
    batch = "".join(f"{rev}:{p}\n" for p in present).encode()
    out = _git(top, "cat-file", "--batch", data=batch)
    base = PurePosixPath(root) if root else None
    packages = None if base else {n.parent for n in names if n.name == "__init__.py"}
    pos = 0
    for path in present:
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        body = out[header_end + 1 : header_end + 1 + size]
        pos = header_end + 1 + size + 1
        rel = PurePosixPath(path)
        if base is not None:
            try:
                rel = rel.relative_to(base)
            except ValueError:
                continue  # outside --root: not part of the importable tree
        text = decode(body, f"{rev}:{path}")
        tree.add(SourceFile(module_name(rel, packages), path, text))
    return tree
