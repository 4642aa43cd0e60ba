"""Run untrusted Python (model-written HumanEval solutions) in a separate, resource-limited process.

What `run_code` does:

* a fresh `python -I` (isolated mode: no PYTHON* variables, no user site-packages, no script dir on sys.path)
  runs the code from a file in a new temporary directory, which is its cwd and is deleted afterwards;
* the environment is only `PATH=/usr/bin:/bin` (no parent variables, so no tokens or keys), stdin is /dev/null;
* limits set in the child before it starts (`setrlimit`): address space `memory_mb` (RLIMIT_AS, not on
  macOS), CPU time ceil(timeout)+1 s, files written at most 10 MB each, no core dumps, and at most 32 more
  processes/threads than the user already runs (RLIMIT_NPROC counts all of the user's tasks; the kernel does
  not enforce it for root in the initial user namespace, and tasks in other PID namespaces are not counted);
* a wall-clock `timeout`: the child runs in its own session and its whole process group is SIGKILLed on timeout,
  and also after a normal exit, so background children it left behind do not outlive the call;
* stdout and stderr are read as they come, keeping at most `max_output_bytes` of each (the rest is drained and
  dropped, `output_truncated` says so), so an endless `print` loop cannot fill the caller's memory;
* unless `guard=False`, a prelude sets functions that start or kill processes, leave the process group,
  delete, move or re-permission files, or change directory/root/uid to None (`os.system`, `os.fork`,
  `os.kill`, `os.setsid`, `os.remove`, `shutil.rmtree`, `subprocess.Popen`, ... see `_GUARDED`), to stop
  *accidental* damage by buggy generated code.

What it does NOT isolate -- this is not a security boundary like a container, a VM or seccomp:

* network access is untouched;
* every file the user can read is readable, and files outside the temp dir can be written (by absolute path);
* the guard is trivially bypassed (`ctypes`, `_posixsubprocess`, `os.execv`, re-importing), so a deliberate
  attacker can start processes that leave the process group, signal other processes of the same user, etc.;
* other processes' CPU time, GPU access and shared system resources are not limited; as root, the child may
  raise its own limits again.

Run only code you would be willing to run as your own user; use a container for real adversaries.
"""

from __future__ import annotations

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

# The attributes the guard sets to None (those missing on a platform are skipped).
_GUARDED = {
    "os": [
        "system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "setpgid",
        "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
        "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir",
        "setuid", "seteuid", "setreuid", "setresuid",
    ],
    "shutil": ["rmtree", "move", "chown"],
    "subprocess": ["Popen"],
}

# Runs in the child: read the program, apply the guard, run the program as __main__ with fresh globals.
_RUNNER = f"""
import builtins, importlib, sys
_path, _guard = sys.argv[1], sys.argv[2] == "1"
with open(_path, encoding="utf-8") as _f:
    _source = _f.read()
if _guard:
    for _module, _names in {_GUARDED!r}.items():
        _m = importlib.import_module(_module)
        for _name in _names:
            if hasattr(_m, _name):
                setattr(_m, _name, None)
sys.argv = [_path]
exec(compile(_source, _path, "exec"), {{"__name__": "__main__", "__builtins__": builtins}})
"""


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
