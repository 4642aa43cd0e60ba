"""The code sandbox: output capture, failures, timeouts, memory, environment, temp dir, process-group kill."""

import os
import time

import pytest

from nanochat.engine.sandbox import run_code
from nanochat.errors import UserError


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a (possibly absent) init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def gone_soon(pid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_stdout_is_captured():
    result = run_code("print('hi')")
    assert result.success and result.stdout == "hi\n" and result.stderr == ""
    assert result.error is None and result.returncode == 0
    assert not result.timeout and not result.memory_exceeded and not result.output_truncated


def test_exception_reports_the_last_stderr_line():
    result = run_code("print('before')\n1 / 0\n")
    assert not result.success and result.stdout == "before\n"
    assert result.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in result.stderr and result.returncode == 1


def test_nonzero_exit_without_traceback_is_a_failure():
    result = run_code("import sys; sys.exit(3)")
    assert not result.success and result.returncode == 3 and result.error == "exit status 3"


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_code("while True:\n    pass\n", timeout=1)
    assert result.timeout and not result.success and result.returncode is None
    assert time.monotonic() - start < 1 + 2


def test_memory_bomb_is_stopped():
    result = run_code("x = bytearray(2 * 1024**3)", memory_mb=256)
    assert result.memory_exceeded and not result.success and not result.timeout
    assert result.error == "MemoryError"


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("SECRET", "hunter2")
    result = run_code("import os\nprint(os.environ.get('SECRET'))\nprint(os.environ['PATH'])")
    assert result.stdout == "None\n/usr/bin:/bin\n"


def test_cwd_is_a_temp_dir_removed_afterwards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_code("import os\nopen('out.txt', 'w').write('data')\nprint(os.getcwd())")
    assert result.success
    child_cwd = result.stdout.strip()
    assert child_cwd != str(tmp_path) and not os.path.exists(child_cwd)
    assert list(tmp_path.iterdir()) == []


def test_huge_output_is_truncated():
    result = run_code("print('x' * 5_000_000)", max_output_bytes=1000)
    assert result.success and result.output_truncated
    assert result.stdout == "x" * 1000


def test_endless_output_is_bounded_and_times_out():
    result = run_code("while True:\n    print('y' * 10_000)\n", timeout=1, max_output_bytes=50_000)
    assert result.timeout and result.output_truncated and len(result.stdout) == 50_000


def test_error_line_survives_truncated_stderr():
    result = run_code("import sys\nsys.stderr.write('e' * 100_000 + '\\n')\nraise KeyError('k')", max_output_bytes=100)
    assert len(result.stderr) == 100 and result.error == "KeyError: 'k'"


def test_guard_blocks_process_and_file_functions():
    for call in ("os.system('true')", "os.remove('program.py')", "os.kill(os.getpid(), 9)"):
        result = run_code(f"import os\n{call}")
        assert result.error == "TypeError: 'NoneType' object is not callable", call


def test_process_group_is_killed_on_timeout():
    code = (
        "import subprocess, time\n"
        "child = subprocess.Popen(['sleep', '100'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(100)\n"
    )
    result = run_code(code, timeout=1, guard=False)
    assert result.timeout
    grandchild = int(result.stdout)
    assert gone_soon(grandchild)


def test_background_children_do_not_outlive_a_normal_exit():
    code = (
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '100'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid)\n"
    )
    result = run_code(code, timeout=5, guard=False)
    assert result.success and not result.timeout
    assert gone_soon(int(result.stdout))


def test_bad_limits_are_refused():
    with pytest.raises(UserError, match="timeout > 0"):
        run_code("pass", timeout=0)
