"""Top-level statements of a source text, parsed one at a time.

Planning needs two facts about the source of every module it patches: the names its
top-level ``import`` statements bind (the compiler treats an imported name differently,
so compiled code depends on it) and its ``__future__`` flags. ``ast.parse`` of the whole
text is one C call, and it holds the GIL for all of it: 21 ms for ``argparse`` (2,600
lines), 10 to 60 ms for stdlib modules of 1,500 to 6,500 lines on the development VM.
That paused every other thread of the target on the first apply to a module
(``benchmarks/bench_transition.py`` section 6 measures it), against a target of 1 ms.

So the text is cut into its top-level statements, and only those that may bind a name
by import are parsed, each alone, with the GIL handed over between them (``pace``):

* A top-level statement starts at column 0, but not every line at column 0 starts one: a
  line inside a multi-line string or a bracket may sit there. So such a line is only a
  *candidate*, and a piece of text runs from one candidate to the next. Lines that
  continue a compound statement (``else``, ``elif``, ``except``, ``finally``) and lines
  that close a bracket are never candidates.
* A piece holding the word ``import`` (unless it is a def or a class, whose imports do
  not count) is parsed; if it does not parse, the next piece is joined to it until it
  does. From a true start, the first text that parses ends at a true end: a statement
  can only go on past a line at column 0 inside a string, inside a bracket or after a
  backslash, and text cut there never parses.
* Every other piece is skipped unparsed, which is most of a module and all of its long
  statements (argparse's ``ArgumentParser`` is 900 lines), once a scan of its strings
  and comments (:func:`_code_end`) shows that no string and no backslash carries it
  past its end; where the scan is unsure, the piece is parsed like an import. A *bracket*
  left open in a skipped piece could carry it on too: the next pieces then start inside
  that bracket, where no statement can be, and the one holding the closing bracket has
  an unmatched one and never parses, whatever is joined to it.
* Whenever a parsed piece cannot be made to parse before the end of the text, the whole
  text is parsed in one piece, as before: slower, never wrong, and nothing if it does not
  parse. (A text whose syntax error sits in a skipped piece, a def say, still gives the
  imports of the rest: a module's source that no longer parses was edited on disk after
  it was imported, and neither answer is its truth.)

Reading the source is paced too (:func:`source_lines`): ``linecache`` reads a file with
one ``readlines`` call, 1.1 to 2 ms for modules of 3,000 to 6,500 lines.

``tests/core/test_toplevel.py`` compares the result with a parse of the whole text for
every module of the standard library (its tests and test data aside), and for texts cut
inside strings, brackets and continuations.
"""

from __future__ import annotations
import __future__

import ast
import bisect
import io
import linecache
import os
import re
import tokenize
from collections.abc import Iterator
from types import ModuleType

from livepatch import pace

#: a line that may start a top-level statement: at column 0, not blank, not a comment,
#: not a clause that continues the statement before it, not a closing bracket
_CANDIDATE = re.compile(r"^(?![\s#)\]}]|(?:else|elif|except|finally)\b)", re.MULTILINE)
#: a piece holding this may bind a name by import: it is parsed
_IMPORT = re.compile(r"\bimport\b")
#: a def or class (or what decorates one): its imports do not count
_DEF_OR_CLASS = re.compile(r"(?:@|def\b|class\b|async\s+def\b)")
#: what :func:`_code_end` looks at: a comment, or the opening quote of a string
_QUOTE_OR_COMMENT = re.compile(r"#|'''|\"\"\"|'|\"")
#: a string's rest, up to its closing quote (a single-quoted one ends at a line's end
#: unless a backslash continues it); written as "unrolled loops" so that the regex
#: engine runs through a long docstring without stepping back
_REST = {
    '"""': re.compile(r'[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""', re.DOTALL),
    "'''": re.compile(r"[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''", re.DOTALL),
    '"': re.compile(r'[^"\\\n]*(?:\\.[^"\\\n]*)*"', re.DOTALL),
    "'": re.compile(r"[^'\\\n]*(?:\\.[^'\\\n]*)*'", re.DOTALL),
}
#: a string prefix right before a quote (not the end of a name: ``if"x"``)
_PREFIX = re.compile(r"(?<!\w)[rRbBuUfFtT]{1,2}$")
#: a carriage return that is a line break of its own (old Mac files)
_LONE_CR = re.compile(r"\r(?!\n)")
#: what the top level holds besides import-bearing statements
_SKIPPED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def statements(text: str) -> list[ast.stmt] | None:
    """The top-level statements of `text` that may bind names by import, parsed piece by
    piece with the GIL handed over between pieces (others may be left out, defs and
    classes always are); None if the text does not parse."""
    parsed = _by_pieces(text)
    if parsed is None:
        try:
            whole = ast.parse(text).body
        except (SyntaxError, ValueError):
            return None
        parsed = [n for n in whole if not isinstance(n, _SKIPPED)]
    return parsed


def _by_pieces(text: str) -> list[ast.stmt] | None:
    """The wanted statements, or None where a piece would not parse (see the module doc)."""
    found: list[ast.stmt] = []
    for tree in _pieces(text, "<unknown>", every=False):
        if tree is None:
            return None
        found += (n for n in tree.body if not isinstance(n, _SKIPPED))
    return found


def parse_in_pieces(text: str, filename: str) -> list[ast.Module]:
    """Every top-level statement of `text`, parsed piece by piece with the GIL handed over
    between pieces: a module per piece, its line numbers those of the whole text.

    For a patch file, which the target compiles and runs when the agent loads it: a
    100-function patch took 2.5 ms to compile and as long again to parse for its defs,
    each one C call. Raises what ``ast.parse(text)`` raises where the text does not
    parse; where only the pieces fail to, the whole text is parsed at once.
    """
    if _LONE_CR.search(text):
        # a line break Python reads and the pieces' line count would not: parse it whole
        return [ast.parse(text, filename)]
    trees: list[ast.Module] = []
    for tree in _pieces(text, filename, every=True):
        if tree is None:
            return [ast.parse(text, filename)]
        trees.append(tree)
    return trees


def _pieces(text: str, filename: str, every: bool) -> Iterator[ast.Module | None]:
    """Parsed pieces of `text` (see the module doc): all of them if `every`, else those
    that may bind a name by import; None last where one cannot be made to parse."""
    # one Yielder per loop: a Yielder learns how many calls to let pass between two looks
    # at the clock from the loop's items, and these three loops have items of 1 µs (a
    # candidate, a string) to milliseconds (a piece whose strings are scanned)
    finding, scanning, handing_over = pace.Yielder(), pace.Yielder(), pace.Yielder()
    starts = []
    for m in _CANDIDATE.finditer(text):
        finding()
        starts.append(m.start())
    if starts and starts[-1] == len(text):
        starts.pop()  # the empty line after the last line break
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    starts.append(len(text))
    i, line, counted = 0, 1, 0  # the line number of starts[i], counted up to `counted`
    while i < len(starts) - 1:
        handing_over()
        begin = starts[i]
        line += text.count("\n", counted, begin)
        counted = begin
        # candidates inside a string that runs over them start nothing: skip them
        last = _code_end(text, starts, i, scanning)
        if last is not None:
            i = last
        end = starts[i + 1]
        if last is not None and not every and (
            _DEF_OR_CLASS.match(text, begin) or not _IMPORT.search(text, begin, end)
        ):
            i += 1
            continue
        while True:
            try:
                # the line breaks before it give its statements their lines in the text
                yield ast.parse("\n" * (line - 1) + text[begin:end], filename)
                break
            except (SyntaxError, ValueError):
                i += 1
                if i >= len(starts) - 1:
                    yield None
                    return
                end = starts[i + 1]
                handing_over()
        i += 1


def _code_end(
    text: str, starts: list[int], i: int, handing_over: pace.Yielder
) -> int | None:
    """The index `j` >= `i` such that the code from candidate `i` (outside any string) to
    candidate `j + 1` surely ends outside every string and not after a backslash that
    joins a line to the next: the next candidate, or the first one after a string that
    runs over it. None when unsure.

    Strings are followed from quote to quote. An f-string is trusted only where its
    replacement fields close before the quote found: since 3.12 a field may hold the
    f-string's own quote or a line break (PEP 701), and then that quote is not its end.
    """
    pos, j = starts[i], i
    while True:
        handing_over()  # a class of thousands of lines has thousands of strings
        end = starts[j + 1]
        m = _QUOTE_OR_COMMENT.search(text, pos, end)
        if m is None:
            break
        quote = m.group()
        if quote == "#":
            line_end = text.find("\n", m.end(), end)
            if line_end < 0:
                break
            pos = line_end
            continue
        rest = _REST[quote].match(text, m.end())
        if rest is None:
            return None  # open to the end of the text, or cut by a line break: unsure
        prefix = _PREFIX.search(text, max(0, m.start() - 3), m.start())
        if (prefix and "f" in prefix.group().lower()
                and not _fields_close(text[m.end():rest.end() - len(quote)])):
            return None
        pos = rest.end()
        if pos > end:  # the string ran over candidates: go on to the next one after it
            j = bisect.bisect_left(starts, pos, j + 1) - 1
    if text.endswith(("\\\n", "\\\r\n"), 0, starts[j + 1]):
        return None
    return j


def _fields_close(body: str) -> bool:
    """Whether every replacement field of an f-string's `body` closes within it."""
    depth = 0
    for char in body.replace("{{", "").replace("}}", ""):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def imported_names(text: str) -> tuple[str, ...] | None:
    """Names bound by ``import`` statements at the top level of `text` (inside ``if``,
    ``try``, ``with``, loops and ``match`` too; not inside defs or classes); None if it
    does not parse."""
    body = statements(text)
    if body is None:
        return None
    names: set[str] = set()
    _collect(body, names)
    return tuple(sorted(names))


def _collect(body: list[ast.stmt], names: set[str]) -> None:
    for node in body:
        if isinstance(node, _SKIPPED):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*":
                    names.add(alias.asname or alias.name.split(".")[0])
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                _collect([child], names)
            elif isinstance(child, (ast.ExceptHandler, ast.match_case)):
                _collect(child.body, names)


def future_flags(text: str) -> int | None:
    """The compiler flags of the ``from __future__`` imports of `text`; None if it does
    not parse."""
    body = statements(text)
    if body is None:
        return None
    flags = 0
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            flags |= future_import_flags(node)
    return flags


def future_import_flags(node: ast.ImportFrom) -> int:
    """The compiler flags of the features a ``from __future__ import`` names (an unknown
    feature adds none: compiling it says it is unknown)."""
    flags = 0
    for alias in node.names:
        flags |= getattr(getattr(__future__, alias.name, None), "compiler_flag", 0)
    return flags


#: how much of a source file one read decodes (a few tenths of a millisecond)
_CHUNK = 1 << 15


def source_lines(module: ModuleType) -> list[str]:
    """`module`'s source lines, as ``linecache.getlines`` gives them; the first time, read
    into the line cache a piece at a time, handing the GIL over between pieces.

    Only a plain ``.py`` file is read here, as ``linecache.updatecache`` reads it
    (decoded as Python decodes source, universal newlines, a last line ending in a line
    break, the file's size and modification time kept for ``checkcache``); anything
    else (a loader's source, a zip) is left to ``linecache``.
    """
    filename = getattr(module, "__file__", None)
    if not filename:
        return []
    if filename not in linecache.cache and filename.endswith(".py"):
        _read_into_cache(filename)
    return linecache.getlines(filename, module.__dict__)


def _read_into_cache(filename: str) -> None:
    lines: list[str] = []
    try:
        stat = os.stat(filename)
        if not stat.st_size:
            return  # nothing to pace; and what an empty file gives changed in 3.13
        with open(filename, "rb") as raw:
            encoding, _ = tokenize.detect_encoding(raw.readline)
            raw.seek(0)
            handing_over = pace.Yielder()
            rest = ""  # the start of a line the last piece cut
            with io.TextIOWrapper(raw, encoding) as text:  # universal newlines, as Python
                while piece := text.read(_CHUNK):
                    handing_over()
                    # not str.splitlines: it also breaks at form feeds and other
                    # characters that readlines() keeps inside a line
                    *whole, rest = (rest + piece).split("\n")
                    lines += [line + "\n" for line in whole]
    except (OSError, UnicodeDecodeError, SyntaxError, LookupError):
        return  # linecache tries (and fails) the same way, and says nothing either
    if rest:
        lines.append(rest + "\n")  # as linecache ends the last line
    if filename not in linecache.cache:  # another thread may have read it meanwhile
        linecache.cache[filename] = (stat.st_size, stat.st_mtime, lines, filename)
