"""bench/data_stream.py and bench/tokenizer_speed.py at tiny sizes, on text the tests write: the figures they report
are the real counts of what the stream and the tokenizer produced, and the result files hold the tables."""

import json
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    """The two scripts as modules (they import `common` from bench/, as `python bench/NAME.py` does)."""
    import data_stream  # bench/ is on pytest's pythonpath (pyproject.toml)
    import tokenizer_speed

    return data_stream, tokenizer_speed


def write_text(folder: Path, docs: list[str], files: int = 2) -> Path:
    """The documents as .txt files, documents separated by blank lines (the .txt reader cuts at them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (folder / f"text_{i}.txt").write_text("\n\n".join(docs[i::files]) + "\n")
    return folder


@pytest.fixture(scope="module")
def stream_setup(bench, tmp_path_factory):
    """Shards and a 512-token tokenizer prepared by the datamodule and the tokenizer stage, for a 4 x 64 stream."""
    data_stream, _ = bench
    tmp = tmp_path_factory.mktemp("stream")
    source = data_stream.write_jsonl(tmp / "text" / "docs.jsonl", data_stream.generated_documents(400_000, seed=1))
    kwargs = data_stream.datamodule_kwargs(
        tmp / "shards",
        tmp / "tokenizer",
        [str(source)],
        ["model.sequence_len=64", "model.device_batch_size=4", "model.total_batch_size=256", "data.shard_chars=150000"],
    )
    manifest = data_stream.prepare_shards(kwargs)
    stats = data_stream.train_tokenizer(tmp / "shards", tmp / "tokenizer", 512, 200_000)
    return kwargs, manifest, stats


def test_stream_tokens_are_the_batches_tokens(bench, stream_setup):
    data_stream, _ = bench
    from nanochat.data.shards import list_shards
    from nanochat.tokenizer import Tokenizer

    kwargs, manifest, stats = stream_setup
    assert manifest["num_shards"] >= 3 and stats["vocab_size"] == 512
    assert (kwargs["sequence_len"], kwargs["device_batch_size"], kwargs["num_workers"]) == (64, 4, 1)  # trainer=8xh100
    seen = []
    r = data_stream.measure_stream(kwargs, 0, warmup=0, max_batches=5, on_batch=seen.append)
    assert r["batches"] == len(seen) == 5 and r["shape"] == [1, 4, 65]
    assert r["tokens"] == sum(b.numel() for b in seen) == 5 * 4 * 65
    assert r["tok_s"] == pytest.approx(r["tokens"] / r["seconds"]) and r["tok_s"] > 0
    # The stream measured is the real one: the first batch is the first shard's documents, BOS + tokens each.
    import pyarrow.parquet as pq

    tok = Tokenizer.load(kwargs["tokenizer_dir"])
    first = pq.read_table(list_shards(kwargs["dir"])[0]).column("text").to_pylist()
    expected = [i for doc in first[:50] for i in tok.encode(doc, prepend="<|bos|>")][: 4 * 65]
    assert seen[0].flatten().tolist() == expected


def test_stream_in_a_loader_worker(bench, stream_setup):
    data_stream, _ = bench
    kwargs, _, _ = stream_setup
    seen = []
    r = data_stream.measure_stream(kwargs, 1, warmup=1, max_batches=3, on_batch=seen.append)
    assert r["num_workers"] == 1 and r["batches"] == 3
    assert r["tokens"] == sum(b.numel() for b in seen) == 3 * 4 * 65
    assert r["cpu_s"] >= 0 and r["cores_busy"] == pytest.approx(r["cpu_s"] / r["seconds"])


def test_gpu_side_and_headroom_are_ratios(bench):
    data_stream, _ = bench
    from nanochat.hardware import GPU_PEAK_BF16

    gpu = data_stream.gpu_tokens_per_s()
    c = {"n_layer": 20, "n_head": 10, "head_dim": 128, "seq": 2048}
    wte = 65536 * 1280
    assert (
        gpu["flops_per_token"] == 6 * (gpu["params"] - wte) + 12 * c["n_layer"] * c["n_head"] * c["head_dim"] * c["seq"]
    )
    assert gpu["peak_bf16"] == dict(GPU_PEAK_BF16)["H100"] == 989e12
    for label, mfu in data_stream.MFUS:
        assert gpu["tok_s"][label] == pytest.approx(989e12 * mfu / gpu["flops_per_token"])
    assert 100_000 < gpu["tok_s"]["50 %"] < gpu["tok_s"]["59 % (nanochat d20)"] < 200_000
    room = data_stream.headroom(500_000.0, gpu)
    assert room == {label: pytest.approx(500_000.0 / v) for label, v in gpu["tok_s"].items()}


def test_profile_counts_and_shares(bench, stream_setup):
    data_stream, _ = bench
    kwargs, _, _ = stream_setup
    p = data_stream.profile_stages(kwargs, docs=40)
    need = 4 * 65
    assert p["documents"] == 40 and p["tokens"] > need
    assert p["packed_tokens"] == p["tokens"] // need * need
    assert p["bytes_per_token"] == pytest.approx(p["bytes"] / p["tokens"])
    stages = p["stages"]
    assert list(stages) == ["parquet read", "tokenize (4 threads)", "tokenize (1 thread)", "pack rows"]
    assert sum(s["share"] for s in stages.values() if s["share"] is not None) == pytest.approx(1.0)
    for s in stages.values():
        assert s["tok_s"] == pytest.approx(p["tokens"] / s["seconds"])


def test_data_stream_script_writes_table_and_json(bench, tmp_path, monkeypatch, capsys):
    data_stream, _ = bench
    folder = write_text(tmp_path / "text", data_stream.generated_documents(300_000, seed=3))
    out = tmp_path / "data_stream.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "bench/data_stream.py",
            "--text",
            str(folder),
            "--workers",
            "0",
            "--seconds",
            "0.2",
            "--warmup",
            "0",
            "--vocab-size",
            "400",
            "--tokenizer-chars",
            "1e5",
            "--profile-docs",
            "16",
            "--json",
            str(out),
        ],
    )
    data_stream.main()
    record = json.loads(out.read_text())
    assert {"command", "date", "machine", "settings", "table", "results"} <= set(record)
    (run,) = record["results"]["runs"]
    assert run["shape"] == [1, 32, 2049] and run["tokens"] == run["batches"] * 32 * 2049
    gpu = record["results"]["gpu"]["tok_s"]
    assert run["headroom"] == {k: pytest.approx(run["tok_s"] / v) for k, v in gpu.items()}
    assert record["settings"]["tokenizer"]["vocab_size"] == 400
    assert record["settings"]["data"].startswith("real text: 2 files")
    assert f"{run['tok_s']:,.0f}" in record["table"] and "tokenize (4 threads)" in record["table"]
    assert record["table"] in capsys.readouterr().out


def test_tokenizer_speed_script_writes_table_and_json(bench, tmp_path, monkeypatch, capsys):
    data_stream, tokenizer_speed = bench
    folder = write_text(tmp_path / "text", data_stream.generated_documents(120_000, seed=4))
    out = tmp_path / "tokenizer_speed.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "bench/tokenizer_speed.py",
            "--text",
            str(folder),
            "--vocab-sizes",
            "300",
            "600",
            "--train-mb",
            "0.08",
            "--encode-mb",
            "0.02",
            "--threads",
            "2",
            "--json",
            str(out),
        ],
    )
    tokenizer_speed.main()
    record = json.loads(out.read_text())
    training, encoding = record["results"]["training"], record["results"]["encoding"]
    assert [t["vocab_size"] for t in training] == [300, 600] and all(t["seconds"] > 0 for t in training)
    assert set(encoding) == {"300", "600"} and all(len(rows) == 5 for rows in encoding.values())
    # A larger vocabulary compresses the same held-out text into fewer tokens.
    assert encoding["600"][0]["tokens"] < encoding["300"][0]["tokens"]
    assert "| 600 | ours: Tokenizer.encode, 1 thread |" in record["table"]
    assert record["table"] in capsys.readouterr().out


def test_tokenizer_speed_measures_real_counts(bench, tmp_path):
    _, tokenizer_speed = bench
    data_stream, _ = bench
    folder = write_text(tmp_path / "text", data_stream.generated_documents(160_000, seed=2))
    docs, label = tokenizer_speed.load_documents(folder, 150_000)
    assert label.startswith("real text") and docs
    train, held = tokenizer_speed.split_text(docs, 100_000, 30_000)
    assert all(len(d) <= tokenizer_speed.DOC_CAP for d in train) and not set(train) & set(held)
    seconds, cpu, tok = tokenizer_speed.time_training(train, 512)
    assert seconds > 0 and cpu >= 0 and tok.vocab_size == 512
    rows = tokenizer_speed.measure_encode(tok, held, threads=2, repeats=2)
    nbytes = sum(len(d.encode("utf-8")) for d in held)
    tokens = sum(len(tok.encode(d)) for d in held)
    assert [r["method"].split(":")[0] for r in rows] == ["ours", "ours", "tiktoken", "tiktoken", "HF tokenizers"]
    for r in rows:
        assert (r["bytes"], r["tokens"]) == (nbytes, tokens) and r["same_ids_as_ours"]
        assert r["MB_s"] == pytest.approx(nbytes / r["seconds"] / 1e6) and r["tok_s"] > 0
        assert r["bytes_per_token"] == pytest.approx(nbytes / tokens) and r["bytes_per_token"] > 1


def test_tokenizer_speed_generated_fallback(bench):
    _, tokenizer_speed = bench
    docs, label = tokenizer_speed.load_documents(None, 50_000)
    assert "GENERATED" in label and sum(map(len, docs)) >= 50_000
