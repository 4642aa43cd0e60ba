"""Depth sweeps through `train.py -m`: per-job results, the CSV + PNG summary, the run-dir guard, the CLI rebuild."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_core_bundle

from nanochat.sweep import CSV_NAME, PNG_NAME, claim_run_dir, main

REPO = Path(__file__).resolve().parents[1]


def train(tmp_path, *overrides):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "home")}
    return subprocess.run(
        [sys.executable, "train.py", "-m", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def depth_sweep(tiny_run, *extra, **values):
    """tiny_run's seconds-long base run over depths 2 and 3, 4 steps each, val bpb only at the start and end."""
    swap = {
        "model.depth": "2,3",
        "budget.base_steps": "4",
        "budget.eval_every": "0",
        "budget.save_every": "4",
        **{k.replace("__", "."): v for k, v in values.items()},
    }
    return [f"{k}={swap[k]}" if (k := o.split("=", 1)[0]) in swap else o for o in tiny_run(*extra)]


@pytest.mark.slow
def test_depth_sweep_writes_csv_and_png_and_the_cli_rebuilds_them(tmp_path, tiny_run, tiny_tokenizer):
    import matplotlib.image
    import torch

    from nanochat.models.components import GPT, GPTConfig

    bundle = write_core_bundle(tmp_path / "bundle", missing=False)  # a CORE score per depth: the second plot row
    # The micro preset (experiment=speedrun_micro) at stage=base, on the test's own shards and tokenizer.
    out = train(tmp_path, *depth_sweep(tiny_run, "experiment=speedrun_micro", f"mixture.core_bundle={bundle}"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "home" / "sweeps").glob("*/*")
    assert f"sweep summary: {sweep_dir / CSV_NAME} and {sweep_dir / PNG_NAME} (2 of 2 jobs finished)" in out.stdout
    rows = list(csv.DictReader((sweep_dir / CSV_NAME).read_text().splitlines()))
    assert [(r["run"], int(r["depth"]), r["status"]) for r in rows] == [
        ("speedrun_d2", 2, "completed"),
        ("speedrun_d3", 3, "completed"),
    ]
    assert int(rows[0]["params"]) < int(rows[1]["params"])
    vocab = tiny_tokenizer.vocab_size
    for row in rows:
        assert math.isfinite(float(row["val_bpb"])) and math.isfinite(float(row["core_score"]))
        with torch.device("meta"):
            gpt = GPT(GPTConfig.from_depth(int(row["depth"]), vocab, 16, head_dim=64))
        assert int(row["params"]) == gpt.num_params()
        assert int(row["tokens"]) == 4 * 64  # steps x model.total_batch_size
        assert int(row["training_flops"]) == gpt.flops_per_token() * 4 * 64
        assert Path(row["run_dir"]) == tmp_path / "home" / "runs" / row["run"] / "base"
    assert matplotlib.image.imread(sweep_dir / PNG_NAME).shape == (760, 1000, 4)  # decodes; bpb and CORE rows
    # The jobs' own Hydra dirs sit in the sweep dir, apart from the run dirs they train in.
    assert json.loads((sweep_dir / "speedrun_d3-1" / "sweep_result.json").read_text())["depth"] == 3

    written = (sweep_dir / CSV_NAME).read_text()
    (sweep_dir / CSV_NAME).unlink()
    (sweep_dir / PNG_NAME).unlink()
    rebuilt = subprocess.run(
        [sys.executable, "-m", "nanochat.sweep", str(sweep_dir)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert rebuilt.returncode == 0 and "(2 of 2 jobs finished)" in rebuilt.stdout, rebuilt.stderr
    assert (sweep_dir / CSV_NAME).read_text() == written and (sweep_dir / PNG_NAME).stat().st_size > 0


def test_jobs_sharing_a_run_name_are_refused_before_any_trains(tmp_path, tiny_run):
    out = train(tmp_path, *depth_sweep(tiny_run, "run=same"))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: jobs 0 (model.depth=2) and 1 (model.depth=3)"), out.stderr
    assert "run='sweep_${model.name}'" in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "home" / "runs").exists()


def test_a_job_failing_with_a_user_error_leaves_the_others_running(tmp_path, tiny_run):
    sweep = depth_sweep(tiny_run, "run=t${model.total_batch_size}", model__depth="2", model__total_batch_size="100,200")
    out = train(tmp_path, *sweep)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert [line[:30] for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: total_batch_size=100 to",
        "error: total_batch_size=200 to",
    ]  # both jobs ran
    assert (
        "(0 of 2 jobs finished); not finished: job 0 (model.total_batch_size=100): failed: total_batch_size=100 "
        "tokens is not a positive multiple" in out.stderr
    )


def test_run_dir_claims_admit_the_same_job_again_and_refuse_another(tmp_path, capsys):
    job = {"job": 0, "run": "x", "stage": "base", "run_dir": "/h/runs/x/base", "overrides": ["model=d4", "run=x"]}
    claim_run_dir(tmp_path, job)
    claim_run_dir(tmp_path, job)  # another rank of the same job, or its requeue
    claim_run_dir(tmp_path, {**job, "job": 1, "run_dir": "/h/runs/y/base"})
    with pytest.raises(SystemExit) as exit_info:
        claim_run_dir(tmp_path, {**job, "job": 2, "overrides": ["model=d6", "run=x"]})
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: job 2 (model=d6) would train in the run dir /h/runs/x/base that job 0 (model=d4)")
    assert [p.name for p in tmp_path.iterdir()] == [".run_dirs"] and len(list((tmp_path / ".run_dirs").iterdir())) == 2


def test_summary_keeps_the_finished_jobs_and_names_the_others(tmp_path, capsys):
    base = {"stage": "base", "run_dir": "/r", "overrides": ["trainer=cpu"]}
    done = {
        **base,
        "job": 0,
        "run": "d4",
        "status": "completed",
        "depth": 4,
        "params": 10**6,
        "flops_per_token": 6 * 10**6,
        "tokens": 10**7,
        "training_flops": 6 * 10**13,
        "val_bpb": 1.5,
        "core_score": None,
    }
    plan = [
        {**base, "job": n, "run": f"d{d}", "overrides": [f"model=d{d}", "trainer=cpu"]} for n, d in enumerate((4, 6, 8))
    ]
    (tmp_path / "sweep_plan.json").write_text(json.dumps(plan))
    for name, result in {
        "d4-0": {**done, **plan[0]},
        "d6-1": {**plan[1], "status": "failed: RuntimeError: out of memory"},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep_result.json").write_text(json.dumps(result))
    assert main([str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith(
        "(1 of 3 jobs finished); not finished: job 1 (model=d6): failed: RuntimeError: out of memory; "
        "job 2 (model=d8): not started"
    )
    rows = list(csv.DictReader((tmp_path / CSV_NAME).read_text().splitlines()))
    assert [(r["run"], r["status"], r["val_bpb"]) for r in rows] == [
        ("d4", "completed", "1.5"),
        ("d6", "failed: RuntimeError: out of memory", ""),
        ("d8", "not started", ""),
    ]
    assert (tmp_path / PNG_NAME).stat().st_size > 0


def test_cli_says_when_a_dir_is_no_sweep(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "not the directory of a sweep" in capsys.readouterr().err


@pytest.mark.parametrize("trainer, nodes", [("8xh100", 1), ("multinode", 2)])
def test_slurm_launcher_takes_tasks_and_nodes_from_the_trainer(trainer, nodes):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'nanochat[slurm]'")
    from hydra import compose, initialize_config_dir

    from nanochat.configs import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=["hydra/launcher=slurm", f"trainer={trainer}", "model=d20"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (nodes, 8, 8)
