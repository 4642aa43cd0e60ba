"""Two ranks for real: torchrun + DDP (gloo on CPU) through train.py, the way multi-GPU runs are launched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LM, MC, SCHEMA, dtype_of, write_core_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_resume(tiny_corpus_shards, tiny_tokenizer_dir, tmp_path, precision):
    home = tmp_path / "home"
    bundle = write_core_bundle(tmp_path / "bundle")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        # the real multi-GPU preset (its DDPStrategy settings), on CPU: gloo, no compile
        "stage=base",
        "trainer=8xh100",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"precision={precision}",
        "compile=false",
        "data=local",
        "logger=csv",
        f"data.dir={tiny_corpus_shards}",
        f"paths.tokenizer_dir={tiny_tokenizer_dir}",
        "model.depth=2",
        "module.head_dim=64",
        "model.sequence_len=16",
        "model.device_batch_size=1",
        "model.total_batch_size=64",
        "budget.eval_every=3",
        "budget.eval_tokens=256",
        "budget.sample_every=0",
        "budget.save_every=3",
        "budget.log_every=1",
        f"mixture.core_bundle={bundle}",
        "budget.core_max_per_task=-1",
    ]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(home), "OMP_NUM_THREADS": "1"}
    for steps in (3, 5):  # 3 steps, then resume=auto continues the same run to 5
        out = subprocess.run(
            [*cmd, f"budget.base_steps={steps}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = home / "runs" / "d2" / "base"
    log0 = (run_dir / "train_rank0.log").read_text()
    assert "x 2 accumulation x 2 ranks = 64 tokens per step" in log0  # 1 x 16 x 2 x 2
    assert f"precision: {precision} (precision={precision}" in log0
    assert (run_dir / "train_rank1.log").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 5
    assert ckpt["PretrainDataModule"]["stride"] == 2  # 2 ranks x 1 reader each
    rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps_logged = {int(r.split(",")[header.index("step")]) for r in rows[1:]}
    assert {1, 2, 3, 4, 5} <= steps_logged  # the second launch appended to the first one's curves
    from nanochat.export import load_export

    model, tok, meta = load_export(run_dir)
    assert meta["step"] == 5 and all(torch.isfinite(p).all() for p in model.parameters())
    # CORE after the last step, examples strided over both ranks and summed: the same as one process on the export
    from nanochat.eval.core import evaluate_core
    from nanochat.precision import computing
    from nanochat.tasks.core_bundle import load_bundle

    with computing(model, dtype_of(precision)):  # as the trainer evaluated: fp32 weights, that precision
        alone = evaluate_core(model, tok, load_bundle(bundle))
    assert meta["metrics"]["core/score"] == pytest.approx(alone["score"], abs=1e-9)
    # and the standalone evaluation on two ranks through Fabric
    out = subprocess.run(
        [
            *cmd[:5],
            "train.py",
            "stage=eval",
            "eval=core",
            f"ckpt={run_dir}",
            "trainer=cpu",
            "trainer.devices=2",
            f"mixture.core_bundle={bundle}",
            f"precision={precision}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    section = json.loads((home / "runs" / "d2" / "report" / "base-eval.json").read_text())
    assert section["metrics"] == pytest.approx(alone["metrics"], abs=1e-9)
    assert [r[3] for r in section["tables"][0]["rows"][:3]] == [len(MC), len(SCHEMA), len(LM)]  # every example, once
