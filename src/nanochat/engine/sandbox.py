"""Run untrusted Python (model-written HumanEval solutions) in a separate, limited, locked-down process.

Two layers. What each one guarantees, and what neither does, is stated in docs/reliability.md ("What the
calculator and the sandbox guarantee") and checked attack by attack in tests/test_tool_security.py.

Limits the kernel enforces, whatever the program does:

* a fresh `python -I` runs the code from a file in a new temporary directory, its cwd, deleted afterwards;
  the environment is only `PATH=/usr/bin:/bin` (no tokens or keys of the caller), stdin is /dev/null;
* `setrlimit` before it starts: address space `memory_mb` (RLIMIT_AS, not on macOS), CPU time ceil(timeout)+1 s,
  files written at most 10 MB each, no core dumps, at most 32 more processes/threads than the user already runs
  (RLIMIT_NPROC counts all of the user's tasks; the kernel does not enforce it for root);
* a wall-clock `timeout`: the child runs in its own session and its whole process group is SIGKILLed on timeout
  and also after a normal exit, so background children it left behind do not outlive the call;
* stdout and stderr are read as they come, keeping at most `max_output_bytes` of each (the rest is drained and
  dropped, `output_truncated` says so), so an endless `print` loop cannot fill the caller's memory.

A policy inside the child's interpreter, unless `guard=False` (trusted code), applied before the program runs:

* an audit hook (PEP 578; see `_audit_hook`) refuses starting processes, signalling processes, sockets, ctypes and
  C extensions outside a list of harmless standard ones, file writes/deletes/renames/chmod outside the temp dir,
  reads outside it and the interpreter's own install, links, chdir, raising limits, `gc` object walks, and every
  way to a hand-made code object (`code.__new__`, marshal, .pyc files, tracing), which could rewrite memory;
* functions CPython does not audit (`os.pidfd_open`, `os.setpriority`, `os.mknod`, `time.clock_settime`, ...), or
  that could turn a failed run into status 0 (`os._exit`, `signal.signal`), are set to None (see `_GUARDED`);
  every compiled-in module is imported first and `_imp.create_builtin` removed, so no fresh copy of `posix`
  can bring them back;
* only running to the end of the program passes: `sys.exit(0)` (or `exit()`, `raise SystemExit`) before it, and
  any uncaught exception, end with status 1 whatever `sys.excepthook` or `atexit` handlers the program installed.

The policy is not a security boundary like a container, a VM or seccomp: a memory-safety bug in CPython or in a
C extension would let code past it, and then only the kernel limits above remain. Use a container without
network for real adversaries.
"""

from __future__ import annotations

import inspect
import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from nanochat.errors import UserError

SAFE_PATH = "/usr/bin:/bin"
PROGRAM_FILE = "program.py"
MAX_FILE_BYTES = 10 * 1024**2
EXTRA_PROCESSES = 32
READ_CHUNK = 64 * 1024
ERROR_TAIL_BYTES = 4096  # enough of stderr's end to find the exception line even when stderr was truncated

# Set to None before the program runs (those missing on a platform are skipped). `posix` holds the originals
# `os` copied. From "_exit" on, and in the modules after `posix`, CPython audits none of them, so this is their
# only guard: they reach other processes or the machine (a root process may reprioritize anything, set the
# clock), create files the hook never hears of, or exit with status 0 whatever happened.
_OS_GUARDED = [
    "system",
    "fork",
    "forkpty",
    "posix_spawn",
    "posix_spawnp",
    "kill",
    "killpg",
    "setsid",
    "setpgid",
    "remove",
    "unlink",
    "rmdir",
    "removedirs",
    "rename",
    "renames",
    "replace",
    "truncate",
    "chmod",
    "fchmod",
    "lchmod",
    "chown",
    "fchown",
    "lchown",
    "chroot",
    "chdir",
    "fchdir",
    "setuid",
    "seteuid",
    "setreuid",
    "setresuid",
    "_exit",
    "pidfd_open",
    "setpriority",
    "nice",
    "sched_setscheduler",
    "sched_setparam",
    "sched_setaffinity",
    "mknod",
    "mkfifo",
    "setns",
    "unshare",
]
_GUARDED = {
    "os": _OS_GUARDED,
    "posix": _OS_GUARDED,
    # A Python signal handler runs between any two bytecodes: one raising SystemExit(0) during `_run`'s
    # epilogue would turn a failed run into status 0. Without handlers, a signal ends the process (a failure).
    "signal": ["pidfd_send_signal", "signal"],
    "_signal": ["pidfd_send_signal", "signal"],
    "shutil": ["rmtree", "move", "chown", "getpwnam", "getgrnam"],
    "pwd": ["getpwuid", "getpwnam", "getpwall"],  # the account database, read by libc: no audit event
    "grp": ["getgrgid", "getgrnam", "getgrall"],
    "time": ["clock_settime", "clock_settime_ns"],
}
# Imported before the hook is installed, when they still load from .pyc: what HumanEval programs use most.
_PREIMPORT = ("typing", "collections", "re", "math", "heapq", "bisect", "string")

# Audit events refused outright (`_REFUSED_PREFIXES`: every event of those modules).
_REFUSED_EVENTS = frozenset(
    {
        "os.system",
        "os.exec",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.spawn",
        "subprocess.Popen",
        "os.kill",
        "os.killpg",
        "os.chdir",
        "os.link",
        "os.symlink",  # relative paths must keep meaning the temp dir; no links out of it
        "resource.setrlimit",
        "resource.prlimit",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        # A hand-made code object (or a frame jump from a trace function) can read and write any memory, this hook
        # included; a subinterpreter would run without it.
        "code.__new__",
        "function.__new__",
        "marshal.load",
        "marshal.loads",
        "sys.settrace",
        "sys.setprofile",
        "cpython.PyInterpreterState_New",
    }
)
_REFUSED_PREFIXES = ("ctypes.", "socket.", "sqlite3.", "syslog.")
# Events that create, remove or change files: how many leading arguments are paths, all inside the temp dir.
_WRITE_EVENTS = {
    "os.mkdir": 1,
    "os.remove": 1,
    "os.rmdir": 1,
    "os.rename": 2,
    "os.chmod": 1,
    "os.chown": 1,
    "os.truncate": 1,
    "os.utime": 1,
    "os.setxattr": 1,
    "os.removexattr": 1,
    "shutil.rmtree": 1,
}
# The C extension modules (lib-dynload) a program may load: computation only. The others open files, sockets,
# terminals or shared memory behind the hook's back (_sqlite3, _ssl, readline, _posixshmem, ...), start
# processes (_posixsubprocess), or run arbitrary C (_ctypes, _testcapi, _xxsubinterpreters).
_EXTENSIONS = frozenset(
    {
        "_bisect",
        "_blake2",
        "_bz2",
        "_codecs_cn",
        "_codecs_hk",
        "_codecs_iso2022",
        "_codecs_jp",
        "_codecs_kr",
        "_codecs_tw",
        "_contextvars",
        "_csv",
        "_datetime",
        "_decimal",
        "_elementtree",
        "_hashlib",
        "_heapq",
        "_json",
        "_lsprof",
        "_lzma",
        "_md5",
        "_multibytecodec",
        "_opcode",
        "_pickle",
        "_queue",
        "_random",
        "_sha1",
        "_sha256",
        "_sha3",
        "_sha512",
        "_statistics",
        "_struct",
        "_typing",
        "_uuid",
        "_zoneinfo",
        "array",
        "binascii",
        "cmath",
        "math",
        "mmap",
        "pyexpat",
        "resource",
        "select",
        "unicodedata",
        "zlib",
    }
)


# --- What runs in the child. These functions are sent there as source (see `_child_source`): they may use only
# --- the standard library and the constants above.


def _child_main(program: str, guard: bool) -> None:
    """The sandboxed interpreter's entry point: read and compile the program, lock down, run it."""
    import sys

    sys.dont_write_bytecode = True  # never try to write __pycache__ next to the standard library
    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), program, "exec")
    if guard:
        _lock_down()
    sys.argv = [program]
    _run(code, sys.excepthook)


def _lock_down() -> None:
    import importlib
    import os
    import sys

    # Every compiled-in module is imported now, then the function that makes fresh ones is removed: a fresh
    # `posix` would bring back all the functions set to None below.
    for name in (*sys.builtin_module_names, *_PREIMPORT):
        importlib.import_module(name)
    for module, names in _GUARDED.items():
        m = importlib.import_module(module)
        for name in names:
            if hasattr(m, name):
                setattr(m, name, None)
    del sys.modules["_imp"].create_builtin
    install = {os.path.normpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    sys.addaudithook(_audit_hook(os.getcwd(), (*install, "/dev/null", "/dev/urandom")))


def _audit_hook(workdir: str, read_roots: tuple) -> Callable:
    """The policy: a function CPython calls for every audited operation, before doing it; raising refuses it.

    It is one function that uses only its default arguments and str/bytes methods: the program may rebind any
    module attribute or builtin, and a traceback through the hook shows it the hook's locals, but nothing there
    is mutable (a helper function would be: its `__code__` can be replaced).
    """
    import os

    def prefixes(roots):  # "/a/b" matches "/a/b" and what is under it once "/" is appended to both
        return tuple(r.rstrip("/") + "/" for r in roots)

    writable, readable, installed = prefixes([workdir]), prefixes([workdir, *read_roots]), prefixes(read_roots)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def hook(
        event,
        args,
        cwd=workdir,
        writable=writable,
        readable=readable,
        installed=installed,
        write_flags=write_flags,
        refused=_REFUSED_EVENTS,
        refused_prefixes=_REFUSED_PREFIXES,
        writes=_WRITE_EVENTS,
        extensions=_EXTENSIONS,
        type=type,
        str=str,
        bytes=bytes,
        PermissionError=PermissionError,
        ImportError=ImportError,
    ):
        if event in refused or str.startswith(event, refused_prefixes):
            raise PermissionError(f"the sandbox refuses {event}")
        reading = False
        if event == "open":
            paths, mode, flags = args[:1], args[1], args[2]
            if type(args[0]) is int:  # a descriptor it already has
                return
            # os.open (mode None) only in the temp dir: its descriptors can be passed as dir_fd, which no audit
            # event shows, so the program must hold no descriptor of a directory elsewhere.
            reading = mode is not None and not flags & write_flags
            roots = readable if reading else writable
        elif event in ("os.listdir", "os.scandir"):
            if args[0] is None or type(args[0]) is int:
                return
            paths, roots = args[:1], readable
        elif event in writes:
            paths, roots = args[: writes[event]], writable  # a descriptor among them is refused below
        elif event == "import":  # a filename only when a C extension is about to be loaded
            if args[1] is None:
                return
            # An exact str: a subclass could compare equal to an allowed name while naming another module.
            if type(args[0]) is not str or str.rpartition(args[0], ".")[2] not in extensions:
                raise ImportError(f"the sandbox refuses to import {args[0]}")
            paths, roots = args[1:2], installed
        else:
            return
        for path in paths:
            # Only exact str and bytes: a PathLike or a str subclass could convert to another path when the
            # operation itself converts it. ".." is refused rather than resolved: after a symlink it leaves the
            # directory it seems to stay in.
            if type(path) is bytes:
                path = bytes.decode(path, "utf-8", "surrogateescape")
            parts = (
                str.split(path if str.startswith(path, "/") else cwd + "/" + path, "/") if type(path) is str else [".."]
            )
            path = "/" + "/".join([p for p in parts if p not in ("", ".")])
            # .pyc files would go to marshal: imports after this point compile from source instead
            if ".." in parts or not str.startswith(path + "/", roots) or reading and str.endswith(path, ".pyc"):
                raise PermissionError(f"the sandbox refuses {event} of {path}")

    return hook


def _run(code, excepthook, SystemExit=SystemExit, BaseException=BaseException, type=type, int=int, str=str) -> None:
    """Run the program as __main__; only reaching its end exits with status 0.

    Otherwise a program could pass without running the tests that follow it: `sys.exit(0)` first, or a
    `sys.excepthook` that exits 0 after a failed assert. Names are bound as defaults: the program may rebind
    builtins (`builtins.SystemExit = KeyError`).
    """
    import builtins

    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})  # noqa: S102 -- running it is the point
    except SystemExit as e:
        status = e.code if type(e) is SystemExit else None  # a subclass could compute `code` and exit 0 itself
        if type(status) is int and status != 0 or type(status) is str:
            raise SystemExit(status) from None
        raise SystemExit("SystemExit: the program exited with status 0 before its end") from None
    except BaseException as e:
        try:
            excepthook(type(e), e, e.__traceback__)  # the interpreter's own, not one the program installed
        except BaseException:
            pass
        raise SystemExit(1) from None


def _child_source() -> str:
    constants = [
        "_OS_GUARDED",
        "_GUARDED",
        "_PREIMPORT",
        "_REFUSED_EVENTS",
        "_REFUSED_PREFIXES",
        "_WRITE_EVENTS",
        "_EXTENSIONS",
    ]
    return "\n\n".join(
        [
            "from collections.abc import Callable",
            *(f"{name} = {globals()[name]!r}" for name in constants),
            *(inspect.getsource(f) for f in (_child_main, _lock_down, _audit_hook, _run)),
            "import sys\n_child_main(sys.argv[1], sys.argv[2] == '1')",
        ]
    )


_RUNNER = _child_source()


@dataclass
class SandboxResult:
    """What happened. `returncode` is None when the run was killed for its timeout."""

    success: bool  # exited with status 0 within the timeout
    stdout: str
    stderr: str
    error: str | None  # on failure: the last stderr line (e.g. "ZeroDivisionError: division by zero")
    timeout: bool
    memory_exceeded: bool
    returncode: int | None
    output_truncated: bool = False  # stdout or stderr went past max_output_bytes


class _Capture:
    """The first `limit` bytes of a stream plus its last few, whatever its total length."""

    def __init__(self, limit: int):
        self.limit = limit
        self.head = bytearray()
        self.tail = b""
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
        self.tail = (self.tail + chunk)[-ERROR_TAIL_BYTES:]

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        return self.head.decode("utf-8", errors="replace")


def run_code(
    code: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 256,
    max_output_bytes: int = 1_000_000,
    guard: bool = True,
) -> SandboxResult:
    """Run `code` as a Python program in a fresh, limited subprocess (see the module docstring for what that
    does and does not isolate). `guard=False` leaves process and file functions in place, for trusted code."""
    if timeout <= 0 or memory_mb <= 0 or max_output_bytes < 0:
        raise UserError(
            "run_code needs timeout > 0, memory_mb > 0 and max_output_bytes >= 0, "
            f"got {timeout}, {memory_mb} and {max_output_bytes}"
        )
    stdout, stderr = _Capture(max_output_bytes), _Capture(max_output_bytes)
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-", ignore_cleanup_errors=True) as workdir:
        with open(os.path.join(workdir, PROGRAM_FILE), "w", encoding="utf-8") as f:
            f.write(code)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _RUNNER, PROGRAM_FILE, "1" if guard else "0"],
            cwd=workdir,
            env={"PATH": SAFE_PATH},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_limiter(timeout, memory_mb),
        )
        deadline = time.monotonic() + timeout
        try:
            finished = _drain(proc, deadline, stdout, stderr) and _exited(proc.pid, deadline)
        finally:
            _kill_group(proc.pid)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    return _result(proc.returncode, finished, stdout, stderr, timeout)


def _limiter(timeout: float, memory_mb: int) -> Callable[[], None]:
    # Everything is computed here in the parent: between fork and exec the child should do as little as
    # possible (preexec_fn is not safe to run arbitrary Python in when the parent has threads).
    cpu = math.ceil(timeout) + 1
    wanted = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if sys.platform != "darwin":  # macOS does not enforce RLIMIT_AS reliably and may refuse to set it
        wanted.append((resource.RLIMIT_AS, memory_mb * 1024**2, memory_mb * 1024**2))
    tasks = _user_task_count()
    if tasks is not None:
        wanted.append((resource.RLIMIT_NPROC, tasks + EXTRA_PROCESSES, tasks + EXTRA_PROCESSES))
    limits = [_within_hard_limit(*w) for w in wanted]

    def apply() -> None:
        for which, soft_hard in limits:
            resource.setrlimit(which, soft_hard)

    return apply


def _within_hard_limit(which: int, soft: int, hard: int) -> tuple[int, tuple[int, int]]:
    # An unprivileged process cannot raise its hard limit, so never ask for more than the current one.
    current_hard = resource.getrlimit(which)[1]
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    return which, (soft, hard)


def _user_task_count() -> int | None:
    """Threads of all processes whose real uid is ours: what RLIMIT_NPROC compares against (None without /proc)."""
    if not os.path.isdir("/proc/self/task"):
        return None
    uid, total = str(os.getuid()), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the process ended while we looked
            continue
        if fields.get("Uid", "").split()[:1] == [uid]:
            total += int(fields.get("Threads", "1"))
    return total


def _drain(proc: subprocess.Popen, deadline: float, stdout: _Capture, stderr: _Capture) -> bool:
    """Read both pipes until they close; False if the deadline came first."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, stdout)
        selector.register(proc.stderr, selectors.EVENT_READ, stderr)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, READ_CHUNK)
                if chunk:
                    key.data.add(chunk)
                else:
                    selector.unregister(key.fileobj)
    return True


def _exited(pid: int, deadline: float) -> bool:
    """Wait for the child to exit *without reaping it*, until the deadline.

    An unreaped child keeps its pid, and so its process group id, from being reused: killing the group
    afterwards can never hit an unrelated process.
    """
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already empty
        pass


def _result(returncode: int, finished: bool, stdout: _Capture, stderr: _Capture, timeout: float) -> SandboxResult:
    err_text = stderr.text()
    err_tail = stderr.tail.decode("utf-8", errors="replace")
    success = finished and returncode == 0
    return SandboxResult(
        success=success,
        stdout=stdout.text(),
        stderr=err_text,
        error=None if success else _describe_failure(err_tail, finished, returncode, timeout),
        timeout=not finished,
        memory_exceeded=_out_of_memory(err_text + err_tail, finished, returncode),
        returncode=returncode if finished else None,
        output_truncated=stdout.truncated or stderr.truncated,
    )


def _describe_failure(err_tail: str, finished: bool, returncode: int, timeout: float) -> str:
    lines = [line for line in err_tail.splitlines() if line.strip()]
    if lines:
        return lines[-1]
    if not finished:
        return f"timed out after {timeout:g} s"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _out_of_memory(err: str, finished: bool, returncode: int) -> bool:
    # RLIMIT_AS makes allocations fail, which Python reports as MemoryError (C code may print ENOMEM's text);
    # a SIGKILL we did not send is most likely the kernel's OOM killer.
    if "MemoryError" in err or "Cannot allocate memory" in err:
        return True
    return finished and returncode == -signal.SIGKILL
