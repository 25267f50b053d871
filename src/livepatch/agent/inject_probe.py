"""Looking at a process before attaching to it: what it runs and whether we may touch it.

`livepatch attach` injects a native stub with ptrace, which is only safe in a process
that really runs a CPython we support, and only allowed where the kernel and the
process's owner allow it. Everything here reads `/proc` and files on disk; nothing
stops, signals or writes to the target, so a refusal leaves no trace in it.

The checks, in the order a user would want to hear about them:

- the pid names a live, running process (not a zombie, not stopped, not a thread of
  another process, not us);
- the kernel lets us ptrace it: same user or CAP_SYS_PTRACE, Yama's `ptrace_scope`, no
  other tracer (a debugger) already attached;
- the process has not opted out of remote debugging (`PYTHON_DISABLE_REMOTE_DEBUG` in its
  environment or `-X disable_remote_debug`, the switches CPython 3.14 defines for this);
- it shares our mount namespace, so the stub file we write is the file it loads;
- its executable, or a `libpython` it maps, exports the CPython C API (`inject_elf`);
  `Py_Version` in that file gives the exact version.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from livepatch.agent.inject_elf import NotElf, dynamic_symbols
from livepatch.agent.inject_errors import AttachRefused

#: the CPython symbols that identify the C API and its version
_API_SYMBOL = "PyGILState_Ensure"
_VERSION_SYMBOL = "Py_Version"
_CAP_SYS_PTRACE = 19
_YAMA_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
#: `python3.12`, `libpython3.12.so.1.0`, `python3.13t`, `libpython3.13t.so`
_VERSIONED_NAME = re.compile(r"python(\d)\.(\d+)(t?)(?:$|[^0-9])")

DISABLE_ENV = "PYTHON_DISABLE_REMOTE_DEBUG"


@dataclass(frozen=True)
class Target:
    """A live CPython process, as far as `/proc` and its binaries tell."""

    pid: int
    name: str
    exe: str
    #: the file that holds the C API: the executable itself or a libpython it maps
    python_binary: str
    #: (major, minor, micro)
    version: tuple[int, int, int]
    free_threaded: bool
    uid: int
    gid: int
    environ: dict[str, str] = field(repr=False)

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version)) + ("t" if self.free_threaded else "")


@dataclass(frozen=True)
class _Status:
    name: str
    state: str
    tgid: int
    tracer: int
    uids: tuple[int, ...]
    gids: tuple[int, ...]


def probe(pid: int) -> Target:
    """Everything `attach` must know about `pid`; raises AttachRefused if it must not go on."""
    if pid <= 0:
        raise AttachRefused(f"{pid} is not a process id; pass the pid of a running program")
    if pid == os.getpid():
        raise AttachRefused(
            "that is this process; call livepatch.agent.start() instead of attaching to it"
        )
    proc = Path(f"/proc/{pid}")
    status = _read_status(proc, pid)
    label = f"process {pid} ({status.name})"
    if status.state.startswith(("Z", "X")):
        raise AttachRefused(
            f"{label} has exited or its main thread has; attach needs a live main thread"
        )
    if status.tracer:  # before "stopped": a tracer stops its tracee now and then
        raise AttachRefused(
            f"{label} is already being traced by process {status.tracer} (a debugger?); "
            "detach it first"
        )
    if status.state.startswith(("T", "t")):
        # ptrace would wait for a stopped thread to run, and so would the attach
        raise AttachRefused(
            f"{label} is stopped (SIGSTOP, Ctrl-Z or a debugger); resume it with "
            f"'kill -CONT {pid}' and retry"
        )
    if status.tgid != pid:
        raise AttachRefused(f"{pid} is a thread of process {status.tgid}; attach to {status.tgid}")
    _check_ptrace_allowed(pid, label, status)
    environ = _read_environ(proc, label)
    if environ.get(DISABLE_ENV):
        raise AttachRefused(
            f"{label} set {DISABLE_ENV} in its environment, which forbids remote "
            "debugging; start it with `livepatch run` or call livepatch.agent.start() in it"
        )
    if "disable_remote_debug" in _read_xoptions(proc):
        raise AttachRefused(
            f"{label} runs with -X disable_remote_debug, which forbids remote debugging; "
            "start it with `livepatch run` or call livepatch.agent.start() in it"
        )
    _check_same_mount_namespace(proc, label)
    exe = _readlink(proc / "exe", label)
    python_binary, version, free_threaded = _find_python(proc, label, exe)
    return Target(
        pid=pid,
        name=status.name,
        exe=exe,
        python_binary=python_binary,
        version=version,
        free_threaded=free_threaded,
        uid=status.uids[1],
        gid=status.gids[1],
        environ=environ,
    )


def _read_status(proc: Path, pid: int) -> _Status:
    try:
        text = (proc / "status").read_text()
    except FileNotFoundError:
        raise AttachRefused(f"no process with pid {pid}; it may have exited") from None
    except OSError as exc:
        raise AttachRefused(f"cannot read /proc/{pid}/status ({exc.strerror})") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return _Status(
        name=fields.get("Name", "?"),
        state=fields.get("State", "?"),
        tgid=int(fields.get("Tgid", pid)),
        tracer=int(fields.get("TracerPid", 0)),
        uids=tuple(int(u) for u in fields.get("Uid", "-1 -1 -1 -1").split()),
        gids=tuple(int(g) for g in fields.get("Gid", "-1 -1 -1 -1").split()),
    )


def _check_ptrace_allowed(pid: int, label: str, status: _Status) -> None:
    """Refuse the cases in which the kernel would refuse PTRACE_ATTACH anyway."""
    privileged = _have_cap_sys_ptrace()
    if not privileged:
        me = os.getuid()
        # the kernel wants the tracer's uid to equal the target's real, effective and
        # saved uids (likewise gids); a setuid program or another user's process fails
        if any(u != me for u in status.uids[:3]) or any(g != os.getgid() for g in status.gids[:3]):
            raise AttachRefused(
                f"ptrace is not permitted: {label} belongs to uid {status.uids[1]} and you "
                f"are uid {me}; run livepatch attach as that user or as root"
            )
    scope = _yama_scope()
    if scope == 3:
        raise AttachRefused(
            "ptrace is not permitted: kernel.yama.ptrace_scope is 3 (attaching disabled "
            "until reboot); start the program with `livepatch run` instead"
        )
    if scope == 2 and not privileged:
        raise AttachRefused(
            "ptrace is not permitted: kernel.yama.ptrace_scope is 2 (admin only); "
            "run livepatch attach as root or with CAP_SYS_PTRACE"
        )
    if scope == 1 and not privileged and not _is_descendant(pid, os.getpid()):
        raise AttachRefused(
            "ptrace is not permitted: kernel.yama.ptrace_scope is 1 (only a parent may "
            "attach); run livepatch attach with sudo, or set the sysctl to 0"
        )


def _have_cap_sys_ptrace() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def _yama_scope() -> int:
    try:
        return int(_YAMA_SCOPE.read_text().strip())
    except (OSError, ValueError):
        return 0  # no Yama LSM: classic ptrace rules only


def _is_descendant(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        # the command name may contain spaces and parentheses; ppid follows the last ')'
        pid = int(stat.rpartition(")")[2].split()[1])
        seen += 1
    return False


def _read_environ(proc: Path, label: str) -> dict[str, str]:
    try:
        raw = (proc / "environ").read_bytes()
    except FileNotFoundError:
        raise AttachRefused(f"{label} has exited") from None
    except OSError as exc:
        advice = (
            "the kernel protects it even from root (another user namespace?)"
            if os.geteuid() == 0
            else "run livepatch attach as its user or root"
        )
        raise AttachRefused(
            f"cannot read the environment of {label} ({exc.strerror}); "
            f"ptrace is not permitted for you on it: {advice}"
        ) from None
    environ: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            environ[key.decode("utf-8", "surrogateescape")] = value.decode(
                "utf-8", "surrogateescape"
            )
    return environ


def _read_xoptions(proc: Path) -> set[str]:
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return set()
    options: set[str] = set()
    i = 1
    while i < len(argv) - 1:
        arg = argv[i]
        # interpreter options stop at the script, `-c` or `-m`
        if arg in (b"-c", b"-m", b"-") or not arg.startswith(b"-"):
            break
        if arg == b"-X":
            i += 1
            options.add(argv[i].decode(errors="replace").partition("=")[0])
        elif arg.startswith(b"-X"):
            options.add(arg[2:].decode(errors="replace").partition("=")[0])
        elif arg in (b"-W", b"--check-hash-based-pycs"):
            i += 1  # these take a separate argument
        i += 1
    return options


def _check_same_mount_namespace(proc: Path, label: str) -> None:
    try:
        theirs = os.readlink(proc / "ns" / "mnt")
        ours = os.readlink("/proc/self/ns/mnt")
        root = os.stat(proc / "root")
    except FileNotFoundError:
        raise AttachRefused(f"{label} has exited") from None
    except OSError as exc:
        raise AttachRefused(f"cannot inspect {label} ({exc.strerror})") from None
    here = os.stat("/")
    if theirs != ours or (root.st_dev, root.st_ino) != (here.st_dev, here.st_ino):
        raise AttachRefused(
            f"{label} runs in another mount namespace (a container?); "
            "run livepatch attach inside it"
        )


def _readlink(path: Path, label: str) -> str:
    try:
        return os.readlink(path)
    except FileNotFoundError:
        raise AttachRefused(f"{label} has exited") from None
    except OSError as exc:
        raise AttachRefused(f"cannot inspect {label} ({exc.strerror})") from None


def _find_python(proc: Path, label: str, exe: str) -> tuple[str, tuple[int, int, int], bool]:
    """The binary exporting the C API, its version and whether it is free-threaded."""
    # /proc/PID/exe opens the very file the process runs, even if it was replaced since
    candidates: list[tuple[str, Path]] = [(exe, proc / "exe")]
    try:
        maps = (proc / "maps").read_text()
    except OSError as exc:
        raise AttachRefused(f"cannot read the memory map of {label} ({exc.strerror})") from None
    seen = {exe}
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and "libpython" in parts[5] and parts[5] not in seen:
            seen.add(parts[5])
            path = Path(parts[5])
            if parts[5].endswith(" (deleted)"):
                # replaced on disk by an upgrade: the mapping itself is still readable
                path = proc / "map_files" / parts[0]
            candidates.append((parts[5], path))
    wanted = frozenset({_API_SYMBOL, _VERSION_SYMBOL})
    for shown, path in candidates:
        try:
            symbols = dynamic_symbols(path, wanted)
        except (OSError, NotElf):
            continue
        if _API_SYMBOL not in symbols.symbols:
            continue
        named = _VERSIONED_NAME.search(os.path.basename(shown))
        free_threaded = bool(named and named.group(3))
        raw = symbols.read(_VERSION_SYMBOL, 4)
        if raw is None:
            # Py_Version exists since 3.11; without it the version is at best in the name
            older = f"Python {named.group(1)}.{named.group(2)}" if named else "a Python"
            raise AttachRefused(
                f"{label} runs {older} older than 3.11; livepatch supports 3.11 to 3.13"
            )
        (hexversion,) = struct.unpack("<I", raw)
        version = (hexversion >> 24, hexversion >> 16 & 0xFF, hexversion >> 8 & 0xFF)
        return shown, version, free_threaded
    raise AttachRefused(
        f"{label} is not a Python process: neither {exe} nor a libpython it loaded exports "
        "the CPython C API; attach works on CPython only"
    )
