"""bench/nanochat_side_by_side.py without a nanochat checkout: its skip, the tokenizer files it writes for nanochat,
the common evaluator's rows and scores, the log parsing and the decode timing, at tiny sizes."""

import pickle
import subprocess
import sys

import pytest
import torch

from nanochat.eval.bpb import validation_losses
from nanochat.export import save_export

SCRIPT = "bench/nanochat_side_by_side.py"


@pytest.fixture(scope="module")
def sbs():
    import nanochat_side_by_side  # bench/ is on pytest's pythonpath (pyproject.toml)

    return nanochat_side_by_side


def test_without_a_checkout_it_says_why_and_succeeds(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("skipped: no nanochat checkout given"), done.stderr
    done = subprocess.run(
        [sys.executable, SCRIPT, "--nanochat", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "is not a nanochat checkout" in done.stderr


def test_step_rates_read_both_logs(sbs):
    nanochat_log = "\n".join(
        f"step {i:05d}/00012 ({100 * i / 12:.2f}%) | loss: 7.1 | lrm: 1.00 | dt: 812.34ms | tok/sec: {1000 + i:,} | "
        f"bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 1 | total time: 0.01m"
        for i in range(12)
    )
    ours_log = "\n".join(
        f"[2026-12-05 21:45:17,288][nanochat.models.stage_parts][INFO] - step {i:6d}/12 ({100 * i / 12:5.1f}%) | "
        f"loss 7.0 | lrm 1.000 | {2000 + i:,} tok/s | mfu 4.00% | eta 1.0 min"
        for i in range(1, 13)
    )
    theirs = sbs.step_rates(nanochat_log, sbs.NANOCHAT_STEP, 11, one_based=False)
    ours = sbs.step_rates(ours_log, sbs.OUR_STEP, 11, one_based=True)
    assert theirs == {11: 1010.0, 12: 1011.0}  # nanochat counts from 0: its step 10 is the 11th
    assert ours == {11: 2011.0, 12: 2012.0}


def test_losses_read_both_logs_and_ours_smooth_as_nanochat_logs_them(sbs):
    nanochat_log = [
        f"step {i:05d}/00003 ({i}%) | loss: {loss:.6f} | lrm: 1.00 | dt: 1.0ms | tok/sec: 1,000 | x"
        for i, loss in enumerate([10.0, 9.052632, 7.918819])
    ]
    ours_log = [
        f"x - step {i:6d}/3 ( 1.0%) | loss {loss:.4f} | lrm 1.000 | 2,000 tok/s"
        for i, loss in [(1, 10), (2, 8), (3, 5)]
    ]
    assert sbs.step_losses(nanochat_log, sbs.NANOCHAT_LOSS, one_based=False) == [10.0, 9.052632, 7.918819]
    ours = sbs.step_losses(ours_log, sbs.OUR_LOSS, one_based=True)
    assert ours == [10.0, 8.0, 5.0]
    # EMA 0.9 debiased: 1.0/0.1 = 10; (0.9 + 0.8)/0.19 = 8.947368...; (1.53 + 0.5)/0.271 = 7.490775...
    assert sbs.smoothed(ours) == pytest.approx([10.0, 1.7 / 0.19, 2.03 / 0.271])


def test_quiet_rates_leave_out_disturbed_steps(sbs):
    lines = [
        (f"step {i:05d}/00030 (0%) | loss: 7.1 | lrm: 1.00 | dt: 1.0ms | tok/sec: {100 * i:,} | x", others)
        for i, others in zip(range(30), [0.0] * 25 + [0.9] * 5)
    ]
    got = sbs.quiet_rates(lines, sbs.NANOCHAT_STEP, 11, one_based=False, threshold=0.05)
    assert (got["steps"], got["steps_quiet"], got["steps_timed"]) == (20, 15, 15)
    assert got["tok_per_s"] == 1700.0 and got["tok_per_s_all_steps"] == 1950.0  # steps 11-25 vs 11-30 (ids 10-29)
    got = sbs.quiet_rates(lines, sbs.NANOCHAT_STEP, 11, one_based=False, threshold=0.0)  # none quiet: all counted
    assert got["steps_timed"] == 20 and got["tok_per_s"] == got["tok_per_s_all_steps"]


def test_process_tree_ticks_cover_children(sbs):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; t = time.time()\\nwhile time.time() - t < 1.5: pass'])",
        ]
    )
    import time

    time.sleep(1.2)
    ticks = sbs.tree_ticks(proc.pid)
    proc.wait()
    assert ticks >= 0.5 * sbs.CLOCK_TICKS  # the grandchild's busy loop counts


def test_nanochat_tokenizer_files_hold_our_ranks(sbs, tiny_tokenizer, tmp_path):
    sbs.write_nanochat_tokenizer(tiny_tokenizer, tmp_path)
    with open(tmp_path / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    text = "Hello world! <|bos|> 12345 unicode: ünï 字"
    assert enc.encode_ordinary(text) == tiny_tokenizer.encode(text)
    assert enc.encode_single_token("<|bos|>") == tiny_tokenizer.bos_token_id
    assert torch.equal(torch.load(tmp_path / "token_bytes.pt"), tiny_tokenizer.token_bytes())


def test_val_rows_are_bos_prefixed_documents_back_to_back(sbs, tiny_tokenizer):
    docs = ["first document here", "second one", "and a third document to fill the rows"] * 20
    rows = sbs.val_rows(docs, tiny_tokenizer, n_tokens=40, seq_len=16)
    expected = [t for d in docs for t in tiny_tokenizer.encode(d, prepend=tiny_tokenizer.bos_token_id)][: 3 * 17]
    assert rows.shape == (3, 17) and rows.flatten().tolist() == expected
    with pytest.raises(SystemExit, match="val shard holds"):
        sbs.val_rows(docs[:1], tiny_tokenizer, n_tokens=400, seq_len=16)


def test_common_evaluator_equals_our_validation_losses(sbs, random_model, tiny_tokenizer):
    rows = torch.randint(0, tiny_tokenizer.vocab_size, (5, 33))
    scored = sbs.score(random_model, rows, tiny_tokenizer.token_bytes(), batch=2)
    bpb, loss = validation_losses(random_model, [rows[:2], rows[2:4], rows[4:]], tiny_tokenizer.token_bytes())
    assert scored["tokens"] == 5 * 32
    assert scored["bpb"] == pytest.approx(bpb, rel=1e-9) and scored["loss"] == pytest.approx(loss, rel=1e-9)


def test_decode_timing_of_our_engine(sbs, random_model, tiny_tokenizer, tmp_path, one_torch_thread):
    export = save_export(random_model, tiny_tokenizer, tmp_path / "export")
    args = type("Args", (), {"precision": "fp32", "repeats": 2, "new": 6})()
    out = sbs.decode_ours(args, str(export), list(range(10, 30)))
    assert out["prefill_s"] > 0
    for rows in (1, 8):
        run = out[f"batch{rows}"]
        assert 0 < run["ttft_s"] and run["decode_tok_per_s"] > 0 and 1 <= run["steps"] <= 6
        assert len(run["tokens"]) == run["steps"]
    assert out["batch1"]["tokens"] == out["batch8"]["tokens"]  # greedy: every row is the single row's sequence
