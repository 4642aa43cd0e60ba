"""Midtraining and SFT: chat batches, loss masks, horizons, stage chaining and short runs through the real Trainer."""

import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch

from nanochat import report
from nanochat.configs import compose
from nanochat.data.conversations import ConversationRows, PackedConversations, sft_pair
from nanochat.data.stream import Position
from nanochat.errors import UserError
from nanochat.export import load_export, save_export
from nanochat.models.components import GPT, GPTConfig
from nanochat.stages import run_stage
from nanochat.stages.fit import build
from nanochat.tasks.custom_json import CustomJSON
from nanochat.tasks.registry import build_mixture

SEQ = 48


def arithmetic_conversation(rng: random.Random) -> list[dict]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return [
        {"role": "user", "content": f"What is {a} times {b}?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute that. "},
                {"type": "python", "text": f"{a}*{b}"},
                {"type": "python_output", "text": str(a * b)},
                {"type": "text", "text": f" The answer is {a * b}."},
            ],
        },
    ]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps(arithmetic_conversation(rng)) + "\n")
    with open(root / "val.jsonl", "w") as f:
        for _ in range(16):
            f.write(json.dumps(arithmetic_conversation(rng)) + "\n")
    (root / "words.txt").write_text(
        "\n".join(["apple", "banana", "cherry", "kiwi", "melon", "strawberry", "fig"]) + "\n"
    )
    return root


@pytest.fixture(scope="module")
def base_export(tiny_tokenizer, tmp_path_factory):
    """A tiny 'base model' export: depth 2, width 128, context SEQ, the session's tiny tokenizer."""
    torch.manual_seed(0)
    config = GPTConfig.from_depth(2, tiny_tokenizer.vocab_size, SEQ, aspect_ratio=64, head_dim=64)
    model = GPT(config)
    model.init_weights()
    return save_export(model, tiny_tokenizer, tmp_path_factory.mktemp("base") / "export", {"stage": "base", "step": 7})


def chat_overrides(stage: str, init_from, chat_files: Path, *extra: str) -> list[str]:
    mixture = (
        f"[{{name: custom_json, path: '{chat_files / 'train.jsonl'}'}},"
        f"{{name: simple_spelling, size: 16, words_path: '{chat_files / 'words.txt'}'}}]"
    )
    val = f"[{{name: custom_json, path: '{chat_files / 'val.jsonl'}'}}]"
    return [
        f"stage={stage}",
        "model=d4",
        "trainer=cpu",
        "logger=none",
        f"init_from={init_from}",
        "compile=false",
        "model.depth=2",
        f"model.sequence_len={SEQ}",
        "model.device_batch_size=2",
        f"model.total_batch_size={4 * SEQ}",
        "module.horizon.num_iterations=4",
        "budget.eval_every=2",
        "budget.eval_tokens=256",
        "budget.sample_every=0",
        "budget.save_every=2",
        "budget.log_every=1",
        f"mixture.{stage}.train={mixture}",
        f"mixture.{stage}.val={val}",
        f"mixture.eval=[{{name: simple_spelling, split: test, size: 3, words_path: '{chat_files / 'words.txt'}'}}]",
        "callbacks.chat_eval.evaluator.max_new_tokens=8",
        *extra,
    ]


# --- SFT rows and the loss mask ------------------------------------------------------------------
def test_sft_pair_targets_only_trained_tokens_and_pads(tiny_tokenizer):
    convs = [arithmetic_conversation(random.Random(i)) for i in range(3)]
    convs[1][0]["content"] += " Please explain in detail, step by step."  # rows of different lengths
    rendered = [tiny_tokenizer.render_conversation(c) for c in convs]
    pad = tiny_tokenizer.token_id("<|assistant_end|>")
    inputs, targets = sft_pair(rendered, pad)
    longest = max(len(ids) for ids, _ in rendered)
    assert inputs.shape == targets.shape == (3, longest - 1)
    for row, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        assert inputs[row, :n].tolist() == ids[:-1]
        expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert targets[row, :n].tolist() == expected
        assert (inputs[row, n:] == pad).all() and (targets[row, n:] == -1).all()
    # what is trained: the assistant's text, the python call and <|assistant_end|>; not the tool output
    ids, mask = rendered[0]
    trained = tiny_tokenizer.decode([t for t in targets[0].tolist() if t >= 0])
    assert "<|python_start|>" in trained and "<|assistant_end|>" in trained and "The answer is" in trained
    assert "<|output_start|>" not in trained and "What is" not in trained


def test_changing_a_masked_out_token_does_not_change_the_loss(tiny_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tiny_tokenizer.vocab_size, 64, aspect_ratio=64, head_dim=64))
    model.init_weights()
    for p in model.parameters():  # init_weights zeroes the output projections: no token would see another
        torch.nn.init.normal_(p, std=0.05)
    conv = arithmetic_conversation(random.Random(1)) + [{"role": "user", "content": "Thanks! And 7 times 8?"}]
    ids, mask = tiny_tokenizer.render_conversation(conv)
    pad = tiny_tokenizer.token_id("<|assistant_end|>")

    def loss_of(ids_: list[int]) -> float:
        x, y = sft_pair([(ids_, mask)], pad)
        with torch.no_grad():
            return model(x, y).item()

    base = loss_of(ids)
    masked_out = [i for i, m in enumerate(mask) if m == 0]
    trained = [i for i, m in enumerate(mask) if m == 1]
    last_user = masked_out[-3]  # inside the final user turn: only later (untrained) positions can see it
    changed = list(ids)
    changed[last_user] = (changed[last_user] + 1) % 256
    assert loss_of(changed) == base
    tool_output = next(i for i in masked_out if i > trained[0])  # a masked-out target the assistant still reads...
    changed = list(ids)
    changed[tool_output] = (changed[tool_output] + 1) % 256
    assert loss_of(changed) != base  # ...changes later trained predictions, so the test can tell the difference
    changed = list(ids)
    changed[trained[3]] = (changed[trained[3]] + 1) % 256
    assert loss_of(changed) != base


def test_conversation_rows_resume_at_the_next_conversation(tiny_tokenizer, chat_files):
    mixture = build_mixture([{"name": "custom_json", "path": str(chat_files / "train.jsonl")}])
    kwargs = dict(rows=2, accum=3, max_tokens=SEQ + 1)
    items = list(zip(range(4), ConversationRows(mixture, tiny_tokenizer, rank=1, world_size=2, **kwargs)))
    state = items[1][1]["state"]
    assert state["round"] == 12  # two steps x 3 micro-batches x 2 rows of this rank's conversations
    resumed = ConversationRows(
        mixture,
        tiny_tokenizer,
        rank=1,
        world_size=2,
        start=Position(**{k: state[k] for k in ("epoch", "round", "doc", "token")}),
        **kwargs,
    )
    for (_, want), got in zip(items[2:], resumed):
        for (x1, y1), (x2, y2) in zip(want["pairs"], got["pairs"]):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # rank 1 reads conversations 1, 3, 5, ...: the first row is conversation 1, truncated to SEQ + 1 tokens
    ids, mask = tiny_tokenizer.render_conversation(mixture[1], SEQ + 1)
    x, y = items[0][1]["pairs"][0]
    assert x[0, : len(ids) - 1].tolist() == ids[:-1]


def test_packed_conversations_concatenate_rendered_ids_and_resume_mid_conversation(tiny_tokenizer, chat_files):
    mixture = build_mixture([{"name": "custom_json", "path": str(chat_files / "train.jsonl")}])
    stream = PackedConversations(mixture, tiny_tokenizer, rows=2, seq_len=SEQ, max_tokens=2048)
    items = [item for _, item in zip(range(4), stream)]
    flat = [t for item in items for t in item["tokens"].view(-1).tolist()]
    expected = [t for i in range(len(mixture)) for t in tiny_tokenizer.render_conversation(mixture[i])[0]]
    assert flat == expected[: len(flat)]
    state = items[1]["state"]
    assert state["token"] > 0  # the batch boundary fell inside a conversation
    start = Position(**{k: state[k] for k in ("epoch", "round", "doc", "token")})
    resumed = PackedConversations(mixture, tiny_tokenizer, rows=2, seq_len=SEQ, max_tokens=2048, start=start)
    for want, got in zip(items[2:], resumed):
        assert torch.equal(want["tokens"], got["tokens"])


# --- horizon, chaining and bad input --------------------------------------------------------------
def test_horizon_is_one_epoch_of_the_mixture_unless_steps_are_given(base_export, chat_files):
    cfg = compose(
        chat_overrides(
            "sft", base_export, chat_files, "module.horizon.num_iterations=-1", "datamodule.examples_per_step=4"
        )
    )
    trainer, module, datamodule, _ = build(cfg)
    assert len(datamodule.mixtures.train) == 64 + 16
    assert trainer.max_steps == module.num_iterations == 20  # 80 conversations / 4 per step
    cfg = compose(
        chat_overrides("mid", base_export, chat_files, "module.horizon.num_iterations=-1", "module.horizon.epochs=2")
    )
    trainer, module, datamodule, _ = build(cfg)
    m = datamodule.mixtures
    tokens = sum(len(m.tokenizer.render_conversation(c)[0]) for c in m.train)
    assert module.num_iterations == math.ceil(2 * tokens / (4 * SEQ))  # 80 conversations: measured, not sampled


def test_mid_then_sft_through_the_trainer_record_their_parents(base_export, chat_files):
    cfg = compose(chat_overrides("mid", base_export, chat_files, "logger=csv", "run=chain"))
    run_stage(cfg)
    mid_dir = Path(cfg.paths.run_dir)
    model, tok, meta = load_export(mid_dir)
    assert meta["stage"] == "mid" and meta["step"] == 4
    assert meta["parent"]["export"] == str(base_export.resolve()) and meta["parent"]["stage"] == "base"
    assert math.isfinite(meta["metrics"]["val/bpb"]) and math.isfinite(meta["metrics"]["val/loss"])
    base_model, _, _ = load_export(base_export)
    assert any(not torch.equal(v, base_model.state_dict()[k]) for k, v in model.state_dict().items())

    # sft with the default init_from: this run's mid stage
    cfg = compose(
        [o for o in chat_overrides("sft", "x", chat_files, "logger=csv", "run=chain") if not o.startswith("init_from")]
    )
    assert cfg.init_from == str(mid_dir)
    run_stage(cfg)
    sft_dir = Path(cfg.paths.run_dir)
    _, _, meta = load_export(sft_dir)
    assert meta["stage"] == "sft" and meta["parent"]["stage"] == "mid" and "tokens" not in meta
    rows = (sft_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lrm = [float(r.split(",")[header.index("train/lrm")]) for r in rows[1:] if r.split(",")[header.index("train/lrm")]]
    assert lrm == pytest.approx([0.02 * m for m in (1.0, 0.75, 0.5, 0.25)])  # 0.02 x linear decay over 4 steps
    assert (sft_dir / "samples.md").read_text().count("What is 127 * 46?") == 1  # chat samples at the end
    # chat evaluation ran after the last step, before the export recorded its metrics; both stages are in the report
    assert set(meta["metrics"]) >= {"chat/simple_spelling", "chat/chatcore"}
    text = (sft_dir.parent / "report.md").read_text()
    assert "## Midtraining" in text and "## SFT" in text and "### Chat evaluation" in text
    assert (
        f"| ChatCORE | - | {report.format_value(meta['parent']['metrics']['chat/chatcore'])} | "
        f"{report.format_value(meta['metrics']['chat/chatcore'])} | - |" in text
    )


def test_init_from_mismatches_are_refused_with_one_line(base_export, chat_files, tmp_path, stage_error):
    from nanochat.tokenizer import Tokenizer

    line = stage_error(compose(chat_overrides("mid", base_export, chat_files, "model.sequence_len=64")))
    assert str(base_export) in line and f"context of {SEQ}" in line and "model.sequence_len=64" in line
    other = Tokenizer.train(
        ["a completely different corpus of text, tiny and odd " * 50], vocab_size=300, show_progress=False
    )
    other.save(tmp_path / "other_tok")
    line = stage_error(
        compose(chat_overrides("mid", base_export, chat_files, f"module.tokenizer_dir={tmp_path / 'other_tok'}"))
    )
    assert "differs from the tokenizer in" in line and str(tmp_path / "other_tok") in line
    line = stage_error(compose(chat_overrides("sft", tmp_path / "no_run", chat_files)))
    assert "holds no exported model" in line and str(tmp_path / "no_run") in line


def test_unknown_task_in_a_mixture_is_one_line(base_export, chat_files, stage_error):
    cfg = compose(chat_overrides("mid", base_export, chat_files, "mixture.mid.train=[{name: gsm9k}]"))
    line = stage_error(cfg)
    assert "unknown task 'gsm9k'" in line and "gsm8k" in line


def test_optional_entries_without_data_are_skipped_and_said(chat_files, caplog, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    entries = [
        {"name": "smoltalk", "split": "train", "optional": True},
        {"name": "custom_json", "path": str(chat_files / "val.jsonl")},
    ]
    with caplog.at_level(logging.WARNING):
        mixture = build_mixture(entries)
    assert len(mixture) == 16 and any("skipping optional task 'smoltalk'" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="HuggingFaceTB/smol-smoltalk"):
        build_mixture(entries[:1] + [{"name": "smoltalk", "split": "train"}])
    bad = chat_files / "bad.jsonl"
    bad.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]\n{oops\n')
    with pytest.raises(UserError, match=f"{bad} line 2"):  # bad data is an error even in an optional entry
        build_mixture([{"name": "custom_json", "path": str(bad), "optional": True}])
    assert isinstance(CustomJSON(chat_files / "val.jsonl")[0]["messages"], list)


def test_offline_mixtures_switch_the_hub_libraries_to_their_cache(monkeypatch):
    import datasets
    import huggingface_hub

    from nanochat.tasks.sources import hub_offline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    hub_offline()
    assert (
        huggingface_hub.constants.HF_HUB_OFFLINE
        and datasets.config.HF_HUB_OFFLINE
        and datasets.config.HF_DATASETS_OFFLINE
    )
    assert compose(["stage=mid", "mixture=shared"]).datamodule.offline is True
    assert compose(["stage=sft"]).datamodule.offline is False
