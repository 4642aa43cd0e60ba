"""The 2026 recipe trains: best-fit SFT rows (BOS-started, BOS-padded, masked, resumable), a few steps of base and
of the one chat stage through the real Trainer, both precisions for base."""

import math
from pathlib import Path

import pytest
import torch
from test_chat_stages import SEQ, base_export, chat_files, chat_overrides  # noqa: F401  (fixtures)

from nanochat.configs import compose
from nanochat.data.conversations import BestFitConversationRows, pack_bestfit_padded
from nanochat.data.stream import Position
from nanochat.export import load_export
from nanochat.stages import run_stage
from nanochat.stages.fit import build
from nanochat.tasks.registry import build_mixture

PAD = 99


def items(lengths):
    """Conversation i of length n: ids [0, i + 1, ...], mask 0 on its first token and 1 after."""
    return iter([(Position(0, i), [0] + [i + 1] * (n - 1), [0] + [1] * (n - 1)) for i, n in enumerate(lengths)])


def test_padded_rows_by_hand():
    # Width 8, buffer 3. Row 1: the 6, then none of 5, 3, 7 fits 2 tokens: padded. Row 2: the 7, then 1 of padding.
    # Row 3: the 5 and the 3. The 4 and the 2 are left for a row the finite input cannot fill: dropped.
    out = list(pack_bestfit_padded(items([5, 3, 6, 7, 4, 2]), rows=1, width=8, pad_id=PAD, buffer_size=3))
    rows = [ids[0].tolist() for ids, _, _, _ in out]
    assert rows == [[0, 3, 3, 3, 3, 3, PAD, PAD], [0, 4, 4, 4, 4, 4, 4, PAD], [0, 1, 1, 1, 1, 0, 2, 2]]
    masks = [m[0].tolist() for _, m, _, _ in out]
    assert masks == [[0, 1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 1, 1]]
    assert out[-1][3]["crop"] == {"padded": 3, "tokens": 3 * 8}  # nothing is ever cropped
    assert out[0][3]["buffer"] == [[0, 0, 0], [0, 1, 0], [0, 3, 0]] and out[0][2] == Position(0, 4)


def test_sft_rows_start_bos_padded_masked_and_resume(tiny_tokenizer, chat_files):  # noqa: F811
    mixture = build_mixture([{"name": "custom_json", "path": str(chat_files / "train.jsonl")}])
    bos = tiny_tokenizer.token_id("<|bos|>")
    width = 3 * SEQ + 1  # two ~50-token conversations and padding, or one cut to fill it
    kwargs = dict(rows=2, seq_len=width - 1, accum=2, buffer_size=5, max_tokens=width)
    stream = BestFitConversationRows(mixture, tiny_tokenizer, **kwargs)
    steps = [item for _, item in zip(range(8), stream)]
    padding = 0
    for item in steps:
        for x, y in item["pairs"]:
            assert x.shape == y.shape == (2, width - 1) and (x[:, 0] == bos).all()
            for row_x, row_y in zip(x, y):
                last = max(j for j in range(width - 1) if row_x[j] != bos)  # conversations end in a non-BOS token
                assert (row_y[last:] == -1).all() or last == width - 2  # padding (and the step onto it) never trains
                padding += width - 2 - last
    assert padding > 0
    # The targets are rendered ids the render mask trains, whatever row they landed in.
    x, y = steps[0]["pairs"][0]
    trained = y[y >= 0].tolist()
    ids_masks = [tiny_tokenizer.render_conversation(mixture[i], width) for i in range(len(mixture))]
    every = {t for ids, mask in ids_masks for t, m in zip(ids[1:], mask[1:]) if m}
    assert set(trained) <= every and trained
    state = steps[3]["state"]
    assert len(state["buffer"]) >= 4 and state["crop"]["padded"] > 0
    resumed = BestFitConversationRows(
        mixture,
        tiny_tokenizer,
        start=Position(**{k: state[k] for k in ("epoch", "round", "doc", "token")}),
        buffer=state["buffer"],
        counts=state["crop"],
        **kwargs,
    )
    for want, got in zip(steps[4:], resumed):
        for (x1, y1), (x2, y2) in zip(want["pairs"], got["pairs"]):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert want["state"]["crop"] == got["state"]["crop"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_base_steps_of_the_2026_recipe(tiny_run, precision):
    cfg = compose(
        tiny_run(
            "recipe=nanochat2026",
            "arch=nanochat2026",
            "model.arch.short_window=4",
            f"precision={precision}",
            "logger=csv",
        )
    )
    trainer, module, datamodule, ckpt = build(cfg)
    assert module.config.value_embeds and datamodule.stream_kwargs["packing"] == "bestfit"
    assert module.lr_scale == pytest.approx((64 / 524288) ** 0.5)
    opt = module.configure_optimizers()
    assert {g["role"] for g in opt.param_groups} >= {"matrix", "value_embedding", "x0_lambda", "smear_backout"}
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    assert trainer.global_step == 8
    assert [k for k, v in module.model.state_dict().items() if torch.equal(v, before[k])] == []
    _, _, meta = load_export(cfg.paths.run_dir)
    assert math.isfinite(meta["metrics"]["val/bpb"])
    text = (Path(cfg.paths.runs_dir) / cfg.run / "report.md").read_text()
    assert "crop share" in text and "transfer" in text and "training time (nanochat's count)" in text
    metrics = (Path(cfg.paths.run_dir) / "logs" / "metrics.csv").read_text()
    assert "data/crop_share" in metrics.splitlines()[0]


def test_the_one_chat_stage_trains_from_base(base_export, chat_files):  # noqa: F811
    overrides = [
        o
        for o in chat_overrides("sft", base_export, chat_files, "recipe=nanochat2026", "logger=csv", "run=chat2026")
        if not o.startswith(("mixture.sft", "module.horizon"))
    ]
    mixture = f"[{{name: custom_json, path: '{chat_files / 'train.jsonl'}', epochs: 2}}]"
    val = f"[{{name: custom_json, path: '{chat_files / 'val.jsonl'}'}}]"
    chat = [f"mixture.chat.train={mixture}", f"mixture.chat.val={val}"]
    cfg = compose(overrides + chat + ["module.horizon.num_iterations=-1"])
    trainer, module, datamodule, _ = build(cfg)
    # 128 conversations best-fit into rows of SEQ + 1 tokens, 4 x SEQ tokens per step: the horizon is measured
    rows = sum(
        1
        for _ in pack_bestfit_padded(
            (
                (
                    Position(0, i),
                    *datamodule.mixtures.tokenizer.render_conversation(datamodule.mixtures.train[i], SEQ + 1),
                )
                for i in range(len(datamodule.mixtures.train))
            ),
            1,
            SEQ + 1,
            0,
            100,
        )
    )
    assert module.num_iterations == math.ceil(rows / 4)  # 2 micro-batches of 2 rows per step
    cfg = compose(overrides + chat + ["module.horizon.num_iterations=4"])
    run_stage(cfg)
    _, _, meta = load_export(cfg.paths.run_dir)
    assert meta["stage"] == "sft" and meta["step"] == 4 and math.isfinite(meta["metrics"]["val/bpb"])
    header = (Path(cfg.paths.run_dir) / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "data/pad_share" in header
