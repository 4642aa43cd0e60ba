"""The recipes as composed configs, and the numbers nanochat 92d63d4 derives from them (its dev/LOG.md and
scripts/base_train.py): the automatic batch per depth, lr and weight-decay transfer, steps, schedules."""

import math

import pytest
import torch

from nanochat.configs import compose
from nanochat.models.components import GPT, GPTConfig
from nanochat.models.horizon import SHAPE_KEYS, pretrain_plan, resolve_total_batch_size
from nanochat.optim import lr_multiplier, muon_momentum, muon_weight_decay_multiplier
from nanochat.settings import HorizonConfig, ScheduleConfig, TransferConfig

NANOCHAT_SHAPE = ["model.vocab_size=32768", "model.sequence_len=2048"]  # its tokenizer and context


def base_config(depth: int, *extra: str):
    cfg = compose(
        [
            "stage=base",
            "recipe=nanochat2026",
            "arch=nanochat2026",
            "model=d24",
            f"model.depth={depth}",
            *NANOCHAT_SHAPE,
            *extra,
        ]
    )
    resolve_total_batch_size(cfg)
    return cfg


def plan(cfg):
    """(batch, steps, lr scale, Muon weight decay at step 0) as the PretrainModule derives them, on a meta model."""
    from omegaconf import OmegaConf

    m = cfg.module
    shape = {k: m[k] for k in SHAPE_KEYS}
    arch = OmegaConf.to_container(cfg.model.arch)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(m.depth, cfg.model.vocab_size, m.sequence_len, **shape, **arch))
    horizon = OmegaConf.to_object(m.horizon)
    horizon.num_iterations = -1
    steps, lr_scale, wd_scale = pretrain_plan(
        model,
        total_batch_size=cfg.model.total_batch_size,
        horizon=horizon,
        transfer=OmegaConf.to_object(m.transfer),
        reference_shape=dict(vocab_size=cfg.model.vocab_size, sequence_len=m.sequence_len, **shape, **arch),
    )
    return cfg.model.total_batch_size, steps, lr_scale, m.optimizer.muon_weight_decay * wd_scale


@pytest.mark.parametrize(
    "depths,batch", [((4, 6, 8), 2**18), ((10, 12, 16), 2**19), ((18, 20, 24, 26), 2**20), ((32,), 2**21)]
)
def test_auto_batch_depends_on_depth_only(depths, batch):
    for depth in depths:
        assert base_config(depth).model.total_batch_size == batch, depth


@pytest.mark.parametrize(
    "depth,ratio,steps,lr_scale,weight_decay",
    [  # weight decay to the digits given
        (12, 12, 2520, 1.0, "0.28"),
        (20, 12, 4980, 2**0.5, "0.100"),
        (24, 8, 5568, 2**0.5, "0.0597"),  # the GPT-2 speedrun
        (26, 12, 10510, 2**0.5, "0.0475"),
        (32, 12, 9600, 2.0, "0.0368"),
    ],
)
def test_nanochats_derived_numbers(depth, ratio, steps, lr_scale, weight_decay):
    cfg = base_config(depth, f"module.horizon.param_data_ratio={ratio}")
    _, got_steps, got_lr_scale, got_wd = plan(cfg)
    assert got_steps == steps
    assert got_lr_scale == pytest.approx(lr_scale, rel=1e-12)
    assert f"{got_wd:.{len(weight_decay) - 2}f}" == weight_decay


def test_the_gpt2_speedrun_preset():
    pipeline = compose(["experiment=speedrun_gpt2"])
    assert pipeline.core_reference == {"name": "GPT-2", "score": 0.256525}
    assert list(pipeline.pipeline.steps) == ["tokenizer", "base", "base_eval", "sft", "rl"]
    assert pipeline.pipeline.steps.rl is None and pipeline.pipeline.shards == 170
    cfg = compose(["experiment=speedrun_gpt2", "stage=base", *pipeline.pipeline.steps.base.overrides])
    resolve_total_batch_size(cfg)
    assert (cfg.model.depth, cfg.model.vocab_size, cfg.data.name, cfg.trainer.devices) == (24, 32768, "climbmix", 8)
    assert cfg.module.fp8 and cfg.datamodule.packing == "bestfit" and cfg.model.arch.window_pattern == "SSSL"
    batch, steps, _, wd = plan(cfg)
    assert (batch, steps) == (2**20, 5568)
    assert batch // (cfg.model.device_batch_size * cfg.model.sequence_len * 8) == 4  # micro-batches per step
    sft = compose(["experiment=speedrun_gpt2", "stage=sft"])
    assert sft.init_from.endswith("speedrun_d24_gpt2/base") and sft.datamodule.packing == "bestfit"


def test_the_2026_recipe_at_d20():
    pipeline = compose(["experiment=speedrun_d20_2026"])
    assert pipeline.pipeline.steps.mid is None and pipeline.pipeline.steps.sft.stage == "sft"
    cfg = compose(["experiment=speedrun_d20_2026", "stage=base", *pipeline.pipeline.steps.base.overrides])
    resolve_total_batch_size(cfg)
    assert plan(cfg)[:2] == (2**20, 4980) and cfg.module.fp8


def test_the_2025_recipe_is_the_default():
    cfg = compose(["stage=base", "model=d20"])
    o, s, h, t = cfg.module.optimizer, cfg.module.schedule, cfg.module.horizon, cfg.module.transfer
    assert (o.ns_coefficients, o.normuon, o.cautious_weight_decay, o.muon_eq, o.muon_plus) == (
        "quintic",
        False,
        False,
        False,
        False,
    )
    assert (o.embedding_lr, o.unembedding_lr, o.muon_weight_decay, dict(o.role_betas)) == (0.2, 0.004, 0.0, {})
    assert (s.warmup_steps, s.warmdown_ratio, s.final_lr_frac, s.momentum_final) == (-1, 0.2, 0.0, None)
    assert (h.param_data_ratio, h.ratio_params, t.lr, t.weight_decay) == (20, "total", False, False)
    assert cfg.model.total_batch_size == 524288 and cfg.datamodule.packing == "concat"
    assert cfg.model.arch.init == "nanochat2025"
    assert compose(["stage=sft"]).datamodule.packing == "none"
    assert compose(["experiment=speedrun_d20"]).pipeline.steps.mid.stage == "mid"


def test_the_2026_chat_stage():
    cfg = compose(["stage=sft", "recipe=nanochat2026"])
    assert cfg.init_from.endswith("/base")
    assert [dict(e) for e in cfg.datamodule.train] == [
        {"name": "smoltalk", "split": "train"},
        {"name": "mmlu", "split": "auxiliary_train", "epochs": 3},
        {"name": "gsm8k", "split": "train", "epochs": 4},
    ]
    assert cfg.datamodule.packing == "bestfit" and cfg.datamodule.total_batch_size == "auto"
    assert (cfg.module.schedule.init_lr_frac, cfg.module.schedule.warmdown_ratio) == (0.8, 0.5)
    assert cfg.module.optimizer.muon_weight_decay == 0.0 and cfg.module.optimizer.normuon
    for mixture in ("shared", "builtin"):
        assert compose(["stage=sft", "recipe=nanochat2026", f"mixture={mixture}"]).datamodule.train


def test_2026_schedules_follow_nanochat():
    s = compose(["stage=base", "recipe=nanochat2026"]).module.schedule
    from omegaconf import OmegaConf

    s = OmegaConf.to_object(s)
    n = 1000
    warmdown_start = n - round(0.65 * n)
    assert lr_multiplier(0, n, s) == pytest.approx(1 / 40) and lr_multiplier(39, n, s) == 1.0
    assert lr_multiplier(warmdown_start, n, s) == 1.0
    assert lr_multiplier(n, n, s) == pytest.approx(0.05)
    assert lr_multiplier(warmdown_start + 325, n, s) == pytest.approx(0.5 + 0.5 * 0.05)
    assert muon_momentum(0, s, n) == 0.85 and muon_momentum(200, s, n) == pytest.approx(0.91)
    assert muon_momentum(349, s, n) == pytest.approx(0.85 + 0.12 * 349 / 400)  # the ramp wins over the warmdown
    assert muon_momentum(400, s, n) == pytest.approx(0.90 + 0.07 * (1 - 50 / 650))
    assert muon_momentum(n - 1, s, n) == pytest.approx(0.97 - 0.07 * 649 / 650)
    assert [muon_weight_decay_multiplier(k, n, s) for k in (0, 500, n)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert muon_weight_decay_multiplier(500, n, ScheduleConfig()) == 1.0  # 2025: constant
    assert math.isclose(muon_momentum(5000, ScheduleConfig(), 10000), 0.95)


def test_bad_recipe_values_are_one_line_errors():
    from nanochat.errors import UserError

    for make, message in [
        (lambda: HorizonConfig(ratio_params="embeddings"), "horizon.ratio_params='embeddings' is not one of total"),
        (lambda: TransferConfig(reference_batch_size=0), "transfer.reference_batch_size=0 must be positive"),
        (lambda: ScheduleConfig(muon_weight_decay_schedule="linear"), "muon_weight_decay_schedule='linear'"),
    ]:
        with pytest.raises(UserError, match=message) as err:
            make()
        assert "\n" not in str(err.value)
