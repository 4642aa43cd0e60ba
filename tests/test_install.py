"""The built wheel installed into a fresh virtual environment trains from any directory with `nanochat train`.

The fresh environment sees this one's site-packages (torch, Lightning, ...) through a .pth file, not its editable
nanochat (a .pth inside those site-packages is not processed), so the nanochat it runs is the wheel's: its code, its
packaged configs and its console script.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_from_any_directory(tmp_path):
    # Without PYTHONPATH: pip would take a source tree on it (and the egg-info a build leaves there) as installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NANOCHAT_PRETRAIN_TEXT")}
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
        env=env,
    )
    (wheel,) = wheels.glob("nanochat-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
        env=env,
    )

    work = tmp_path / "anywhere"
    work.mkdir()
    env.update(NANOCHAT_BASE_DIR=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    probe = subprocess.run(
        [python, "-c", "import nanochat, nanochat.configs as c; print(nanochat.__file__, c.CONF_DIR)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    where = probe.stdout.split()
    assert (
        all(p.startswith(site) for p in where) and Path(where[1], "train.yaml").is_file()
    )  # the wheel's, not the checkout's
    out = subprocess.run(
        [
            venv / "bin" / "nanochat",
            "train",
            "experiment=speedrun_micro",
            "pipeline.data=builtin",
            "pipeline.steps.rl=null",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "home" / "runs" / "speedrun_d2"
    assert json.loads((run / "pipeline" / "steps.json").read_text())["done"].keys() == {
        "tokenizer",
        "base",
        "mid",
        "sft",
    }
    assert (run / "sft" / "export" / "model.safetensors").is_file() and (run / "report.md").is_file()
    assert not any(work.iterdir())  # nothing written to the directory it ran from
