"""What every bench script shares: timing, the machine it ran on, and the result file `make bench` reads.

Each script writes one JSON file (`save`) holding its settings, raw figures and a ready markdown table;
bench/run_all.py pastes that table into docs/benchmarks.md between `<!-- bench:NAME -->` markers.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Fastest of `repeats` timed calls in seconds: on a shared machine the minimum is the least-disturbed run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save(path: str | Path | None, table: str, results, settings: dict | None = None) -> dict:
    """Print the table and write {command, date, machine, settings, table, results} to `path` (if one is given)."""
    print(table)
    record = {
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "settings": settings or {},
        "table": table,
        "results": results,
    }
    if path is None:
        return record
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nraw numbers: {path}")
    return record


REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(
    export_dir: Path, overrides: list[str], env: dict, log: Path, ready_timeout: float = 90, ui: bool = False
):
    """`python serve.py` for `export_dir` on 127.0.0.1 and a free port (CPU, API only unless `ui`, plus `overrides`),
    its output in `log`; yields (process, port) once /health answers 200, and stops it with SIGINT (then kill)."""
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        str(REPO / "serve.py"),
        f"ckpt={export_dir}",
        f"port={port}",
        "device=cpu",
        f"ui={str(ui).lower()}",
        *overrides,
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env={**env, "PYTHONPATH": str(REPO / "src")}, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve.py did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        yield proc, port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
