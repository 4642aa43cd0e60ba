"""bench/serving.py measures what it claims: a real server, every request counted, sane percentiles, a saved table."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import serving as bench  # noqa: E402  (bench/ is on pytest's pythonpath)

MAX_TOKENS = 5


def test_percentile_interpolates_between_ranks():
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    assert bench.percentile([5.0], 0.95) == 5.0
    assert bench.percentile([1.0, 2.0], 0.95) == pytest.approx(1.95)


def test_bench_counts_every_request_and_token_and_saves_the_table(serving_tokenizer, tmp_path):
    export, model = bench.make_export(tmp_path, depth=1, sequence_len=64, tokenizer=serving_tokenizer)
    assert model["vocab"] == serving_tokenizer.vocab_size and model["params"] > 0
    with bench.running_server(export, threads=1, log_dir=tmp_path) as url:
        levels = bench.measure(url, [1, 2], requests=3, max_tokens=MAX_TOKENS, batched=1, batched_n=2)

    assert [(lv["clients"], lv["n"]) for lv in levels] == [(1, 1), (2, 1), (1, 2)]
    for lv, sent in zip(levels, [3, 3, 1]):
        assert lv["requests"] == len(lv["records"]) == sent
        per_request = MAX_TOKENS * lv["n"]
        for r in lv["records"]:  # the model never ends a reply early: every reply runs to max_tokens
            assert r["tokens"] == per_request and r["finish"] == ["length"] * lv["n"]
            assert 0 < r["ttft_s"] <= r["latency_s"] and r["chunks"] >= 1
        assert lv["tokens"] == sent * per_request
        assert lv["latency_p95_s"] >= lv["latency_p50_s"] > 0
        assert lv["ttft_p95_s"] >= lv["ttft_p50_s"] > 0
        assert lv["requests_per_s"] == pytest.approx(sent / lv["wall_s"])
        assert lv["tokens_per_s"] == pytest.approx(lv["tokens"] / lv["wall_s"])

    table = bench.table(levels)
    record = bench.save(tmp_path / "serving.json", table, levels, {"max_tokens": MAX_TOKENS})
    saved = json.loads((tmp_path / "serving.json").read_text())
    assert saved["table"] == record["table"] == table
    lines = table.splitlines()
    assert lines[0].startswith("| load") and len(lines) == 2 + len(levels)
    assert lines[2].startswith("| 1 client | 3 |") and lines[4].startswith("| reference: 1 request with n=2")
    assert [lv["requests"] for lv in saved["results"]] == [3, 3, 1]
