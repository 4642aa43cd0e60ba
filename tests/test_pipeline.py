"""The speedrun pipeline (`experiment=speedrun_*`): the whole recipe at test size, a kill during SFT and the
re-run that continues there, and the d20-d32 recipes' numbers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PRECISIONS
from omegaconf import OmegaConf

from nanochat.configs import compose
from nanochat.models.components import GPT, GPTConfig
from nanochat.models.horizon import grad_accum_steps, num_iterations

REPO = Path(__file__).resolve().parents[1]
MICRO = ["train.py", "experiment=speedrun_micro", "pipeline.data=builtin"]
STAGES = ("base", "mid", "sft", "rl")


def _env(home: Path) -> dict:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", params=PRECISIONS)
def micro_run(tmp_path_factory, request):
    """Run the micro pipeline in each precision, SIGKILL it (and its stage) once SFT has a checkpoint, then run the
    same command again to the end. Returns (home, run root, first output, second output, mtimes of finished
    exports, precision)."""
    command = [*MICRO, f"precision={request.param}"]
    home = tmp_path_factory.mktemp("pipeline_home")
    root = home / "runs" / "speedrun_d2"
    log = home / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=REPO,
            env=_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own process group: the kill takes the stage with it
        deadline = time.monotonic() + 600
        while not (root / "sft" / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None, f"pipeline ended before SFT checkpointed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no SFT checkpoint after 10 minutes"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {s: (root / s / "export" / "model.safetensors").stat().st_mtime_ns for s in ("base", "mid")}
    second = subprocess.run(
        [sys.executable, *command], cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return home, root, log.read_text(), second.stdout + second.stderr, finished, request.param


@pytest.mark.slow
def test_killed_pipeline_resumes_at_sft(micro_run):
    home, root, first, second, finished, precision = micro_run
    assert "[2/5] base" in first and "[4/5] sft" in first and "[5/5] rl" not in first
    for name in ("tokenizer", "base", "mid"):
        assert f"{name}: finished earlier, skipped" in second
    assert f"resuming from {root / 'sft' / 'checkpoints' / 'last.ckpt'}" in second
    assert "[5/5] rl" in second
    # Finished stages were not touched again, and SFT ran to its horizon from the checkpoint.
    for s, mtime in finished.items():
        assert (root / s / "export" / "model.safetensors").stat().st_mtime_ns == mtime
    meta = json.loads((root / "sft" / "export" / "config.json").read_text())["meta"]
    assert meta["step"] == 20
    done = json.loads((root / "pipeline" / "steps.json").read_text())["done"]
    assert list(done) == ["tokenizer", "base", "mid", "sft", "rl"]


@pytest.mark.slow
def test_micro_pipeline_exports_report_and_chat(micro_run):
    home, root, _, second, _, precision = micro_run
    for stage in STAGES:
        meta = json.loads((root / stage / "export" / "config.json").read_text())["meta"]
        assert meta["stage"] == stage and meta["step"] > 0
        assert (root / stage / "export" / "model.safetensors").stat().st_size > 0
        if stage != "base":
            parent = STAGES[STAGES.index(stage) - 1]
            assert meta["parent"]["stage"] == parent and meta["parent"]["export"] == str(root / parent / "export")
    report = (root / "report.md").read_text()
    for title in (
        "## Tokenizer training",
        "## Base model training",
        "## Midtraining",
        "## SFT",
        "## RL",
        "## Pipeline",
        "## Summary",
        "### Chat evaluation",
        "### pass@k on held-out questions",
    ):
        assert title in report, title
    sections = {p.stem: json.loads(p.read_text()) for p in (root / "report").glob("*.json")}
    for stage in STAGES:
        assert sections[stage]["metrics"], stage
    assert "val/bpb" in sections["base"]["metrics"] and "chat/arithmetic" in sections["sft"]["metrics"]
    for stage in STAGES:  # every stage trained in the pipeline's precision, and the report card says so
        assert sections[stage]["items"]["precision"] == {"fp32": "32-true", "bf16": "bf16-mixed"}[precision], stage
    # The last lines say where the report is and how to talk to the model.
    assert f"report card: {root / 'report.md'}" in second
    assert f"nanochat serve ckpt={root / 'rl' / 'export'}" in second


@pytest.mark.slow
def test_the_commands_the_pipeline_prints_answer_in_its_precision(micro_run, tmp_path):
    """The two commands a finished pipeline prints, in the precision it trained in: the CLI one-shot answers,
    serve.py answers a streaming and a non-streaming request, and its web UI chats through gradio_client."""
    import httpx
    from common import serve_process
    from gradio_client import Client

    home, root, _, second, _, precision = micro_run
    export = root / "rl" / "export"
    assert f"nanochat serve ckpt={export}" in second and f"nanochat chat {export} -p" in second
    reply = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanochat",
            "chat",
            str(export),
            "-p",
            "What is 2 + 3?",
            "--seed",
            "0",
            "--max-tokens",
            "12",
            "--device",
            "cpu",
            "--precision",
            precision,
        ],
        cwd=REPO,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.strip() and reply.stderr.startswith(f"precision: {precision} (precision={precision}")
    with serve_process(export, [f"precision={precision}"], _env(home), tmp_path / "serve.log", ui=True) as (_, port):
        url = f"http://127.0.0.1:{port}"
        body = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 12, "temperature": 0}
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert whole.status_code == 200 and whole.json()["choices"][0]["finish_reason"] in ("stop", "length")
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
        chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert streamed.status_code == 200 and text == whole.json()["choices"][0]["message"]["content"]
        ui = Client(url + "/", verbose=False).predict("What is 2 + 3?", 0.0, 50, 12, api_name="/chat")
        assert ui and ui[0]["role"] == "assistant"
    assert f"precision: {precision} (precision={precision}" in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
def test_finished_pipeline_reruns_nothing_and_refuses_a_changed_step(micro_run):
    home, root, _, _, _, precision = micro_run
    command = [*MICRO, f"precision={precision}"]
    again = subprocess.run(
        [sys.executable, *command], cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished earlier, skipped") == 5
    changed = subprocess.run(
        [sys.executable, *command, "budget.base_steps=30"],
        cwd=REPO,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert changed.returncode == 2
    assert "step 'tokenizer' of this pipeline already finished with a different command" in changed.stderr
    assert "Traceback" not in changed.stderr


def _cfg_job(*overrides: str) -> dict:
    out = subprocess.run(
        [sys.executable, "train.py", *overrides, "--cfg", "job"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@pytest.mark.parametrize(
    "name, depth, params, device_batch, shards, steps",
    [
        ("speedrun_d20", 20, 560_988_160, 32, 240, 21_400),
        ("speedrun_d26", 26, 1_081_999_360, 16, 450, 41_275),
        ("speedrun_d32", 32, 1_879_048_192, 8, 800, 71_680),
    ],
)
def test_gpu_recipes_pin_nanochats_numbers(name, depth, params, device_batch, shards, steps):
    job = _cfg_job(f"experiment={name}", "trainer=8xh100")
    m = job["model"]
    assert (m["depth"], m["device_batch_size"], m["total_batch_size"], m["sequence_len"]) == (
        depth,
        device_batch,
        524_288,
        2_048,
    )
    assert m["vocab_size"] == 65_536 and job["pipeline"]["shards"] == shards
    assert job["trainer"]["devices"] == 8
    assert list(job["pipeline"]["steps"]) == ["tokenizer", "base", "base_eval", "mid", "sft", "rl"]
    assert job["pipeline"]["steps"]["rl"] is None  # optional, off as in nanochat's speedrun
    max_chars = 4_000_000_000 if depth == 32 else 2_000_000_000
    assert f"tokenizer.max_chars={max_chars:_}" in job["pipeline"]["steps"]["tokenizer"]["overrides"]
    # The base step's own config: the horizon from 20 tokens per parameter, and the accumulation on 8 GPUs vs 1.
    for trainer, world in (("8xh100", 8), ("1xgpu", 1)):
        cfg = compose([f"experiment={name}", f"trainer={trainer}", "stage=base"])
        assert cfg.stage.name == "base" and cfg.module.horizon.param_data_ratio == 20
        with torch.device("meta"):
            gpt = GPT(GPTConfig.from_depth(depth, m["vocab_size"], m["sequence_len"]))
        assert gpt.num_params() == params
        horizon = OmegaConf.to_object(cfg.module.horizon)
        assert (
            num_iterations(
                num_params=params, flops_per_token=gpt.flops_per_token(), total_batch_size=524_288, horizon=horizon
            )
            == steps
        )
        accum = grad_accum_steps(524_288, cfg.model.device_batch_size, 2_048, world)
        assert accum * cfg.model.device_batch_size * 2_048 * world == 524_288
        assert accum == (32 // device_batch) * (8 // world)


def test_cpu_recipe_and_data_resolution(monkeypatch, tmp_path):
    from nanochat.data import resolve

    job = _cfg_job("experiment=speedrun_cpu")
    assert (
        job["model"]["depth"] == 4
        and job["trainer"]["accelerator"] == "cpu"
        and job["pipeline"]["data"] == "auto_or_builtin"
    )
    assert list(job["pipeline"]["steps"]) == ["tokenizer", "base", "mid", "sft", "rl"]
    cfg = compose(["experiment=speedrun_cpu"])
    monkeypatch.setattr(resolve, "hub_reachable", lambda: False)
    monkeypatch.delenv("NANOCHAT_PRETRAIN_TEXT", raising=False)
    # Nothing local, no hub: the starter corpus, announced in one line that says it is not FineWeb.
    monkeypatch.setattr(resolve, "shared_data_dir", lambda: None)
    overrides, prep, lines = resolve.resolve_sources(cfg, [])
    assert overrides == ["data=builtin", "mixture=builtin"] and prep == []
    assert len(lines) == 1 and "NOT FineWeb" in lines[0]
    # Local data first: the text directory and the shared conversations.
    shared = tmp_path / "shared"
    (shared / "pretrain_text").mkdir(parents=True)
    monkeypatch.setattr(resolve, "shared_data_dir", lambda: shared)
    overrides, prep, _ = resolve.resolve_sources(cfg, [])
    assert overrides == ["data=local", f"data.source={shared / 'pretrain_text'}", "mixture=shared"]
    # The hub when reachable and nothing is local: a first step downloads the shards and the single files.
    monkeypatch.setattr(resolve, "shared_data_dir", lambda: None)
    monkeypatch.setattr(resolve, "hub_reachable", lambda: True)
    overrides, prep, _ = resolve.resolve_sources(cfg, [])
    assert overrides == ["data=fineweb_edu", "mixture=hub"]
    assert prep[0] == ["-m", "nanochat", "data", "download", "fineweb-edu", "-n", "240"] and len(prep) == 4
    # What the user chose is kept; a GPU recipe never falls back to the toy corpus.
    assert resolve.resolve_sources(cfg, ["data=local", "mixture=shared"])[0] == []
    monkeypatch.setattr(resolve, "hub_reachable", lambda: False)
    with pytest.raises(Exception, match="no pretraining text on this machine"):
        resolve.resolve_sources(compose(["experiment=speedrun_d20"]), [])
