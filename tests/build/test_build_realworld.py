"""Real code: the python-multipart 0.0.7 security fix, built and applied live.

python-multipart 0.0.6 parsed ``Content-Type`` options with a regular expression that
backtracks exponentially on a quoted value full of backslashes (a ReDoS, GHSA-2jv5-9r88-
3w3p); 0.0.7 parses the header with ``email.message.Message`` instead. The release is
messy in the usual ways: ``__version__`` bumped, imports added and reordered, annotations
added, quotes reformatted, and the old regex left behind unused.

The test downloads both sdists (cached under ``tests/.cache/``, never committed), builds
the patch from the two package folders, starts a process that imports 0.0.6, applies the
patch there, and runs 0.0.7's regression test for the fix (``test_redos_attack_header``:
the attack input returns at once and parses as the new release parses it) plus a set of
ordinary headers compared with 0.0.7 itself. Then it reverts and checks 0.0.6's
behaviour is back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from livepatch.build import build_result

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "pypi"
OLD, NEW = "0.0.6", "0.0.7"

HEADERS = [
    "text/plain",
    "application/x-www-form-urlencoded; charset=utf-8",
    'form-data; name="file"; filename="C:\\\\docs\\\\report.txt"',
    'multipart/form-data; boundary="----abc"',
    'application/x-www-form-urlencoded; !="\\',
]


def _sdist(version: str) -> Path:
    """The package folder of python-multipart `version`, downloaded once into the cache."""
    root = CACHE / f"python_multipart-{version}"
    if (root / "multipart" / "multipart.py").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"python_multipart-{version}.tar.gz"
    if not archive.exists():
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--disable-pip-version-check", "-q", f"python-multipart=={version}",
                 "-d", str(CACHE)],
                capture_output=True, text=True, timeout=240,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download of python-multipart=={version} timed out (no network?)")
        if done.returncode != 0 or not archive.exists():
            pytest.skip(
                f"cannot download python-multipart=={version} from PyPI "
                f"(no network?): {done.stderr.strip().splitlines()[-1:]}"
            )
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(CACHE, filter="data")
        else:  # pragma: no cover - very old 3.11 patch releases
            tar.extractall(CACHE)
    return root


CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import livepatch
    from multipart.multipart import parse_options_header

    headers = json.loads(sys.argv[3])
    def parse_all():
        out = []
        for h in headers:
            ctype, options = parse_options_header(h.encode("latin-1"))
            out.append([ctype.decode("latin-1"),
                        sorted((k.decode("latin-1"), v.decode("latin-1"))
                               for k, v in options.items())])
        return out

    result = {"version": __import__("multipart").__version__, "before": parse_all()}
    if sys.argv[2] != "-":
        patch = livepatch.load(sys.argv[2])
        livepatch.apply(patch, model="immediate")

        # 0.0.7's regression test for the fix (test_redos_attack_header)
        t, p = parse_options_header(b'application/x-www-form-urlencoded; !="\\\\')
        assert b'"\\\\' in p[b'!'], p
        # the attack itself: exponential backtracking in 0.0.6, linear now
        start = time.perf_counter()
        parse_options_header(b'a/b; x="' + b"\\\\" * 64)
        result["attack_seconds"] = time.perf_counter() - start

        result["patched"] = parse_all()
        livepatch.revert(patch.name, model="immediate")
        result["reverted"] = parse_all()
    print(json.dumps(result))
    """
)


def _run(package_root: Path, patch_file: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(package_root), patch_file, json.dumps(HEADERS)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_python_multipart_redos_fix_applies_live(tmp_path: Path) -> None:
    old_root, new_root = _sdist(OLD), _sdist(NEW)
    result = build_result(old_root / "multipart", new_root / "multipart")
    text = result.text
    assert build_result(old_root / "multipart", new_root / "multipart").text == text
    replaced = [c.what for c in result.changes if c.kind.name == "REPLACED"]
    assert replaced == ["multipart.multipart:parse_options_header"]
    header = text.split("\nfrom __future__", 1)[0]
    assert "multipart:__version__: metadata changed" in header
    assert "multipart.multipart:Message: added (import the new code needs)" in header
    patch_file = tmp_path / "fix.py"
    patch_file.write_text(text)

    expected = _run(new_root, "-")
    assert expected["version"] == NEW
    live = _run(old_root, str(patch_file))
    assert live["version"] == OLD  # the process still runs 0.0.6 (and keeps saying so)
    assert live["before"] != expected["before"]  # the fix changes observable behaviour
    assert live["patched"] == expected["before"]
    assert live["reverted"] == live["before"]
    assert isinstance(live["attack_seconds"], float) and live["attack_seconds"] < 1.0
