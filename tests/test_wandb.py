"""logger=wandb: offline without a key, the same metrics as metrics.csv, the config, the report artifact, resume.

What W&B recorded is read back from the offline run's own `.wandb` file, the file `wandb sync` uploads: since
wandb 0.19 offline runs write no wandb-summary.json or config.yaml and the Python reader is gone, so
`wandb_records` parses the log format (LevelDB-style chunks of protobuf `Record`s, unchanged since 2020)
with wandb's own protobuf classes.
"""

import base64
import csv
import hashlib
import json
import logging
import struct
import sys
from collections import Counter
from pathlib import Path

import pytest

from nanochat.configs import compose
from nanochat.loggers import (
    WANDB_MISSING,
    WandbLogger,
    has_wandb_credentials,
    wandb_run_id,
)
from nanochat.stages import run_stage

BLOCK, HEADER = 32 * 1024, b":W&B\xe1\xbe\x00"  # 32 KiB blocks; ident, magic 0xBEE1, version 0
FULL, LAST = 1, 4


@pytest.fixture
def wandb_pb():
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'nanochat[wandb]'")
    from wandb.proto import wandb_internal_pb2

    return wandb_internal_pb2


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No key, no netrc, no WANDB_MODE (conftest sets `disabled`), every W&B directory under tmp_path."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    return tmp_path / "wandb_dir" / "wandb"


def wandb_records(path: Path, pb):
    data = path.read_bytes()
    assert data[:7] == HEADER, f"{path} is not a version-0 W&B log"
    pos, payload = len(HEADER), b""
    while pos + 7 <= len(data):
        length, kind = struct.unpack_from("<HB", data, pos + 4)  # after a 4-byte CRC
        if BLOCK - pos % BLOCK < 7 or kind == 0:  # a block's zero-padded tail
            pos += BLOCK - pos % BLOCK
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def item_name(item) -> str:
    return item.key or ".".join(item.nested_key)


def csv_points(metrics_csv: Path) -> list:
    """[(step, metric, value)] of every value in metrics.csv, in logging order."""
    with open(metrics_csv, newline="") as f:
        return [
            (int(row["step"]), k, float(v)) for row in csv.DictReader(f) for k, v in row.items() if k != "step" and v
        ]


def wandb_points(records) -> list:
    """[(trainer/global_step, metric, value)] of every value in W&B history records but W&B's own `_...`."""
    points = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item_name(i): json.loads(i.value_json) for i in r.history.item}
            step = row.pop("trainer/global_step")
            points += [(step, k, v) for k, v in row.items() if not k.startswith("_")]
    return points


def test_offline_run_logs_metrics_config_report_and_resumes(wandb_pb, no_wandb_login, tiny_run, caplog):
    common = ("logger=wandb", "run=wb", "budget.eval_every=2", "budget.save_every=2")
    with caplog.at_level(logging.INFO, logger="nanochat.loggers"):
        run_stage(compose(tiny_run(*common, "budget.base_steps=2")))
        cfg = compose(tiny_run(*common, "budget.base_steps=4"))  # resume=auto continues from step 2
        run_stage(cfg)
    run_dir = Path(cfg.paths.run_dir)
    run_id = (run_dir / "wandb_id").read_text().strip()

    segments = sorted(no_wandb_login.glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2 and len(list(no_wandb_login.glob("offline-run-*"))) == 2  # one W&B run, two pieces
    announced = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(announced) == 2 and str(segments[0]) in announced[0]
    assert f"wandb sync {no_wandb_login}/offline-run-*-{run_id}" in announced[1]

    records = [list(wandb_records(s / f"run-{run_id}.wandb", wandb_pb)) for s in segments]
    kinds = [[r.WhichOneof("record_type") for r in seg] for seg in records]
    assert all("exit" in k and "artifact" in k for k in kinds), kinds  # finished and flushed; report logged each time
    assert [r.run.run_id for seg in records for r in seg if r.WhichOneof("record_type") == "run"] == [run_id] * 2

    # metrics.csv (both invocations, appended) and W&B history hold the same values of the same metrics at the
    # same steps; multisets, as the resumed piece re-evaluates val/bpb at step 2 and a row's key order differs.
    expected = csv_points(run_dir / "logs" / "metrics.csv")
    got = wandb_points([r for seg in records for r in seg])
    assert Counter(got) == Counter(expected)  # every metric, step and value (perf/*: the same measured floats)
    assert {"train/loss", "val/bpb", "perf/tok_per_s", "train/lr"} <= {n for _, n, _ in got}
    for name in ("train/loss", "val/bpb", "val/loss"):  # each metric's values in order (keys in a row are not)
        assert [(s, v) for s, n, v in got if n == name] == [(s, v) for s, n, v in expected if n == name], name
    assert min(s for s, n, _ in wandb_points(records[1]) if n == "train/loss") > 2  # resumed, not restarted

    config = {}
    for r in records[0]:
        for item in r.run.config.update if r.WhichOneof("record_type") == "run" else r.config.update:
            config[item_name(item)] = json.loads(item.value_json)
    assert config["model"]["depth"] == 2 and config["run"] == "wb" and config["stage"]["name"] == "base"

    artifact = next(r.artifact for r in records[1] if r.WhichOneof("record_type") == "artifact")
    assert (artifact.type, artifact.name) == ("report", "wb-report")
    files = {c.path: c.digest for c in artifact.manifest.contents}
    assert set(files) == {"report.md", "report/base_curves.png"}
    report = run_dir.parent / "report.md"
    assert files["report.md"] == base64.b64encode(hashlib.md5(report.read_bytes()).digest()).decode()


def test_fresh_start_gets_a_new_wandb_run(tmp_path):
    (tmp_path / "wandb_id").write_text("old\n")
    assert wandb_run_id(tmp_path, "auto") != ("old", False)  # no checkpoint: training restarts, so does W&B
    from nanochat.checkpoint import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / "checkpoints" / "last.ckpt")
    assert wandb_run_id(tmp_path, "auto") == ("old", False)
    assert wandb_run_id(tmp_path, "never")[1]


def test_offline_only_without_credentials(wandb_pb, no_wandb_login, tmp_path, monkeypatch):
    assert not has_wandb_credentials()
    assert WandbLogger(run_dir=str(tmp_path))._wandb_init["mode"] == "offline"
    netrc = Path(tmp_path / "home" / ".netrc")
    netrc.parent.mkdir(parents=True, exist_ok=True)
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert has_wandb_credentials() and "mode" not in WandbLogger(run_dir=str(tmp_path))._wandb_init
    netrc.unlink()
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice stands
    assert "mode" not in WandbLogger(run_dir=str(tmp_path))._wandb_init


def test_missing_wandb_is_one_line(tiny_run, stage_error, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    assert stage_error(compose(tiny_run("logger=wandb"))) == f"error: {WANDB_MISSING}"
