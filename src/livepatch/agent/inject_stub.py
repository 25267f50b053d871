"""The native stub that `livepatch attach` loads into a process, and how it is loaded.

Getting code to run in a process that did not ask for it takes ptrace: `pyinjector`
stops the target's main thread, makes it call `dlopen()` on a shared library of ours and
lets it go on — about a millisecond. The library's constructor runs right there, on the
main thread, wherever that thread was stopped: maybe in the middle of a bytecode with the
GIL held, maybe inside `read()`. Running Python at that point would re-enter the
interpreter in an unknown state, so the constructor does not touch Python at all. It
only starts a new native thread (with every signal blocked, so signals keep going to the
threads that expect them) and returns; the thread takes the GIL the ordinary way
(`PyGILState_Ensure`), which is the moment any other thread could run Python too — a
safe point by construction — runs the bootstrap (`inject_bootstrap`) in a fresh
namespace, and exits. Nothing in `__main__` changes.

The constructor also records `pthread_self()`: CPython's thread ident of the main
thread, which the bootstrap needs if it is the first to import `threading` (see there).

The library is compiled from the C source below with the system C compiler on first use
and cached per user (a private 0700 directory, because whatever sits there is loaded
into other processes). Each attach loads its own copy, with the bootstrap written into a
fixed-size slot in `.data`: `dlopen()` of a path already loaded would return the old
handle without running the constructor again, and a slot avoids passing anything
through files the target would have to find.
"""

from __future__ import annotations

import hashlib
import os
import platform
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from livepatch.agent.inject_errors import AttachFailed, AttachRefused

SLOT_MARKER = b"@@LIVEPATCH-ATTACH-BOOTSTRAP-SLOT@@"
SLOT_SIZE = 16384

STUB_SOURCE = r"""
/* livepatch attach stub: start one thread that runs a Python bootstrap. */
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>

__attribute__((used)) volatile char livepatch_bootstrap[SLOT_SIZE] = SLOT_MARKER;
static unsigned long main_thread_ident;

typedef int (*int_of_void)(void);
typedef void (*void_of_int)(int);
typedef void (*void_of_void)(void);
typedef void *(*object_of_void)(void);
typedef void *(*object_of_ulong)(unsigned long);
typedef int (*dict_set_item)(void *, const char *, void *);
typedef void *(*run_string)(const char *, int, void *, void *, void *);
typedef void (*dec_ref)(void *);

#define PY_FILE_INPUT 257
#define LOOKUP(type, name) type name = (type)dlsym(RTLD_DEFAULT, #name)

static void *run_bootstrap(void *unused) {
    (void)unused;
    LOOKUP(int_of_void, Py_IsInitialized);
    LOOKUP(int_of_void, PyGILState_Ensure);
    LOOKUP(void_of_int, PyGILState_Release);
    LOOKUP(object_of_void, PyDict_New);
    LOOKUP(object_of_void, PyEval_GetBuiltins);
    LOOKUP(object_of_ulong, PyLong_FromUnsignedLong);
    LOOKUP(dict_set_item, PyDict_SetItemString);
    LOOKUP(run_string, PyRun_StringFlags);
    LOOKUP(dec_ref, Py_DecRef);
    LOOKUP(void_of_void, PyErr_Clear);
    if (!Py_IsInitialized || !PyGILState_Ensure || !PyGILState_Release || !PyDict_New
        || !PyEval_GetBuiltins || !PyLong_FromUnsignedLong || !PyDict_SetItemString
        || !PyRun_StringFlags || !Py_DecRef || !PyErr_Clear || !Py_IsInitialized())
        return 0;
    int gil = PyGILState_Ensure();
    void *globals = PyDict_New();
    void *ident = PyLong_FromUnsignedLong(main_thread_ident);
    if (globals && ident
        && PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) == 0
        && PyDict_SetItemString(globals, "_main_thread_ident", ident) == 0) {
        void *result = PyRun_StringFlags((const char *)livepatch_bootstrap, PY_FILE_INPUT,
                                         globals, globals, 0);
        if (result) Py_DecRef(result);
    }
    if (ident) Py_DecRef(ident);
    if (globals) Py_DecRef(globals);
    /* the bootstrap reports its own errors; never leave one pending in this thread */
    PyErr_Clear();
    PyGILState_Release(gil);
    return 0;
}

__attribute__((constructor)) static void livepatch_attach_stub(void) {
    pthread_t thread;
    pthread_attr_t attr;
    sigset_t all, previous;
    main_thread_ident = (unsigned long)pthread_self();
    if (pthread_attr_init(&attr) != 0) return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pthread_create(&thread, &attr, run_bootstrap, 0);
    pthread_sigmask(SIG_SETMASK, &previous, 0);
    pthread_attr_destroy(&attr);
}
"""


def cache_dir() -> Path:
    """Where the compiled stub is kept: `$XDG_CACHE_HOME/livepatch` or `~/.cache/livepatch`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "livepatch"


def stub_library() -> Path:
    """The compiled stub, built on first use (needs `cc`, or the compiler named by `$CC`)."""
    compiler = shlex.split(os.environ.get("CC") or "cc")
    key = hashlib.sha256(
        b"\0".join(
            [STUB_SOURCE.encode(), SLOT_MARKER, str(SLOT_SIZE).encode(), *map(str.encode, compiler)]
        )
    ).hexdigest()[:16]
    directory = _private_cache(cache_dir())
    library = directory / f"attach-stub-{platform.machine()}-{key}.so"
    if library.is_file():
        return library
    if shutil.which(compiler[0]) is None:
        raise AttachRefused(
            f"attach builds a small native stub once and needs a C compiler, but "
            f"{compiler[0]!r} was not found; install gcc (or set CC) and retry"
        )
    with tempfile.TemporaryDirectory(dir=directory) as work:
        source = Path(work) / "stub.c"
        source.write_text(STUB_SOURCE)
        built = Path(work) / "stub.so"
        command = [
            *compiler,
            "-shared",
            "-fPIC",
            "-O2",
            "-pthread",
            f"-DSLOT_SIZE={SLOT_SIZE}",
            f'-DSLOT_MARKER="{SLOT_MARKER.decode()}"',
            "-o",
            str(built),
            str(source),
            "-ldl",
        ]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AttachRefused(
                f"building the attach stub failed ({exc}); check {compiler[0]}"
            ) from None
        if run.returncode != 0 or not built.is_file():
            detail = " ".join(run.stderr.split())[:300]
            raise AttachRefused(f"building the attach stub with {compiler[0]} failed: {detail}")
        # rename is atomic: a concurrent attach sees either no stub or a complete one
        os.replace(built, library)
    return library


def prepare(stub: Path, bootstrap: str, directory: Path) -> Path:
    """A fresh copy of `stub` in `directory` whose slot holds `bootstrap`."""
    code = bootstrap.encode("utf-8")
    if b"\0" in code or len(code) >= SLOT_SIZE:
        raise ValueError(f"bootstrap must be under {SLOT_SIZE} bytes without NULs")
    image = bytearray(stub.read_bytes())
    at = image.find(SLOT_MARKER)
    if at < 0 or image.find(SLOT_MARKER, at + 1) >= 0:
        raise AttachRefused(f"{stub} is not a livepatch attach stub; delete it and retry")
    image[at : at + SLOT_SIZE] = code.ljust(SLOT_SIZE, b"\0")
    copy = directory / f"stub-{secrets.token_hex(8)}.so"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o500)
    with os.fdopen(fd, "wb") as f:
        f.write(image)
    return copy


def inject(pid: int, library: Path) -> None:
    """Make process `pid` load `library` (its constructor runs before this returns)."""
    try:
        import pyinjector
    except ImportError:
        raise AttachRefused(
            "livepatch attach needs the pyinjector package: pip install 'livepatch[attach]'"
        ) from None
    try:
        pyinjector.inject(pid, str(library))
    except pyinjector.InjectorError as exc:
        if isinstance(exc, pyinjector.api.LinuxInjectorPermissionError) or exc.ret_val == -8:
            raise AttachRefused(
                f"ptrace is not permitted on process {pid} ({exc.error_str or 'EPERM'}); "
                "run livepatch attach as its user or root, or check kernel.yama.ptrace_scope"
            ) from None
        raise AttachFailed(
            f"injecting into process {pid} failed in {exc.func_name} "
            f"({exc.error_str or exc.ret_val}); the stub was not loaded"
        ) from None
    except pyinjector.PyInjectorError as exc:
        raise AttachFailed(f"injecting into process {pid} failed: {exc}") from None


def _private_cache(directory: Path) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise AttachRefused(
            f"{directory} must be a directory owned by you and writable by you only, since "
            "the stub kept there is loaded into other processes; fix it or set XDG_CACHE_HOME"
        )
    return directory
