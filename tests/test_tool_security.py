"""Adversarial suite for the two tools the model can call: the calculator and the code sandbox.

Every attack must be refused (the calculator returns None; a sandboxed program fails, or is stopped) or contained
(nothing outside the sandbox's temp dir changes), and the process running the tools -- here pytest, in
production the chat server or the evaluation loop -- must be unaffected: same cwd, signal handlers, limits,
priority, no new or leftover processes, no material memory growth, no signal received.

Sandbox attacks end with `print("ESCAPED")` and assert that they obtained what they went for, so a successful
run *is* an escape. Attacks that would do real harm if they got through are aimed at targets the test owns (a
canary file, a decoy process, a SIGUSR1 handler, local listeners) and are bounded (64 forks, not an endless
loop); the literal `os.kill(os.getppid(), signal.SIGKILL)` is kept, since failing it fails the run loudly.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanochat.engine.calculator import calculate
from nanochat.engine.engine import Engine, Row
from nanochat.engine.sandbox import run_code

# ----------------------------------------------------------------------------------------------------------------
# Calculator
# ----------------------------------------------------------------------------------------------------------------

CALCULATOR_ATTACKS = {
    "introspection": [
        "().__class__.__bases__[0].__subclasses__()",
        "().__class__.__mro__[1].__subclasses__()[0]",
        "''.__class__.__mro__[1].__subclasses__()",
        "(1).__class__.__base__.__subclasses__()",
        "().__class__.__bases__[0].__subclasses__()[104].__init__.__globals__['sys']",
        "[].__class__",
        "'a'.__class__.__name__.count('a')",
        "'a'.__doc__.count('a')",
        "'a'.count.__self__",
        "'a'.count.__call__('a')",
        "'{0.__class__}'.format(1)",
        "type(1)",
        "vars()",
        "globals()",
        "locals()",
        "__builtins__",
        "__builtins__.__dict__",
        "__loader__",
    ],
    "imports": [
        "__import__('os')",
        "__import__('os').system('id')",
        "import os",
        "importlib.import_module('os')",
        "__builtins__.__import__('os')",
        "eval('1')",
        "exec('1')",
        "compile('1', '', 'eval')",
        "open('/etc/passwd')",
        "open('/etc/passwd').read().count('root')",
        "breakpoint()",
        "input()",
        "exit()",
    ],
    "calls": [
        "(lambda: 1)()",
        "(lambda x: x)(1)",
        "[x for x in range(10)]",
        "sum(x for x in range(10**9))",
        "{x: x for x in 'ab'}",
        "{1 for _ in ()}",
        "max(1, 2)",
        "abs(-1)",
        "pow(2, 10**9)",
        "getattr(1, 'real')",
        "getattr('', 'count')('')",
        "(1).real",
        "(1).bit_length()",
        "1 .__add__(1)",
        "(x := 5)",
        "[*range(10)]",
        "f'{1}'",
        "f'{__import__(\"os\")}'",
        "'a'.count(*'a')",
        "'a'.count(**{})",
        "'a'.count('a', 0, 1)",
        "'a'.count(sub='a')",
        "'a'.count('a'.upper())",
        "'a'.count('a')('a')",
    ],
    "strings": [
        "'a'*10**9",
        "'a'*(10**9)",
        "('a'*10)*10**8",
        "'ab'+'c'",
        "'abc'[0]",
        "'abc'[::-1]",
        "'a'.count('a')*'a'",
        "'x'.count('x'*10**9)",
        "'%s' % 'a'",
        "'{}'.format(1)",
        "'a'.join(['b'])",
        "'a'.replace('a', 'bb')",
        "'a'.center(10**9)",
        "'a'.zfill(10**9)",
        "'\\t'.expandtabs(10**9)",
        "'a'.encode()",
        "b'a'*10**9",
        "b'aa'.count(b'a')",
        "'a' in 'abc'",
        "'a' == 'a'",
        "'a'.count('a') + 'b'",
    ],
    "huge_numbers": [
        "9**9**9",
        "10**10**10",
        "2**2**2**2**2",
        "(10**100)**(10**100)",
        "10**100*10**100",
        "10**101",
        "99**99",
        "2**10000000",
        "1<<10**9",
        "1" + "0" * 200,
        "0x" + "f" * 400,
        "1e308*10",
        "1e308+1e308",
        "2.0**1024",
        "10.0**400",
        "10**-400",
        "(1e-200)**-2",
        "10**100//10**-100",
        "*".join(["10**100"] * 3),
    ],
    "nesting": [
        "(" * 500 + "1" + ")" * 500,
        "(" * 10_000 + "1" + ")" * 10_000,
        "-" * 999 + "1",
        "~" * 999 + "1",
        "not " * 200 + "1",
        "+".join(["1"] * 500),
        "[" * 300 + "]" * 300,
        "2**" * 300 + "2",
        "lambda:" * 100 + "1",
        "1 if 1 else " * 50 + "1",
        "x" + ".y" * 400,
        "'a'" + ".count('a')" * 100,
        "9" * 10_000_000,
        "1+" * 1_000_000 + "1",
    ],
    "unicode": [
        "\uff11\uff12*\uff13",  # fullwidth digits
        "\u0663+\u0663",  # Arabic-Indic digits
        "\U0001d7cf+\U0001d7cf",  # mathematical bold digits
        "\uff4f\uff50\uff45\uff4e('/etc/passwd')",  # fullwidth "open", NFKC-normalized to open by the parser
        "__\U0001d4be\U0001d4c2\U0001d4c5\U0001d45c\U0001d4c7\U0001d4c9__('os')",  # script "import"
        "\uff45\uff56\uff41\uff4c('1')",
        "1\u00a0+1",  # no-break space
        "5\u22123",  # minus sign
        "2\u00d73",  # multiplication sign
        "\x00",
        "1\x00+1",
        "\ud800",  # lone surrogate
    ],
    "special_values": [
        "1e999",
        "-1e999",
        "1e999*0",
        "float('nan')",
        "float('inf')",
        "(1e308*10)/(1e308*10)",
        "0.0/0",
        "1/0",
        "1//0",
        "1%0",
        "1.5%0.0",
        "0**-1",
        "0.0**-1",
        "(-1)**0.5",
        "(-8)**(1/3)",
        "1j",
        "1j*1j",
        "True",
        "None",
        "...",
        "False+1",
    ],
}

CALCULATOR_CASES = [(category, e) for category, exprs in CALCULATOR_ATTACKS.items() for e in exprs]


def _calc_id(case):
    category, expression = case
    return f"{category}:{expression[:40]!r}"


@pytest.mark.parametrize("case", CALCULATOR_CASES, ids=[_calc_id(c) for c in CALCULATOR_CASES])
def test_calculator_refuses_quickly_and_cheaply(case):
    _, expression = case
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = calculate(expression)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert result is None
    assert elapsed < 0.25, f"took {elapsed:.3f} s"
    assert peak < 2 * 1024**2, f"allocated {peak / 1024**2:.1f} MiB"


class _CharTokenizer:
    """One token per character, special tokens above the Unicode range: enough for the engine's tool path."""

    SPECIAL = (
        "<|python_start|>",
        "<|python_end|>",
        "<|output_start|>",
        "<|output_end|>",
        "<|assistant_end|>",
        "<|bos|>",
    )

    def token_id(self, name: str) -> int:
        return 0x110000 + self.SPECIAL.index(name)

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_attacks_through_the_engine_force_nothing_and_never_raise():
    tokenizer = _CharTokenizer()
    engine = Engine(model=None, tokenizer=tokenizer)
    start_id, end_id = tokenizer.token_id("<|python_start|>"), tokenizer.token_id("<|python_end|>")

    def call(expression: str) -> list[int]:
        row = Row()
        for token in [start_id, *tokenizer.encode(expression), end_id]:
            engine._advance_row(row, token)
        assert row.expression is None and not row.done
        return list(row.forced)

    for _, expression in CALCULATOR_CASES:
        if len(expression) <= 20_000:
            assert call(expression) == [], expression
    # the same row machinery still works for an honest call
    assert tokenizer.decode(call("2+2")[1:-1]) == "4"


# ----------------------------------------------------------------------------------------------------------------
# Sandbox
# ----------------------------------------------------------------------------------------------------------------

SECRET_VAR = "NANOCHAT_TEST_SECRET"
OUTPUT_LIMIT = 10_000
LOOP_TIMEOUT = 0.5

_FORK_EXEC = (  # _posixsubprocess.fork_exec as CPython 3.11 calls it: 23 arguments
    "import _posixsubprocess, os\n"
    "r, w = os.pipe()\n"
    "_posixsubprocess.fork_exec([b'/bin/touch', b'$outside/pwned'], [b'/bin/touch'], True, (w,), None, None,\n"
    "    -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, -1, None, False)\n"
    "import time; time.sleep(0.3)\n"
    "assert os.path.exists('$outside/pwned')\n"
)
_HUNT = (  # look everywhere a frame walk can reach for a still-working `system`
    "import sys\n"
    "def hunt(namespaces):\n"
    "    for ns in namespaces:\n"
    "        for value in list(ns.values()):\n"
    "            fn = value if getattr(value, '__name__', '') == 'system' else getattr(value, 'system', None)\n"
    "            if callable(fn):\n"
    "                try:\n"
    "                    fn('touch $outside/pwned')\n"
    "                except Exception:\n"
    "                    pass\n"
)

SANDBOX_ATTACKS: dict[str, list[str]] = {
    "imports": [
        "import os; os.system('touch $outside/pwned')",
        "__import__('os').system('touch $outside/pwned')",
        "import importlib; importlib.import_module('os').system('touch $outside/pwned')",
        "import subprocess; subprocess.run(['touch', '$outside/pwned'])",
        "import subprocess; subprocess.check_output('touch $outside/pwned', shell=True)",
        "import importlib, subprocess; importlib.reload(subprocess); subprocess.run(['touch', '$outside/pwned'])",
        "import importlib, os; importlib.reload(os); os.system('touch $outside/pwned')",
        "import posix; posix.system('touch $outside/pwned')",
        "import sys; sys.modules['posix'].system('touch $outside/pwned')",
        "import ctypes; ctypes.CDLL(None).system(b'touch $outside/pwned')",
        "import ctypes.util; ctypes.CDLL(ctypes.util.find_library('c')).system(b'touch $outside/pwned')",
        "import _ctypes; _ctypes.dlopen(None)",
        _FORK_EXEC,
        "import os; os.popen('touch $outside/pwned').read()",
        "import os; os.execv('/bin/touch', ['touch', '$outside/pwned'])",
        "import os; os.execvpe('touch', ['touch', '$outside/pwned'], {})",
        "import os; os.posix_spawn('/bin/touch', ['touch', '$outside/pwned'], {})",
        "import os; os.spawnv(os.P_WAIT, '/bin/touch', ['touch', '$outside/pwned'])",
        "import pty; pty.spawn(['touch', '$outside/pwned'])",
        (
            "import _imp, importlib.machinery\n"
            "_imp.create_builtin(importlib.machinery.ModuleSpec('posix', None)).system(b'touch $outside/pwned')"
        ),
        "import importlib._bootstrap as b; b._builtin_from_name('posix').system(b'touch $outside/pwned')",
        "import sys; del sys.modules['posix']; import posix; posix.system(b'touch $outside/pwned')",
        (
            "import importlib.util\n"
            "origin = importlib.util.find_spec('_posixsubprocess').origin\n"
            "spec = importlib.util.spec_from_file_location('innocent._posixsubprocess', origin)\n"
            "importlib.util.module_from_spec(spec)"
        ),
        (
            "import asyncio\n"
            "async def main():\n"
            "    p = await asyncio.create_subprocess_exec('touch', '$outside/pwned'); await p.wait()\n"
            "asyncio.run(main())"
        ),
        "import _xxsubinterpreters as i; i.run_string(i.create(), \"import os; os.system('touch $outside/pwned')\")",
        "import _testcapi",
        "import _testinternalcapi",
        "import pwd; print(pwd.getpwall())",
    ],
    "file_reads": [
        "print(open('/etc/passwd').read())",
        "print(open('$outside/canary.txt').read())",
        "import os; print(os.read(os.open('$outside/canary.txt', os.O_RDONLY), 100))",
        "import pathlib; print(pathlib.Path('$outside/canary.txt').read_text())",
        "import io; print(io.open_code('$outside/canary.txt').read())",
        "print(open(b'$outside/canary.txt').read())",
        "import linecache; line = linecache.getline('$outside/canary.txt', 1); assert line; print(line)",
        "print(open('../../outside/canary.txt').read())",
        "import os; os.symlink('$outside/canary.txt', 'link'); print(open('link').read())",
        "import os; os.link('$outside/canary.txt', 'hard'); print(open('hard').read())",
        "import shutil; shutil.copy('$outside/canary.txt', 'copy.txt'); print(open('copy.txt').read())",
        "import os; names = os.listdir('$outside'); assert names; print(names)",
        "import glob; names = glob.glob('$outside/*'); assert names; print(names)",
        "import os; print([e.name for e in os.scandir('/')])",
        (
            "class P:\n"
            "    calls = 0\n"
            "    def __fspath__(self):\n"
            "        P.calls += 1\n"
            "        return '$outside/canary.txt' if P.calls == 1 else 'program.py'\n"
            "print(open(P()).read())"
        ),
        "import codecs; print(codecs.open('$outside/canary.txt').read())",
        "import fileinput; print(list(fileinput.input('$outside/canary.txt')))",
        (
            "import tarfile\n"
            "with tarfile.open('x.tar', 'w') as t:\n"
            "    t.add('$outside/canary.txt')\n"
            "print(open('x.tar', 'rb').read())"
        ),
        "import os; print(open(f'/proc/{os.getppid()}/cmdline').read())",
        "print(open('/proc/self/mounts').read())",
        "import sys; print(open(sys.executable + '/../../../../../../etc/passwd').read())",
    ],
    "file_writes": [
        "open('$outside/pwned', 'w').write('x')",
        "open('$cwd/$pwned', 'w').write('x')",
        "open('/tmp/$pwned', 'w').write('x')",
        "open('../$pwned', 'w').write('x')",
        "import os; os.write(os.open('$outside/pwned', os.O_WRONLY | os.O_CREAT), b'x')",
        "import pathlib; pathlib.Path('$outside/pwned').write_text('x')",
        "import shutil; shutil.copy('program.py', '$outside/pwned')",
        "import os; os.makedirs('$outside/pwned')",
        "import os; os.mkdir('$outside/pwned')",
        "open('$outside/canary.txt', 'a').write('x')",
        "open('$outside/canary.txt', 'w').write('x')",
        "import os; os.utime('$outside/canary.txt', (0, 0))",
        "import os; os.chmod('$outside/canary.txt', 0o777)",
        "import os; os.truncate('$outside/canary.txt', 0)",
        "import os; os.symlink('$outside', 'link'); open('link/pwned', 'w').write('x')",
        "import tempfile; tempfile.mkstemp(dir='$outside')",
        "import sqlite3; sqlite3.connect('$outside/pwned').execute('create table t(x)')",
        "import os; d = os.open('$outside', os.O_RDONLY); os.open('pwned', os.O_WRONLY | os.O_CREAT, dir_fd=d)",
        "import os; open('$outside/pwned', 'w', opener=lambda p, f: os.open(p, f)).write('x')",
        "import logging; logging.basicConfig(filename='$outside/pwned'); logging.warning('x')",
        "import posix; posix.open('$outside/pwned', posix.O_WRONLY | posix.O_CREAT)",
        "import io; io.FileIO('$outside/pwned', 'w')",
        "import readline; readline.write_history_file('$outside/pwned')",
        "import os; os.link('program.py', '$outside/pwned')",
        "import shutil; shutil.copytree('.', '$outside/pwned')",
        "import zipfile; zipfile.ZipFile('$outside/pwned', 'w').close()",
        "import os; os.mkfifo('$outside/pwned')",
        "import os; os.mknod('$outside/pwned')",
        "import _posixshmem, os; _posixshmem.shm_open('/$pwned', os.O_CREAT | os.O_RDWR)",
        "import os; open(f'/proc/{os.getpid()}/root$outside/pwned', 'w').write('x')",
    ],
    "deletes": [
        "import os; os.remove('$outside/canary.txt')",
        "import os; os.unlink('$outside/canary.txt')",
        "import shutil; shutil.rmtree('$outside')",
        "import pathlib; pathlib.Path('$outside/canary.txt').unlink()",
        "import posix; posix.unlink('$outside/canary.txt')",
        "import os; os.rename('$outside/canary.txt', 'stolen')",
        "import os; os.replace('program.py', '$outside/canary.txt')",
        "import shutil; shutil.move('$outside/canary.txt', '.')",
        "import posix; posix.rename('$outside/canary.txt', 'stolen')",
        "import os; os.removedirs('$outside')",
        "import posix; posix.truncate('$outside/canary.txt', 0)",
    ],
    "network": [
        "import socket; socket.create_connection(('127.0.0.1', $port), timeout=2)",
        "import socket; s = socket.socket(); s.connect(('127.0.0.1', $port))",
        "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port', timeout=2)",
        "import http.client; c = http.client.HTTPConnection('127.0.0.1', $port, timeout=2); c.request('GET', '/')",
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', $udp_port))",
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect('$unix')",
        "import _socket; s = _socket.socket(); s.connect(('127.0.0.1', $port))",
        "import asyncio; asyncio.run(asyncio.open_connection('127.0.0.1', $port))",
        "import socket; print(socket.gethostbyname('localhost'))",
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()",
        "import smtplib; smtplib.SMTP('127.0.0.1', $port, timeout=2)",
        "import ftplib; ftplib.FTP().connect('127.0.0.1', $port, timeout=2)",
        # Same name: if the policy ever failed, the run would pass (and fail the test) without renaming the machine.
        "import socket; socket.sethostname(socket.gethostname())",
    ],
    "processes": [
        ("import os, time\nfor _ in range(64):\n    if os.fork() == 0:\n        time.sleep(30)\n        os._exit(0)"),
        (
            "import posix, time\n"
            "for _ in range(64):\n"
            "    if posix.fork() == 0:\n"
            "        time.sleep(30)\n"
            "        posix._exit(0)"
        ),
        "import os\nwhile True:\n    os.fork()",
        ("import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(30)\n    posix._exit(0)"),
        "import multiprocessing; p = multiprocessing.Process(target=print); p.start(); p.join()",
        "import concurrent.futures; concurrent.futures.ProcessPoolExecutor(2).submit(print, 1).result()",
        (
            "import importlib, subprocess; importlib.reload(subprocess)\n"
            "subprocess.Popen(['sleep', '30'], start_new_session=True)"
        ),
        "import os; os.forkpty()",
        "import pty; pty.fork()",
        "import os; os.system('sleep 30 &')",
    ],
    "signals": [
        "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal; os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "import os, signal; os.kill(os.getppid(), signal.SIGUSR1)",
        "import posix, signal; posix.kill(posix.getppid(), signal.SIGUSR1)",
        "import sys, signal; sys.modules['posix'].kill(sys.modules['posix'].getppid(), signal.SIGUSR1)",
        "import os, signal; os.kill($decoy, signal.SIGKILL)",
        "import posix, signal; posix.kill($decoy, signal.SIGKILL)",
        "import os, signal; signal.pidfd_send_signal(os.pidfd_open($decoy), signal.SIGKILL)",
        "import os, signal; signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGUSR1)",
        "import _signal, posix; _signal.pidfd_send_signal(posix.pidfd_open($decoy), 9)",
        "import posix; posix.kill(-1, 0)",
        "import posix; posix.killpg(posix.getpgid(posix.getppid()), 0)",
        "import os; os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)",
        "import os; os.sched_setaffinity(os.getppid(), {0})",
        "import os; os.sched_setscheduler(os.getppid(), os.SCHED_IDLE, os.sched_param(0))",
        "import os, resource; resource.prlimit(os.getppid(), resource.RLIMIT_MSGQUEUE, (1024, 1024))",
        "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)",
        "import os; os.nice(-5)",  # root may raise its own priority and starve the server
        "import posix; posix.nice(-5)",
        "import time; time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME))",
        "import time; time.clock_settime_ns(time.CLOCK_REALTIME, time.clock_gettime_ns(time.CLOCK_REALTIME))",
    ],
    "exits": [
        "import sys; sys.exit(0)",
        "import sys; sys.exit()",
        "raise SystemExit",
        "exit()",
        "quit(0)",
        "import os; os._exit(0)",
        "import posix; posix._exit(0)",
        "import atexit, os; atexit.register(os._exit, 0); assert False",
        "import sys, os; sys.excepthook = lambda *a: os._exit(0); assert False",
        "import sys; sys.excepthook = lambda *a: sys.exit(0); assert False",
        (
            "import sys\n"
            "class Zero(int):\n"
            "    def __eq__(self, other):\n"
            "        return False\n"
            "    __hash__ = int.__hash__\n"
            "sys.exit(Zero(0))"
        ),
        ("class Exit(SystemExit):\n    @property\n    def code(self):\n        raise SystemExit(0)\nraise Exit(1)"),
        (
            "import threading, os, time\n"
            "threading.Thread(target=os._exit, args=(0,)).start(); time.sleep(1); assert False"
        ),
        (
            "import _imp, importlib.machinery\n"
            "_imp.create_builtin(importlib.machinery.ModuleSpec('posix', None))._exit(0)"
        ),
        "try:\n    assert False\nfinally:\n    import sys; sys.exit(0)",
        "import builtins; builtins.SystemExit = KeyError; import sys; sys.exit(0)",
        # a handler raising SystemExit(0) between two bytecodes of the runner's own failure handling
        (
            "import signal, sys\nsignal.signal(signal.SIGALRM, lambda *a: sys.exit(0))\n"
            "signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.00002)\nassert False"
        ),
        (
            "import _signal, sys\n_signal.signal(_signal.SIGALRM, lambda *a: sys.exit(0))\n"
            "_signal.setitimer(_signal.ITIMER_REAL, 0.0005, 0.00002)\nwhile True:\n    pass"
        ),
    ],
    "cwd": [
        "import os; os.chdir('$outside'); open('pwned', 'w').write('x')",
        "import os; os.chdir('/'); print(os.listdir('.'))",
        "import os; os.fchdir(os.open('$outside', os.O_RDONLY)); open('pwned', 'w').write('x')",
        "import posix; posix.chdir('$outside'); open('pwned', 'w').write('x')",
        "import os; os.chdir('..'); open('$pwned', 'w').write('x')",
        "import contextlib\nwith contextlib.chdir('$outside'):\n    open('pwned', 'w').write('x')",
    ],
    "environment": [
        "import os; v = os.environ.get('$secret_var'); print(v); assert v",
        "import os; print(os.environb); assert b'$secret_var' in os.environb",
        "import posix; print(posix.environ); assert b'$secret_var' in posix.environ",
        "data = open('/proc/self/environ', 'rb').read(); print(data); assert b'$secret_var' in data",
        "import os; data = open(f'/proc/{os.getppid()}/environ', 'rb').read(); print(data); assert b'PATH=' in data",
        "import subprocess; print(subprocess.check_output('env'))",
        "import os; print(os.popen(f'cat /proc/{os.getppid()}/environ').read())",
    ],
    "introspection": [
        (
            "[c for c in ().__class__.__bases__[0].__subclasses__() if c.__name__ == '_wrap_close'][0]"
            ".__init__.__globals__['system']('touch $outside/pwned')"
        ),
        (
            "w = [c for c in ().__class__.__mro__[1].__subclasses__() if c.__name__ == 'catch_warnings'][0]()\n"
            "w._module.__builtins__['__import__']('posix').system('touch $outside/pwned')"
        ),
        "__builtins__.__dict__['__import__']('posix').system('touch $outside/pwned')",
        "[c for c in object.__subclasses__() if c.__name__ == 'Popen'][0](['touch', '$outside/pwned']).wait()",
        _HUNT + "try:\n"
        "    1 / 0\n"
        "except Exception as e:\n"
        "    f = e.__traceback__.tb_frame\n"
        "while f:\n"
        "    hunt([f.f_globals, f.f_locals])\n"
        "    f = f.f_back\n"
        "hunt([vars(m) for m in list(sys.modules.values())])\n"
        "import os; assert os.path.exists('$outside/pwned')",
        _HUNT
        + "import gc; hunt([{'o': o} for o in gc.get_objects()])\nimport os; assert os.path.exists('$outside/pwned')",
        "import gc; print(len(gc.get_referrers(print)))",
        "import gc; print(len(gc.get_referents(print)))",
        (
            "import sys; f = sys._getframe(); hook = f.f_back.f_globals; print(sorted(hook))\n"
            "sys.modules['posix'].system('touch $outside/pwned')"
        ),
        (
            "import inspect; [fr.frame.f_globals for fr in inspect.stack()]\n"
            "import posix; posix.system('touch $outside/pwned')"
        ),
        (
            "def g():\n    yield\n"
            "gen = g(); next(gen); gen.gi_frame.f_back\n"
            "import posix; posix.system('touch $outside/pwned')"
        ),
        "c = (lambda: 0).__code__; c.replace(co_consts=(1,))",
        "import marshal; marshal.loads(marshal.dumps((lambda: 0).__code__))",
        "import types; types.FunctionType((lambda: 0).__code__, {})",
        "import sys; sys.settrace(lambda *a: None)",
        "import importlib; importlib.reload(__import__('posix')); import posix; posix.system('touch $outside/pwned')",
        "import sys; sys.addaudithook(lambda *a: None); import posix; posix.system('touch $outside/pwned')",
        # the policy itself: the hook's locals through a traceback, the runner's globals, rebound builtins
        (
            "try:\n    open('/etc/passwd')\nexcept PermissionError as e:\n    tb = e.__traceback__\n"
            "while tb.tb_next:\n    tb = tb.tb_next\n"
            "for value in list(tb.tb_frame.f_locals.values()):\n"
            "    for attr in ('__code__', '__defaults__'):\n"
            "        try:\n            setattr(value, attr, getattr(lambda *a, **k: None, attr))\n"
            "        except Exception:\n            pass\n"
            "print(open('$outside/canary.txt').read())"
        ),
        (
            "try:\n    open('/etc/passwd')\nexcept PermissionError as e:\n    tb = e.__traceback__\n"
            "while tb.tb_next:\n    tb = tb.tb_next\n"
            "g = tb.tb_frame.f_globals\n"
            "g['_REFUSED_EVENTS'] = frozenset(); g['_REFUSED_PREFIXES'] = (); "
            "g['_EXTENSIONS'] = frozenset({'_ctypes'})\n"
            "import ctypes; ctypes.CDLL(None).system(b'touch $outside/pwned')"
        ),
        (
            "import builtins\nclass S(str):\n    def startswith(self, *a):\n        return True\n"
            "builtins.type = lambda x: str; builtins.str = S; builtins.PermissionError = KeyError\n"
            "print(open('$outside/canary.txt').read())"
        ),
        (
            "import sys; m = sys.modules['__main__']; print(sorted(vars(m)))\n"
            "m._audit_hook('/', ('/',)); import posix; posix.system('touch $outside/pwned')"
        ),
        (
            "import sys; m = sys.modules['__main__']\n"
            "m._run.__defaults__ = (KeyError,) + m._run.__defaults__[1:]; sys.exit(0)"
        ),
        (
            "import importlib.util, _imp\n"
            "class Name(str):  # equal to an allowed extension's name, while naming _posixsubprocess\n"
            "    def __hash__(self):\n        return hash('math')\n"
            "    def __eq__(self, other):\n        return True\n"
            "spec = importlib.util.spec_from_file_location('x', importlib.util.find_spec('_posixsubprocess').origin)\n"
            "spec.name = Name('_posixsubprocess')\n"
            "_imp.create_dynamic(spec).fork_exec"
        ),
    ],
    "limits": [
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1)); x = bytearray(1024**3)",
        (
            "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (-1, -1))\n"
            "open('big', 'wb').write(b'x' * 20 * 1024**2)"
        ),
        "import resource; resource.prlimit(0, resource.RLIMIT_AS, (-1, -1)); x = bytearray(1024**3)",
        "import resource; resource.setrlimit(resource.RLIMIT_NPROC, (-1, -1))",
        "import resource; resource.setrlimit(resource.RLIMIT_CPU, (-1, -1))",
        "open('big', 'wb').write(b'x' * 20 * 1024**2)",
    ],
    "memory": [
        "x = bytearray(10**10)",
        "x = []\nwhile True:\n    x.append(bytearray(10**6))",
        "x = 'a' * 10**10",
        "import mmap; m = mmap.mmap(-1, 10**10)",
        "x = [0] * 10**10",
        "s = 'x'\nwhile True:\n    s += s",
        "x = bytes(10**10)",
        "x = {i: i for i in range(10**9)}",
        "import sys; sys.setrecursionlimit(10**6)\ndef f(n):\n    return f(n + 1)\nf(0)",
    ],
    "loops": [
        "while True:\n    pass",
        "import time; time.sleep(10**6)",
        (
            "import signal\n"
            "for s in (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
            "    signal.signal(s, signal.SIG_IGN)\n"
            "while True:\n    pass"
        ),
        "import threading; threading.Event().wait()",
        "import select; select.select([], [], [])",
        "for _ in iter(int, 1):\n    pass",
        "import itertools; sum(itertools.count())",
        "x = 10**10**8",
        "import re; re.match('(a+)+$$', 'a' * 40 + 'b')",  # $$: a Template escape
        (
            "import threading\n"
            "def spin():\n    while True:\n        pass\n"
            "for _ in range(8):\n    threading.Thread(target=spin).start()"
        ),
    ],
    "output": [
        "print('x' * 10**7)",
        "while True:\n    print('y' * 10_000)",
        "import sys; sys.stderr.write('e' * 10**7)",
        "import os; os.write(1, b'\\xff' * 10**6)",
        "import os\nwhile True:\n    os.write(2, b'z' * 65536)",
        "print('\\n' * 10**7)",
        "import sys\nfor _ in range(10**6):\n    sys.stdout.write('a')",
    ],
    "threads": [
        (
            "import threading, time\n"
            "for _ in range(10_000):\n"
            "    threading.Thread(target=time.sleep, args=(100,), daemon=True).start()"
        ),
        (
            "import threading, os\n"
            "t = threading.Thread(target=os.system, args=('touch $outside/pwned',)); t.start(); t.join()\n"
            "assert os.path.exists('$outside/pwned')"
        ),
        "import threading, time; threading.Thread(target=time.sleep, args=(100,)).start()",
        ("import _thread, time\nfor _ in range(10):\n    _thread.start_new_thread(time.sleep, (100,))\nassert False"),
    ],
}

SANDBOX_CASES = [(category, code) for category, attacks in SANDBOX_ATTACKS.items() for code in attacks]
_SECRET_VALUE = "hunter2-" + uuid.uuid4().hex


@dataclass
class Arena:
    outside: Path  # a directory outside the sandbox the test owns, with a canary file
    sandboxes: Path  # where run_code creates its temp dirs during the test
    pwned: str  # a unique file name attacks try to create in shared places
    decoy: subprocess.Popen  # a process attacks try to kill
    tcp: socket.socket
    udp: socket.socket
    unix: socket.socket
    unix_path: Path

    def substitute(self, code: str) -> str:
        return string.Template(code).substitute(
            outside=self.outside,
            cwd=os.getcwd(),
            pwned=self.pwned,
            port=self.tcp.getsockname()[1],
            udp_port=self.udp.getsockname()[1],
            unix=self.unix_path,
            decoy=self.decoy.pid,
            secret_var=SECRET_VAR,
        )

    def shared_paths(self) -> list[Path]:
        """Where an escaping attack would leave `pwned`: none of them may exist afterwards."""
        return [
            Path(os.getcwd()) / self.pwned,
            Path("/tmp") / self.pwned,
            self.sandboxes / self.pwned,
            self.outside.parent / self.pwned,
            Path("/dev/shm") / self.pwned,
        ]


_usr1_received: list[int] = []


@pytest.fixture(scope="module")
def listeners():
    """A TCP, a UDP and a Unix socket listening locally: no attack may reach them."""
    with tempfile.TemporaryDirectory() as d:
        tcp = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        unix_path = Path(d) / "sock"
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(unix_path))
        unix.listen()
        for s in (tcp, udp, unix):
            s.setblocking(False)
        yield tcp, udp, unix, unix_path
        for s in (tcp, udp, unix):
            s.close()


@pytest.fixture(scope="module")
def usr1_counter():
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: _usr1_received.append(signum))
    yield _usr1_received
    signal.signal(signal.SIGUSR1, previous)


@pytest.fixture
def arena(tmp_path, monkeypatch, listeners, usr1_counter):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text(f"canary-{uuid.uuid4().hex}\n")
    sandboxes = tmp_path / "sandboxes"
    sandboxes.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandboxes))  # run_code's temp dirs land here: attributable
    monkeypatch.setenv(SECRET_VAR, _SECRET_VALUE)
    decoy = subprocess.Popen(["sleep", "600"])
    usr1_counter.clear()
    arena = Arena(outside, sandboxes, f"nanochat-pwned-{uuid.uuid4().hex}", decoy, *listeners)
    yield arena
    # Clean up whatever an escape left behind: only our own files and processes, by exact path and pid.
    for pid in _sandbox_processes(sandboxes):
        _kill(pid)
    for path in arena.shared_paths():
        if path.is_dir():
            path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink()
    decoy.kill()
    decoy.wait()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _sandbox_processes(sandboxes: Path) -> list[int]:
    """Live processes whose cwd is (or was, before its removal) inside `sandboxes`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd.startswith(str(sandboxes)) and _state(int(entry)) not in (None, "Z", "X"):
            found.append(int(entry))
    return found


def _children() -> set[int]:
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return {p for p in pids if _state(p) not in (None, "Z", "X")}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _parent_snapshot() -> dict:
    return {
        "cwd": os.getcwd(),
        "handlers": {
            s: signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)
        },
        "limits": {
            name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")
        },
        "priority": os.getpriority(os.PRIO_PROCESS, 0),
        "affinity": os.sched_getaffinity(0),
        "scheduler": os.sched_getscheduler(0),
        "group": (os.getpgrp(), os.getsid(0)),
        "children": _children(),
    }


def _pending(sock: socket.socket) -> bool:
    try:
        if sock.type == socket.SOCK_DGRAM:
            sock.recvfrom(1)
        else:
            sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def _restore_parent(before: dict) -> None:
    """Undo what an escape changed in this process, so one failure does not cascade into the next tests."""
    for name, limits in before["limits"].items():
        if resource.getrlimit(getattr(resource, name)) != limits:
            resource.setrlimit(getattr(resource, name), limits)
    if os.sched_getaffinity(0) != before["affinity"]:
        os.sched_setaffinity(0, before["affinity"])
    if os.sched_getscheduler(0) != before["scheduler"]:
        os.sched_setscheduler(0, before["scheduler"], os.sched_param(0))
    if os.getpriority(os.PRIO_PROCESS, 0) != before["priority"]:
        os.setpriority(os.PRIO_PROCESS, 0, before["priority"])


def _run_attack(arena: Arena, category: str, code: str):
    kwargs = {"max_output_bytes": OUTPUT_LIMIT}
    if category in ("loops", "output", "threads", "processes", "signals", "exits"):
        kwargs["timeout"] = LOOP_TIMEOUT
    canary = (arena.outside / "canary.txt").read_text()
    canary_stat = (arena.outside / "canary.txt").stat()
    before, rss_before = _parent_snapshot(), _rss()
    start = time.monotonic()
    result = run_code(arena.substitute(code) + "\nprint('ESCAPED')\n", **kwargs)
    elapsed = time.monotonic() - start
    time.sleep(0.01)  # a signal or a connection was sent before the child exited; let it be handled
    after, rss_after = _parent_snapshot(), _rss()
    leftovers = _sandbox_processes(arena.sandboxes)
    try:
        problems = []
        if _SECRET_VALUE in result.stdout + result.stderr or canary.strip() in result.stdout + result.stderr:
            problems.append("a secret reached the output")
        if "root:x:0:0" in result.stdout:
            problems.append("/etc/passwd reached the output")
        if sorted(os.listdir(arena.outside)) != ["canary.txt"]:
            problems.append(f"outside dir changed: {sorted(os.listdir(arena.outside))}")
        elif (arena.outside / "canary.txt").read_text() != canary:
            problems.append("canary modified")
        else:
            now = (arena.outside / "canary.txt").stat()
            if (now.st_mode, now.st_mtime_ns, now.st_ino) != (
                canary_stat.st_mode,
                canary_stat.st_mtime_ns,
                canary_stat.st_ino,
            ):
                problems.append("canary metadata changed")
        problems += [f"{p} created" for p in arena.shared_paths() if p.exists() or p.is_symlink()]
        if os.listdir(arena.sandboxes):
            problems.append(f"sandbox temp dir left behind: {os.listdir(arena.sandboxes)}")
        if leftovers:
            problems.append(f"processes left running: {leftovers}")
        if arena.decoy.poll() is not None:
            problems.append("decoy process killed")
        if _usr1_received:
            problems.append("SIGUSR1 reached the parent")
        for name in ("tcp", "udp", "unix"):
            if _pending(getattr(arena, name)):
                problems.append(f"{name} listener was reached")
        for key in before:
            if before[key] != after[key]:
                problems.append(f"parent {key} changed: {before[key]} -> {after[key]}")
        if rss_after - rss_before > 32 * 1024**2:
            problems.append(f"parent memory grew by {(rss_after - rss_before) / 1024**2:.0f} MiB")
        if elapsed > kwargs.get("timeout", 5.0) + 3:
            problems.append(f"took {elapsed:.1f} s")
        return result, problems
    finally:
        _restore_parent(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent's state is read from /proc")
@pytest.mark.parametrize(
    "case", SANDBOX_CASES, ids=[f"{c}-{i}" for c in SANDBOX_ATTACKS for i in range(len(SANDBOX_ATTACKS[c]))]
)
def test_sandbox_attack_is_refused_or_contained(arena, case):
    category, code = case
    result, problems = _run_attack(arena, category, code)
    if category == "output":  # contained: may end normally, but what comes back is bounded
        if len(result.stdout) > OUTPUT_LIMIT or len(result.stderr) > OUTPUT_LIMIT or not result.output_truncated:
            problems.append("output not bounded")
    elif result.success or "ESCAPED" in result.stdout:
        problems.append("the program ran to its end")
    assert not problems, (
        f"{problems}\nerror: {result.error}\nstdout: {result.stdout[:300]!r}\nstderr: {result.stderr[-600:]}"
    )


LEGITIMATE_PROGRAMS = [
    "from typing import List\n\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n\nassert total([1, 2]) == 3",
    (
        "import math, collections, itertools, functools, heapq, bisect, re, string\n"
        "assert math.gcd(12, 18) == 6 and collections.Counter('aab')['a'] == 2\n"
        "assert list(itertools.accumulate([1, 2, 3])) == [1, 3, 6] and functools.reduce(max, [3, 9, 2]) == 9\n"
        "assert heapq.nsmallest(1, [5, 2]) == [2] and bisect.bisect([1, 3], 2) == 1\n"
        "assert re.findall(r'\\d+', 'a1b22') == ['1', '22'] and string.ascii_lowercase[0] == 'a'"
    ),
    "import hashlib; assert hashlib.md5(b'a').hexdigest() == '0cc175b9c0f1b6a831c399e269772661'",
    "from collections import namedtuple\nP = namedtuple('P', 'x y')\nassert P(1, 2).x == 1",
    "import dataclasses\n@dataclasses.dataclass\nclass C:\n    x: int = 1\nassert C().x == 1",
    (
        "import os\nopen('data.txt', 'w').write('hi')\nassert open('data.txt').read() == 'hi'\n"
        "os.makedirs('sub/deeper')\nopen('sub/x', 'w').close()\nassert sorted(os.listdir('sub')) == ['deeper', 'x']"
    ),
    (
        "import random, statistics, fractions, decimal, datetime, json, copy, enum, textwrap\n"
        "random.seed(0); assert 0 <= random.random() < 1\n"
        "assert statistics.mean([1, 3]) == 2 and fractions.Fraction(1, 2) + fractions.Fraction(1, 2) == 1\n"
        "assert json.loads(json.dumps({'a': [1]})) == {'a': [1]} and datetime.date(2024, 1, 1).weekday() == 0"
    ),
    (
        "import threading\nout = []\nt = threading.Thread(target=out.append, args=(1,))\n"
        "t.start(); t.join()\nassert out == [1]"
    ),
    "import typing\nT = typing.TypeVar('T')\nclass Box(typing.Generic[T]):\n    pass\nassert Box[int]",
    (
        "import traceback\ntry:\n    raise ValueError('x')\nexcept ValueError:\n"
        "    assert 'ValueError' in traceback.format_exc()"
    ),
    "import sys, os\nprint('to stderr', file=sys.stderr)\nassert os.path.exists('program.py') and os.getcwd()",
    "import sys; sys.exit(3) if False else None",
]


@pytest.mark.parametrize("code", LEGITIMATE_PROGRAMS, ids=range(len(LEGITIMATE_PROGRAMS)))
def test_legitimate_programs_still_pass(code):
    start = time.monotonic()
    result = run_code(code)
    assert result.success, result.stderr
    assert time.monotonic() - start < 3


def test_no_unchecked_module_is_loaded_before_the_program():
    """The hook sees an import only the first time; what the runner loads itself the program gets for free."""
    unchecked = {
        "_posixsubprocess",
        "subprocess",
        "_ctypes",
        "ctypes",
        "_socket",
        "_ssl",
        "_sqlite3",
        "readline",
        "_posixshmem",
        "_multiprocessing",
        "_xxsubinterpreters",
        "_testcapi",
        "_testinternalcapi",
        "fcntl",
    }
    result = run_code("import sys\nprint(sorted(sys.modules))")
    assert result.success
    assert unchecked.isdisjoint(eval(result.stdout)), unchecked & set(eval(result.stdout))


def test_the_runner_is_plain_python_for_trusted_code():
    """guard=False is for trusted code: none of the lock-down applies."""
    result = run_code(
        "import subprocess, os; print(subprocess.check_output(['echo', 'ok']).decode().strip())", guard=False
    )
    assert result.success and result.stdout == "ok\n"


def test_suite_covers_every_category_with_many_attacks():
    assert min(len(v) for v in CALCULATOR_ATTACKS.values()) >= 10
    assert min(len(v) for v in SANDBOX_ATTACKS.values()) >= 4
    assert len(SANDBOX_CASES) >= 200 and len(CALCULATOR_CASES) >= 100
