"""fp8 training: which Linear layers convert (as nanochat: dims multiples of 16, the smaller >= 128), fp8 off with
one log line where the hardware has none, and evaluation on plain Linear layers. The GPU path itself needs an SM 8.9+
GPU with torchao (bench or a lent machine)."""

import logging

import torch
from torch import nn

from nanochat.models import float8
from nanochat.models.components import GPT, GPTConfig


def test_layer_selection_follows_the_fp8_kernels_limits():
    assert float8.takes_fp8(nn.Linear(128, 128)) and float8.takes_fp8(nn.Linear(1536, 6144))
    assert not float8.takes_fp8(nn.Linear(120, 256))  # 120 is no multiple of 16
    assert not float8.takes_fp8(nn.Linear(256, 64))  # smaller dim under 128
    assert not float8.takes_fp8(nn.Linear(12, 2))  # a value-embedding gate
    assert not float8.takes_fp8(nn.Embedding(256, 256))


def test_which_layers_of_the_2026_gpt_convert():
    config = GPTConfig.from_depth(
        4,
        4000,
        512,
        window_pattern="SSSL",
        value_embeds=True,
        smear=True,
        backout=True,
        layer_lambdas=True,
        pad_vocab_to=64,
        init="nanochat2026",
    )
    model = GPT(config)
    chosen = sorted(name for name, m in model.named_modules() if float8.takes_fp8(m, name))
    linears = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    # Every block projection (width 256, head 128) and the 4,032 x 256 head; the gates (12 or 24 channels) stay.
    assert chosen == sorted(n for n in linears if "gate" not in n)
    assert len(chosen) == 4 * 6 + 1 and len(linears) == len(chosen) + 2 + 1  # 2 value-embedding gates, 1 smear gate


def test_fp8_is_off_on_a_cpu_with_one_line(caplog):
    model = GPT(GPTConfig.from_depth(2, 256, 64, head_dim=64))
    before = {n: type(m) for n, m in model.named_modules()}
    with caplog.at_level(logging.INFO, logger="nanochat.models.float8"):
        assert float8.enable(model, torch.device("cpu")) == 0
    assert {n: type(m) for n, m in model.named_modules()} == before
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fp8 off: the device is cpu, and fp8 matmuls need a CUDA GPU; training in the run's precision"]


class Float8Linear(nn.Linear):
    """Stands in for torchao's class (matched by name), whose matmul this CPU cannot run."""

    def forward(self, x):
        raise AssertionError("evaluation must not run the fp8 layer")


def test_evaluation_swaps_fp8_layers_for_plain_ones_on_the_same_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fp8 = Float8Linear(4, 4)
    fp8.weight, fp8.bias = model[1].weight, model[1].bias
    model[1] = fp8
    x = torch.randn(2, 4)
    with float8.plain_linears(model):
        assert type(model[1]) is nn.Linear and model[1].weight is fp8.weight
        out = model(x)
    assert model[1] is fp8
    torch.testing.assert_close(out, nn.functional.linear(model[0](x), fp8.weight, fp8.bias))


def test_pretrain_config_has_fp8_off_by_default_and_on_in_the_gpt2_speedrun():
    from nanochat.configs import compose

    assert compose(["stage=base"]).module.fp8 is False
    steps = compose(["experiment=speedrun_gpt2"]).pipeline.steps
    assert "module.fp8=true" in steps.base.overrides and compose(["stage=base", *steps.base.overrides]).module.fp8
