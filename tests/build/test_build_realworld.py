"""Real code: two security fixes from PyPI releases, built and applied live.

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

urllib3 1.26.17 → 1.26.18 (CVE-2023-45803): a 303 redirect turns the request into a GET
but 1.26.17 still sent the original body (and its content headers) to the new location.
The fix touches two modules that import a new helper method from a third. A process
running 1.26.17 posts a secret to a real server on 127.0.0.1 that answers 303; the patch
is applied there and the release's regression check — the redirected request arrives
without the body — passes, through both `PoolManager` and `HTTPConnectionPool`.
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


def _sdist(version: str, project: str = "python-multipart") -> Path:
    """The unpacked sdist of `project` `version`, downloaded once into the cache."""
    root = CACHE / f"{project.replace('-', '_')}-{version}"
    if (root / "PKG-INFO").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"{project.replace('-', '_')}-{version}.tar.gz"
    if not archive.exists():
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--disable-pip-version-check", "-q", f"{project}=={version}",
                 "-d", str(CACHE)],
                capture_output=True, text=True, timeout=240,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download of {project}=={version} timed out (no network?)")
        if done.returncode != 0 or not archive.exists():
            pytest.skip(
                f"cannot download {project}=={version} from PyPI "
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


URLLIB3_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    sys.path.insert(0, sys.argv[1])
    import livepatch
    import urllib3

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(303)
            self.send_header("Location", "/echo")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            length = int(self.headers.get("Content-Length", 0))
            seen = {"method": self.command, "body": self.rfile.read(length).decode(),
                    "content_type": self.headers.get("Content-Type")}
            data = json.dumps(seen).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address
    manager = urllib3.PoolManager()
    pool = urllib3.HTTPConnectionPool(host, port)

    def posts():
        kw = {"body": b"secret=hunter2", "headers": {"Content-Type": "text/plain"}}
        via_manager = manager.request("POST", f"http://{host}:{port}/redirect", **kw)
        via_pool = pool.urlopen("POST", "/redirect", redirect=True, **kw)
        return [json.loads(via_manager.data), json.loads(via_pool.data)]

    result = {"version": urllib3.__version__, "before": posts()}
    if sys.argv[2] != "-":
        patch = livepatch.load(sys.argv[2])
        livepatch.apply(patch, model="immediate")
        result["patched"] = posts()
        livepatch.revert(patch.name, model="immediate")
        result["reverted"] = posts()
    server.shutdown()
    print(json.dumps(result))
    """
)


def test_urllib3_303_body_leak_fix_applies_live(tmp_path: Path) -> None:
    old_root = _sdist("1.26.17", "urllib3") / "src"
    new_root = _sdist("1.26.18", "urllib3") / "src"
    result = build_result(old_root / "urllib3", new_root / "urllib3")
    kinds = {c.what: c.kind.name for c in result.changes}
    assert kinds == {
        "urllib3._collections:HTTPHeaderDict._prepare_for_method_change": "HELPER",
        "urllib3.connectionpool:HTTPHeaderDict": "IMPORT",
        "urllib3.connectionpool:HTTPConnectionPool.urlopen": "REPLACED",
        "urllib3.poolmanager:HTTPHeaderDict": "IMPORT",
        "urllib3.poolmanager:PoolManager.urlopen": "REPLACED",
    }
    patch_file = tmp_path / "fix.py"
    patch_file.write_text(result.text)

    def run(root: Path, patch: str) -> dict[str, object]:
        done = subprocess.run([sys.executable, "-c", URLLIB3_CHILD, str(root), patch],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    fixed = {"method": "GET", "body": "", "content_type": None}
    assert run(new_root, "-")["before"] == [fixed, fixed]
    live = run(old_root, str(patch_file))
    assert live["version"] == "1.26.17"
    leaked = {"method": "GET", "body": "secret=hunter2", "content_type": "text/plain"}
    assert live["before"] == [leaked, leaked]
    assert live["patched"] == [fixed, fixed]
    assert live["reverted"] == live["before"]
