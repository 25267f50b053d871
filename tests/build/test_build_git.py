"""End to end: ``livepatch build --git`` from two commits, applied to a process by pid.

A repository gets two commits: a shop whose cart accepts negative quantities, then the
fix plus its regression tests. A process is started (with ``livepatch run``) on the first
commit and fills a cart. Then, as a user would, from the command line: ``livepatch build
--git C1..C2 shop -o fix.py``, ``livepatch apply fix.py --pid N``; the second commit's tests
are run *inside* the live process, and pass, and the cart filled before the patch is still
there. ``livepatch revert`` puts the old behaviour back.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

LIVEPATCH = Path(sys.executable).with_name("livepatch")

CART_V1 = '''\
"""A shopping cart."""

TAX = 0.2


class Cart:
    def __init__(self):
        self.items = {}

    def add(self, item, qty=1):
        self.items[item] = self.items.get(item, 0) + qty
        return self.items[item]

    def total(self, prices):
        net = sum(prices[i] * q for i, q in self.items.items())
        return round(net * (1 + TAX), 2)
'''

CART_V2 = '''\
"""A shopping cart."""

__version__ = "1.1"
TAX = 0.2


class Cart:
    def __init__(self):
        self.items = {}

    def add(self, item, qty=1):
        if qty <= 0:
            raise ValueError(f"quantity must be positive, not {qty}")
        self.items[item] = self.items.get(item, 0) + qty
        return self.items[item]

    def total(self, prices):
        net = sum(prices[i] * q for i, q in self.items.items())
        return round(net * (1 + TAX), 2)
'''

TESTS_V2 = '''\
from pytest_free_raises import raises

from shop.cart import Cart


def test_negative_quantity_is_refused():
    cart = Cart()
    with raises(ValueError):
        cart.add("apple", -3)


def test_zero_quantity_is_refused():
    with raises(ValueError):
        Cart().add("apple", 0)


def test_positive_quantity_still_adds():
    cart = Cart()
    assert cart.add("pear", 2) == 2
    assert cart.add("pear", 1) == 3
'''

RAISES = '''\
import contextlib


@contextlib.contextmanager
def raises(kind):
    try:
        yield
    except kind:
        return
    raise AssertionError(f"did not raise {kind.__name__}")
'''

SERVE = '''\
"""The target: a long-lived process holding a cart, driven over stdin."""
import json
import sys
import traceback

from shop.cart import Cart

cart = Cart()
cart.add("apple", 2)


def run_tests(path):
    namespace = {"__name__": "live_tests"}
    exec(compile(open(path).read(), path, "exec"), namespace)
    results = {}
    for name, fn in sorted(namespace.items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
                results[name] = "passed"
            except Exception:
                results[name] = "failed: " + traceback.format_exc().splitlines()[-1]
    return results


print("ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "tests":
        print(json.dumps(run_tests(arg)), flush=True)
    elif cmd == "cart":
        print(json.dumps(cart.items), flush=True)
    elif cmd == "exit":
        break
'''


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env=env, timeout=30, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str, str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "repo"
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "cart.py").write_text(CART_V1)
    (root / "serve.py").write_text(SERVE)
    (root / "pytest_free_raises.py").write_text(RAISES)
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "shop")
    first = _git(root, "rev-parse", "HEAD")
    (root / "shop" / "cart.py").write_text(CART_V2)
    (root / "tests").mkdir()
    (root / "tests" / "test_cart.py").write_text(TESTS_V2)
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "refuse non-positive quantities")
    second = _git(root, "rev-parse", "HEAD")
    _git(root, "checkout", "-q", first)  # the deployed version
    return root, first, second


class Env:
    def __init__(self) -> None:
        self.short = Path(tempfile.mkdtemp(prefix="lpb-", dir="/tmp"))
        self.vars = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
        self.vars.update(LIVEPATCH_SOCKET_DIR=str(self.short / "run"),
                         LIVEPATCH_STATE_DIR=str(self.short / "state"))

    def cli(self, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(LIVEPATCH), *args], cwd=str(cwd), env=self.vars,
                              capture_output=True, text=True, timeout=60)


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    shutil.rmtree(e.short, ignore_errors=True)


def _readline(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=timeout):
            raise AssertionError(f"target said nothing for {timeout}s")
    return proc.stdout.readline().strip()


def _ask(proc: subprocess.Popen[str], command: str) -> object:
    assert proc.stdin is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return json.loads(_readline(proc))


def test_build_git_then_apply_by_pid(repo: tuple[Path, str, str], env: Env,
                                     tmp_path: Path) -> None:
    root, first, second = repo
    if not LIVEPATCH.exists():
        pytest.skip("the livepatch console script is not installed in this environment")
    proc = subprocess.Popen(
        [str(LIVEPATCH), "run", "--", sys.executable, "serve.py"],
        cwd=str(root), env=env.vars, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert _readline(proc) == "ready"
        socket = env.short / "run" / f"agent-{proc.pid}.sock"
        deadline = time.monotonic() + 15
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert socket.exists(), "the target's agent did not start"

        tests = tmp_path / "test_cart.py"
        tests.write_text(_git(root, "show", f"{second}:tests/test_cart.py") + "\n")
        before = _ask(proc, f"tests {tests}")
        assert isinstance(before, dict)
        assert before["test_positive_quantity_still_adds"] == "passed"
        assert before["test_negative_quantity_is_refused"] == (
            "failed: AssertionError: did not raise ValueError"
        )

        patch = tmp_path / "fix.py"
        built = env.cli(root, "build", "--git", f"{first}..{second}", "shop", "-o", str(patch))
        assert built.returncode == 0, built.stderr
        text = patch.read_text()
        assert '@patch.function(\n    "shop.cart:Cart.add",' in text
        assert "shop.cart:__version__: new in the new version" in text

        applied = env.cli(root, "apply", str(patch), "--pid", str(proc.pid), "--json")
        assert applied.returncode == 0, applied.stdout + applied.stderr

        after = _ask(proc, f"tests {tests}")
        assert after == {name: "passed" for name in before}, after
        assert _ask(proc, "cart") == {"apple": 2}  # state kept across the patch

        name = text.split("livepatch.Patch(\n    '", 1)[1].split("'", 1)[0]
        reverted = env.cli(root, "revert", name, "--pid", str(proc.pid), "--json")
        assert reverted.returncode == 0, reverted.stdout + reverted.stderr
        assert _ask(proc, f"tests {tests}") == before
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_build_git_refuses_with_file_and_line(repo: tuple[Path, str, str], env: Env) -> None:
    root, first, _ = repo
    _git(root, "checkout", "-q", "-b", "unsafe", first)
    cart = (root / "shop" / "cart.py").read_text()
    (root / "shop" / "cart.py").write_text(cart.replace(
        "    def add(self, item, qty=1):\n",
        "    def add(self, item, qty=1):\n        yield qty\n",
    ))
    _git(root, "commit", "-q", "-am", "turn add into a generator")
    done = env.cli(root, "build", "--git", f"{first}..unsafe", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["code"] == "build-refused"
    (refusal,) = report["refusals"]
    assert refusal["reason"] == "kind"
    assert refusal["path"] == "shop/cart.py" and refusal["line"] == 10
    assert "livepatch upgrade" in refusal["message"]
    text = env.cli(root, "build", "--git", f"{first}..unsafe")
    assert text.returncode == 1 and "shop/cart.py:10: shop.cart:Cart.add:" in text.stderr
    assert textwrap.dedent(text.stdout) == ""
