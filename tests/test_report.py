import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from nanochat import report
from nanochat.errors import UserError


@pytest.fixture
def fixed_header(monkeypatch):
    # Real header() spawns git and imports torch; the tests check rendering, so pin what it returns.
    head = {
        "started": "2026-01-02T03:04:05",
        "system": {
            "platform": "Linux-test",
            "cpu": "Test CPU",
            "cpu_cores": 2,
            "ram_gib": 7.8,
            "gpu_count": 2,
            "gpus": [{"name": "H100", "memory_gib": 79.1}] * 2,
            "python": "3.12.0",
            "torch": "2.9.0",
            "cuda": "12.8",
            "lightning": "2.6.0",
        },
        "git": {"commit": "abc1234", "branch": "main", "dirty": True, "message": "Add report card"},
        "code_size": {"characters": 123456, "lines": 3456, "files": 78, "tokens": 30864},
    }
    monkeypatch.setattr(report, "header", lambda: head)
    return head


@pytest.mark.parametrize(
    "value, text",
    [
        (0.123456, "0.1235"),
        (2.0, "2.0000"),
        (9999, "9999"),
        (10000, "10,000"),
        (560988160, "560,988,160"),
        (True, "True"),
        (False, "False"),
        ("d20", "d20"),
        (-12345, "-12,345"),
    ],
)
def test_format_value(value, text):
    assert report.format_value(value) == text


def test_duration_arithmetic():
    assert report._duration(3661.0 + 60) == "1h02m01s"
    assert report._duration(59.6) == "0h01m00s"


def test_write_section_renders_report_in_pipeline_order(tmp_path, fixed_header):
    run_root = tmp_path / "runs" / "myrun"
    # Written out of order, some twice: the file order must not leak into the report.
    report.write_section(run_root, "sft", {"metrics": {"chat/gsm8k": 0.01}, "wall_time_s": 60})
    report.write_section(run_root, "base-eval", {"metrics": {"core/score": 0.2219}})
    report.write_section(run_root, "zzz-extra", {"items": {"note": "x"}})
    report.write_section(
        run_root,
        "base",
        {
            "items": {"depth": 20, "parameters": 560988160, "lr": 0.02},
            "tables": [{"title": "Schedule", "columns": ["phase", "steps"], "rows": [["warmup", 0], ["decay", 12000]]}],
            "metrics": {"val/bpb": 0.81234567, "core/score": 0.15},
            "plots": ["base/curves.png"],
            "wall_time_s": 3661.0,
            "notes": ["first line", "second line"],
        },
    )
    report.write_section(run_root, "sft-eval", {"metrics": {"chat/gsm8k": 0.045, "chat/arc_easy": 0.3889}})
    out = report.write_section(run_root, "tokenizer", {"timestamp": "2026-01-02T03:05:00", "items": {"vocab": 65536}})

    assert out == run_root / "report.md"
    md = out.read_text()
    assert md.startswith("# nanochat report card\n")
    for line in [
        "- Run: myrun",
        "- Run started: 2026-01-02T03:04:05",
        "- Git: abc1234 on main (dirty): Add report card",
        "- CPU: Test CPU, 2 cores",
        "- RAM: 7.8 GiB",
        "- GPUs: 2 x H100 (79.1 GiB)",
        "- Python 3.12.0, PyTorch 2.9.0, CUDA 12.8, Lightning 2.6.0",
        "- Code size: 123,456 characters, 3456 lines, 78 files, ≈30,864 tokens",
    ]:
        assert line + "\n" in md
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Tokenizer training",
        "## Base model training",
        "## Base model evaluation",
        "## SFT",
        "## SFT evaluation",
        "## Zzz-extra",
        "## Summary",
    ]
    assert "timestamp: 2026-01-02T03:05:00\n" in md and "- vocab: 65,536\n" in md
    assert "- depth: 20\n- parameters: 560,988,160\n- lr: 0.0200\n" in md
    assert "| phase | steps |\n|---|---|\n| warmup | 0 |\n| decay | 12,000 |" in md
    assert "### Final metrics\n\n- val/bpb: 0.8123\n- core/score: 0.1500" in md
    assert "## SFT\n\ntimestamp: " in md and ", wall time: 0h01m00s\n" in md
    assert "![Base model training](base/curves.png)" in md and "first line\nsecond line" in md
    # Every section got a stored timestamp; the header is stored once.
    assert all(
        "timestamp" in json.loads((run_root / "report" / f"{k}.json").read_text())
        for k in ("base", "sft", "base-eval", "sft-eval", "zzz-extra")
    )
    assert json.loads((run_root / "report" / "header.json").read_text())["git"]["commit"] == "abc1234"

    summary = md.split("## Summary\n\n", 1)[1]
    # CORE: base-eval (0.2219) beats base (0.15); GSM8K: sft-eval (0.045) beats sft (0.01); MMLU etc. absent.
    assert summary.startswith(
        "| Metric | BASE | MID | SFT | RL |\n|---|---|---|---|---|\n"
        "| CORE | 0.2219 | - | - | - |\n| ARC-Easy | - | - | 0.3889 | - |\n| GSM8K | - | - | 0.0450 | - |\n\n"
    )
    assert "Total wall clock time: 1h02m01s (base, sft)\n" in summary


def test_rewriting_a_section_replaces_it(tmp_path, fixed_header):
    report.write_section(tmp_path, "base", {"metrics": {"core/score": 0.1}})
    md = report.write_section(tmp_path, "base", {"metrics": {"core/score": 0.3}}).read_text()
    assert md.count("## Base model training") == 1 and "| CORE | 0.3000 | - | - | - |" in md


def test_summary_without_metrics_or_times(tmp_path, fixed_header):
    md = report.write_section(tmp_path, "tokenizer", {"items": {"vocab": 32768}}).read_text()
    assert "## Summary\n\nNo summary metrics were recorded yet.\n" in md
    assert "Total wall clock time: unknown" in md


def test_bad_section_key_is_refused(tmp_path, fixed_header):
    with pytest.raises(UserError, match="not a plain name"):
        report.write_section(tmp_path, "../evil", {})


def test_corrupt_section_names_the_file_and_loses_nothing(tmp_path, fixed_header):
    report.write_section(tmp_path, "base", {"metrics": {"core/score": 0.2}})
    (tmp_path / "report" / "mid.json").write_text("{not json")
    with pytest.raises(UserError) as info:
        report.write_section(tmp_path, "sft", {"metrics": {"chat/gsm8k": 0.05}})
    message = str(info.value)
    assert str(tmp_path / "report" / "mid.json") in message and "\n" not in message
    # The section being written and the earlier one are both still on disk, intact.
    assert json.loads((tmp_path / "report" / "sft.json").read_text())["metrics"] == {"chat/gsm8k": 0.05}
    assert json.loads((tmp_path / "report" / "base.json").read_text())["metrics"] == {"core/score": 0.2}
    (tmp_path / "report" / "mid.json").unlink()
    assert "| GSM8K | - | - | 0.0500 | - |" in report.generate(tmp_path).read_text()


def test_code_size_counts_only_project_sources(tmp_path):
    files = {
        "train.py": "import x\nprint(1)\n",
        "src/nanochat/a.py": "a = 1\n",
        "src/nanochat/sub/b.py": "b\nc\nd",
        "conf/train.yaml": "x: 1\n",
    }
    skipped = {
        "tests/test_a.py": "zzz\n",
        "src/nanochat/__pycache__/a.py": "zzz\n",
        "src/nanochat/tests/t.py": "z\n",
        "src/nanochat.egg-info/x.py": "z\n",
        "conf/notes.md": "z\n",
        "bench/x.py": "z\n",
        "README.md": "z\n",
    }
    for rel, text in {**files, **skipped}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    chars = sum(len(t) for t in files.values())
    assert report.code_size(tmp_path) == {"characters": chars, "lines": 2 + 1 + 3 + 1, "files": 4, "tokens": chars // 4}


def test_git_info_outside_a_repository(tmp_path):
    assert report.git_info(tmp_path) == dict.fromkeys(("commit", "branch", "dirty", "message"), "unknown")
    assert report.git_info(tmp_path / "missing") == dict.fromkeys(("commit", "branch", "dirty", "message"), "unknown")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_info_of_a_repository(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    git("init", "-q", "-b", "trunk")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "First commit\n\nbody text")
    info = report.git_info(tmp_path)
    assert info == {
        "commit": git("rev-parse", "--short", "HEAD"),
        "branch": "trunk",
        "dirty": False,
        "message": "First commit",
    }
    (tmp_path / "a.py").write_text("x = 2\n")
    assert report.git_info(tmp_path)["dirty"] is True


SPARSE_CSV = """perf/mfu,step,train/loss,train/lr,val/bpb,val/loss
,0,,,3.5,8.3
0.4,10,7.3,0.02,,
0.4,20,6.2,0.02,,
,20,,,2.9,6.1
0.4,20,6.0,0.02,,
,20,,,2.5,5.9
0.5,30,5.8,0.02,,
"""


def test_plot_curves_reads_sparse_resumed_csv_and_writes_png(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(SPARSE_CSV)
    # The resumed run re-logged step 20; its values are the ones kept.
    assert report._read_curves(csv_path) == {
        "train/loss": {10: 7.3, 20: 6.0, 30: 5.8},
        "val/bpb": {0: 3.5, 20: 2.5},
        "val/loss": {0: 8.3, 20: 5.9},
        "perf/mfu": {10: 0.4, 20: 0.4, 30: 0.5},
        "train/lr": {10: 0.02, 20: 0.02, 30: 0.02},
    }
    out = report.plot_curves(csv_path, tmp_path / "plots" / "curves.png", "base d4")
    assert out == tmp_path / "plots" / "curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert struct.unpack(">II", data[16:24]) == (1000, 350)  # IHDR width, height: 10 x 3.5 in at 100 dpi
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left behind
    # any logged metrics, one panel each (the RL stage plots reward, length and pass@1)
    three = report.plot_curves(csv_path, tmp_path / "three.png", "rl", ("train/lr", "perf/mfu", "rl/reward"))
    assert struct.unpack(">II", three.read_bytes()[16:24]) == (1500, 350)
    assert report.plot_curves(csv_path, tmp_path / "none.png", "rl", ("rl/reward",)) is None


def test_plot_curves_without_data_writes_nothing(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("perf/mfu,step,train/lr\n0.4,10,0.02\n")
    assert report.plot_curves(csv_path, tmp_path / "a.png", "x") is None  # neither train/loss nor val/bpb
    assert report.plot_curves(tmp_path / "missing.csv", tmp_path / "b.png", "x") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


# --- the training stages and the eval stage write it ---------------------------------------------------
def test_base_run_and_eval_stage_write_the_same_core_numbers_into_the_report(tiny_run, tmp_path):
    import csv as csvmod

    from conftest import write_core_bundle

    from nanochat.configs import compose
    from nanochat.export import load_export
    from nanochat.stages import run_stage

    bundle = write_core_bundle(tmp_path / "bundle")
    cfg = compose(tiny_run("logger=csv", "run=card", f"mixture.core_bundle={bundle}", "budget.core_max_per_task=-1"))
    run_stage(cfg)
    run_dir = Path(cfg.paths.run_dir)
    with open(run_dir / "logs" / "metrics.csv") as f:
        logged = [float(r["core/score"]) for r in csvmod.DictReader(f) if r.get("core/score")]
    _, _, meta = load_export(run_dir)
    assert len(logged) == 1 and meta["metrics"]["core/score"] == pytest.approx(logged[0])  # evaluated before export
    run_stage(compose(["stage=eval", f"ckpt={run_dir}", "eval=core", f"mixture.core_bundle={bundle}", "trainer=cpu"]))
    root = run_dir.parent
    sections = {k: json.loads((root / "report" / f"{k}.json").read_text()) for k in ("base", "base-eval")}
    assert sections["base-eval"]["metrics"]["core/score"] == pytest.approx(logged[0])  # same name, same number
    assert set(sections["base-eval"]["metrics"]) <= set(sections["base"]["metrics"]) | {"val/bpb (min)"}
    items = sections["base"]["items"]
    assert items["optimizer steps"] == 8 and items["tokens trained"] == 8 * 64 and items["parameters"] > 0
    assert {"MFU", "peak memory", "training FLOPs", "wall time", "model"} <= set(items)
    assert (root / sections["base"]["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (root / "report.md").read_text()
    for heading in ("# nanochat report card", "## Base model training", "## Base model evaluation", "## Summary"):
        assert heading in text
    assert f"| CORE | {report.format_value(logged[0])} | - | - | - |" in text
