"""bench/train_step.py, bench/fused_head_loss.py and bench/run_all.py at tiny sizes: real runs, checked figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
import run_all  # noqa: E402  (bench/ is on pytest's pythonpath)


def run_script(*argv: str) -> None:
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)


def test_train_step_lightning_and_plain_train_the_same_model(tmp_path):
    out = tmp_path / "train.json"
    run_script(
        "bench/train_step.py",
        "--depths",
        "1",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--skip-bf16",
        "--vocab",
        "300",
        "--head-dim",
        "32",
        "--json",
        str(out),
    )
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert row["model"] == "d1" and row["precision"] == "fp32" and len(row["runs"]) == 2
    assert row["loss_plain"] == pytest.approx(row["loss_lightning"], rel=1e-5)  # the same computation on both sides
    assert row["ratio_lightning_over_plain"] == pytest.approx(row["lightning_tok_per_s"] / row["plain_tok_per_s"])
    for run in row["runs"]:
        assert len(run["step_seconds"]) == 2
        assert run["tok_per_s"] == pytest.approx(2 * 32 * 2 / sum(run["step_seconds"]))
    assert 0 < row["plain_optimizer_share"] < 1 and 0 < row["mfu_lightning"] < 1
    assert "| d1 | fp32 | no |" in record["table"] and record["settings"]["vocab"] == 300


def test_head_loss_bench_compares_equal_losses(tmp_path):
    out = tmp_path / "head.json"
    run_script(
        "bench/fused_head_loss.py",
        "--depth",
        "1",
        "--vocab",
        "512",
        "--rows",
        "2",
        "--seq-len",
        "16",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    record = json.loads(out.read_text())
    for part in ("head", "step"):
        plain, fused = record["results"][part]["plain ops"], record["results"][part]["fused"]
        assert plain["loss"] == pytest.approx(fused["loss"], rel=1e-5) and plain["seconds"] > 0 and fused["seconds"] > 0
    assert record["table"].count("\n") == 3  # header, rule, two rows


def test_run_all_refreshes_only_its_blocks(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    record = {
        "command": "python bench/x.py",
        "date": "2026-11-21",
        "table": "| a |\n|---|\n| 1 |",
        "machine": {"cpu": "CPU", "torch_threads": 2, "cpu_capability": "AVX2", "torch": "2.13.0"},
    }
    (results / "x.json").write_text(json.dumps(record))
    docs = tmp_path / "benchmarks.md"
    docs.write_text("intro\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nnarrative kept\n")
    monkeypatch.setattr(run_all, "RESULTS", results)
    monkeypatch.setattr(run_all, "DOCS", docs)
    run_all.refresh_docs(["x"], {"x": 12.3})
    text = docs.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("narrative kept\n")
    assert "2026-11-21, CPU, 2 threads, AVX2, torch 2.13.0, 12 s:\n`python bench/x.py`\n\n| a |\n|---|\n| 1 |\n" in text
    docs.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench:x"):
        run_all.refresh_docs(["x"], {"x": 1.0})
    assert docs.read_text() == "no markers\n"  # nothing half-written


def test_save_writes_the_record_only_when_given_a_path(tmp_path, capsys, monkeypatch):
    import common

    monkeypatch.chdir(tmp_path)
    record = common.save(None, "| a |\n|---|\n| 1 |", [{"a": 1}], {"n": 2})
    assert capsys.readouterr().out == "| a |\n|---|\n| 1 |\n" and list(tmp_path.iterdir()) == []
    saved = common.save(tmp_path / "out.json", record["table"], [{"a": 1}], {"n": 2})
    assert json.loads((tmp_path / "out.json").read_text()) == saved
    assert {k: saved[k] for k in ("table", "results", "settings")} == {
        k: record[k] for k in ("table", "results", "settings")
    }
