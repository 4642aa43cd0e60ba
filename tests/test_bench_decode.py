"""bench/decode.py's measuring functions at tiny settings: real figures, consistent with each other and the JSON."""

import json
from argparse import Namespace

import pytest

from nanochat.models.components import GPTConfig


@pytest.fixture(scope="module")
def decode(one_torch_thread):  # tiny ops: on a busy 2-core machine a second intra-op thread makes them ~30x slower
    import decode  # bench/ is on pytest's pythonpath (pyproject.toml)

    return decode


def tiny_config(n_kv_head=None) -> GPTConfig:
    return GPTConfig.from_depth(2, 512, 64, head_dim=32, n_kv_head=n_kv_head)


@pytest.mark.parametrize("n_kv_head", [None, 1])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_kv_bytes_per_token_is_the_formula(decode, n_kv_head, num_samples, precision):
    config = tiny_config(n_kv_head)
    _, engine = decode.build(config, precision)
    kv = decode.kv_bytes_per_token(engine, decode.prompt_of(5), num_samples=num_samples, max_tokens=7)
    name, size = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2)}[precision]
    assert kv["dtype"] == kv["formula_dtype"] == name
    assert kv["bytes_per_token"] == kv["formula"] == 2 * config.n_layer * config.n_kv_head * config.head_dim * size
    assert (kv["rows"], kv["positions"]) == (num_samples, 5 + 7)  # the cache decoding runs in: prompt + new tokens
    assert kv["cache_bytes"] == kv["formula"] * num_samples * 12


def test_generate_timing_counts_every_token_and_splits_prefill_from_decode(decode, precision):
    _, engine = decode.build(tiny_config(), precision)
    run = decode.run_generate(engine, decode.prompt_of(6), num_samples=3, max_tokens=9)
    assert (run["steps"], run["tokens"]) == (9, 27)
    assert 0 < run["ttft_s"] < run["total_s"] and run["decode_s"] == pytest.approx(run["total_s"] - run["ttft_s"])
    assert decode.decode_rate(run, 3) == pytest.approx(3 * 8 / run["decode_s"])
    best = decode.best_generate(engine, decode.prompt_of(6), 1, 5, repeats=2)
    assert (best["steps"], best["tokens"], best["repeats"]) == (5, 5, 2) and best["decode_s"] <= best["total_s"]


def test_naive_estimate_covers_every_stride_th_step(decode):
    model, _ = decode.build(tiny_config())
    full = decode.naive_seconds(model, decode.prompt_of(4), 8)
    sampled = decode.naive_seconds(model, decode.prompt_of(4), 8, stride=4, repeats=1)
    assert full["measured"] == "one full run" and full["seconds"] > 0
    assert sampled["measured"].startswith("2 of 8 steps (every 4th") and sampled["seconds"] > 0


def test_bench_depth_reports_consistent_figures_and_saves_the_table(decode, tmp_path, monkeypatch):
    monkeypatch.setitem(decode.PRESETS, 2, (512, 64))
    monkeypatch.setattr(decode, "preset", lambda depth: tiny_config())
    args = Namespace(
        depths=[2],
        prompt=4,
        new=[6, 10],
        long_new=12,
        naive_stride=4,
        long_prompt=100,
        repeats=2,
        json=tmp_path / "decode.json",
    )
    r = decode.bench_depth(2, args)
    assert r["prefill"]["tokens"] == 64 and r["prefill"]["tok_per_s"] == pytest.approx(64 / r["prefill"]["seconds"])
    assert r["ttft"]["steps"] == 1 and r["ttft"]["ttft_s"] > 0
    assert r["kv"]["bytes_per_token"] == r["kv"]["formula"]
    assert [d["new_tokens"] for d in r["decode"]] == [6, 10, 12]
    for d in r["decode"]:
        assert d["cache"]["tokens"] == d["new_tokens"]  # decoded exactly what was asked for
        assert d["speedup"] == pytest.approx(d["naive"]["seconds"] / d["cache"]["total_s"])
        assert d["cache_tok_per_s"] == pytest.approx(d["new_tokens"] / d["cache"]["total_s"])
    assert r["decode"][-1]["naive"]["measured"].startswith("3 of 12 steps")
    assert r["batch8"]["run"]["tokens"] == 8 * 6
    assert r["samples8"]["speedup"] == pytest.approx(
        8 * r["decode"][0]["cache"]["total_s"] / r["batch8"]["run"]["total_s"]
    )

    table = decode.tables([r])
    record = decode.save(args.json, table, [r], {"depths": [2]})
    saved = json.loads(args.json.read_text())
    assert saved["table"] == table == record["table"] and saved["results"][0]["kv"] == r["kv"]
    assert f"| d2 | fp32 | 12 | {r['decode'][-1]['cache_tok_per_s']:,.0f} |" in table
    assert f"{r['decode'][-1]['speedup']:.1f}x (naive estimated) |" in table
    assert f"{r['kv']['formula']:,} (float32)" in table
