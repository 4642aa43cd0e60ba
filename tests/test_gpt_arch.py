"""The 2026 architecture switches of the one GPT: each on and off, nanochat's numbers (a reference recorded from its
code), its initialisation, windows, FLOPs, the optimizer groups, the presets, bad input."""

import copy
import json
import math
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from conftest import dtype_of
from nanochat_parity import StubTokenizer, reference_tokens, reference_weights
from omegaconf import OmegaConf

from nanochat.engine.kv_cache import KVCache
from nanochat.errors import UserError
from nanochat.models.components import GPT, GPTConfig, attention
from nanochat.models.components.gpt_config import ARCH_KEYS, INITS
from nanochat.optim import build_optimizer
from nanochat.precision import computing

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((Path(__file__).parent / "data" / "nanochat_reference.json").read_text())
FEATURES = dict(
    window_pattern="SL",
    short_window=6,
    qk_scale=1.2,
    value_embeds=True,
    smear=True,
    backout=True,
    layer_lambdas=True,
    pad_vocab_to=64,
    rope_base=100_000.0,
    init="nanochat2026",
)


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "arch" / f"{name}.yaml"))


def arch_model(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT (3 layers, width 64, GQA, vocab 200) with every feature on and reference weights (non-zero
    output projections, lambdas and gates at working values) so every feature changes the output."""
    config = GPTConfig(
        **{
            **dict(sequence_len=64, vocab_size=200, n_layer=3, n_head=4, n_kv_head=2, n_embd=64),
            **FEATURES,
            **overrides,
        }
    )
    model = GPT(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(reference_weights(shapes, seed))
    return model.eval()


# --- the presets and the 2025 default ------------------------------------------------------------
def test_presets_write_out_every_arch_key_and_2025_is_the_default():
    assert set(preset("nanochat2025")) == set(preset("nanochat2026")) == ARCH_KEYS
    default = {f.name: f.default for f in fields(GPTConfig)}
    assert preset("nanochat2025") == {k: default[k] for k in ARCH_KEYS}
    assert preset("nanochat2026") == dict(
        window_pattern="SSSL",
        short_window=None,
        rope_base=100_000.0,
        softcap=15.0,
        qk_scale=1.2,
        value_embeds=True,
        smear=True,
        backout=True,
        layer_lambdas=True,
        pad_vocab_to=64,
        init="nanochat2026",
    )
    assert set(INITS) == set(GPT.__init__.__globals__["INITIALISERS"])


def test_an_export_config_written_before_the_switches_loads_as_the_2025_model():
    old = dict(
        sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, rope_base=10000.0, softcap=15.0
    )
    config = GPTConfig.from_dict(old)
    assert config == GPTConfig(**old) and config.features() == [] and config.hf_unsupported() == []
    names = {n for n, _ in GPT(config).named_parameters()}
    assert names == {"transformer.wte.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def test_an_export_written_before_the_switches_loads(tiny_tokenizer, tmp_path):
    from nanochat.export import CONFIG_FILE, load_export, save_export

    model = GPT(
        GPTConfig(sequence_len=16, vocab_size=tiny_tokenizer.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    )
    out = save_export(model, tiny_tokenizer, tmp_path / "export")
    written = json.loads((out / CONFIG_FILE).read_text())
    written["model"] = {k: v for k, v in written["model"].items() if k not in ARCH_KEYS - {"rope_base", "softcap"}}
    (out / CONFIG_FILE).write_text(json.dumps(written))  # the config.json of an export made before the switches
    loaded, _, _ = load_export(out)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_summary_and_hf_unsupported_name_the_features():
    config = GPTConfig.from_depth(4, 4000, 512, **preset("nanochat2026"))
    assert config.summary().endswith(
        "; window pattern SSSL (short window 128), rope base 100000, QK scale 1.2, value "
        "embeddings, smear, backout, residual and x0 lambdas, vocab padded to 4,032, "
        "nanochat2026 init"
    )
    assert config.hf_unsupported() == [
        "window pattern SSSL (short window 128)",
        "QK scale 1.2",
        "value embeddings",
        "smear",
        "backout",
        "residual and x0 lambdas",
    ]
    # transformers' NanoChatConfig holds rope_theta; a padded vocabulary exports as its first vocab_size rows
    assert replace(GPTConfig(), rope_base=100_000.0, pad_vocab_to=64, init="nanochat2026").hf_unsupported() == []


# --- nanochat's own numbers, recorded from its code ----------------------------------------------
def reference_model() -> tuple[GPT, dict]:
    shape = {k: v for k, v in REFERENCE["config"].items() if k != "window_pattern"}
    config = GPTConfig(**shape, **preset("nanochat2026"))
    assert config.window_pattern == REFERENCE["config"]["window_pattern"]
    return GPT(config), shape


def test_nanochat2026_init_draws_what_nanochat_draws_under_the_same_seed():
    model, _ = reference_model()
    torch.manual_seed(REFERENCE["seed"])
    model.init_weights()
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == REFERENCE["shapes"]
    for name, (total, squares) in REFERENCE["init"].items():
        assert state[name].double().sum().item() == pytest.approx(total, rel=1e-5, abs=1e-5), name
        assert state[name].double().square().sum().item() == pytest.approx(squares, rel=1e-5, abs=1e-6), name


def test_a_training_runs_gpt_draws_nothing_before_init_weights(tiny_tokenizer_dir):
    """A stage's model is its init_weights() right after the run's seed (nanochat's weights under the same seed, the
    test above): built on meta, no default initialisation consumes the generator first."""
    from nanochat.models.stage_parts import build_gpt

    shape = {k: v for k, v in preset("nanochat2026").items() if k != "window_pattern"}
    torch.manual_seed(7)
    _, model, _ = build_gpt(depth=2, tokenizer_dir=tiny_tokenizer_dir, init_from=None, sequence_len=32, **shape)
    expected = GPT(model.config)
    torch.manual_seed(7)
    expected.init_weights()
    built, wanted = model.state_dict(), expected.state_dict()
    assert built.keys() == wanted.keys() and all(torch.equal(built[k], wanted[k]) for k in wanted)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.1)  # nanochat2026's N(0, 0.8)


def test_a_state_dict_in_nanochats_layout_loads_and_gives_nanochats_logits_loss_and_tokens(precision, tmp_path):
    """The weights go through a file as nanochat's checkpoints hold them (its key names, embeddings in bf16 as on a
    GPU), load with load_state_dict(strict), and the logits, loss and 32 greedy KV-cached tokens are nanochat's:
    fp32 to 1e-5; bf16 (autocast, bf16-stored embeddings) within 1 % of the logit scale (measured 0.051 at a scale
    of 11.5) and the loss within 2e-3 (measured 6e-4); the greedy tokens are equal in both."""
    from nanochat.engine.engine import Engine

    model, shape = reference_model()
    weights = reference_weights({k: tuple(v) for k, v in REFERENCE["shapes"].items()}, REFERENCE["seed"])
    stored = {k: v.bfloat16() if k.startswith(("transformer.wte", "value_embeds")) else v for k, v in weights.items()}
    torch.save(stored, tmp_path / "model_000100.pt")
    model.load_state_dict(torch.load(tmp_path / "model_000100.pt"))
    model.eval()
    if precision == "fp32":  # nanochat's run kept its embeddings in fp32 (CPU); load those exact values
        model.load_state_dict(weights)
    idx = reference_tokens(shape["vocab_size"], 1, shape["sequence_len"] + 1, REFERENCE["seed"])
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    dtype = dtype_of(precision)
    with torch.no_grad(), computing(model, dtype):
        logits = model(x)[0]
        loss = model(x, y).item()
    expected = torch.tensor([REFERENCE["logits_first_16"][str(p)] for p in map(int, REFERENCE["logits_first_16"])])
    got = logits[[int(p) for p in REFERENCE["logits_first_16"]], :16]
    lse = torch.logsumexp(logits, -1)[::8]
    scale = logits.abs().max().item()
    if precision == "fp32":
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse, torch.tensor(REFERENCE["logsumexp_every_8"]), atol=1e-5, rtol=0)
        assert loss == pytest.approx(REFERENCE["loss"], abs=1e-5)
    else:
        assert 0 < (got - expected).abs().max() < 0.01 * scale
        assert loss == pytest.approx(REFERENCE["loss"], abs=2e-3)
    engine = Engine(model, StubTokenizer(), use_tools=False, dtype=dtype)
    prompt = idx[0, : REFERENCE["prompt_len"]].tolist()
    tokens = [
        column[0] for column, _ in engine.generate(prompt, max_tokens=len(REFERENCE["greedy_cached"]), temperature=0)
    ]
    assert tokens == REFERENCE["greedy_cached"] == REFERENCE["greedy_naive"]


# --- initialisation ------------------------------------------------------------------------------
def test_nanochat2026_init_statistics():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(4, 4000, 512, **preset("nanochat2026")))  # width 256, 2 heads of 128
    s = 3**0.5 / 16  # uniform bound of std 1/sqrt(256)
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert wte.shape == head.shape == (4032, 256)
    assert wte.std().item() == pytest.approx(0.8, rel=0.01) and head.std().item() == pytest.approx(0.001, rel=0.01)
    for block in model.transformer.h:
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
            assert w.abs().max() <= s and w.std().item() == pytest.approx(1 / 16, rel=0.02)
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * s
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.4 / 16, rel=0.02)
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    torch.testing.assert_close(model.resid_lambdas.data, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.data, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    gates = [model.smear_gate.weight] + [
        b.attn.ve_gate.weight for b in model.transformer.h if hasattr(b.attn, "ve_gate")
    ]
    assert all(g.min() >= 0 and g.max() <= 0.02 for g in gates)
    assert sorted(model.value_embeds) == ["1", "3"]  # alternate layers, the last included
    for table in model.value_embeds.values():
        assert table.weight.shape == (4032, 256) and table.weight.abs().max() <= s
        assert table.weight.std().item() == pytest.approx(1 / 16, rel=0.01)


def test_nanochat2026_init_starts_near_uniform_and_every_parameter_learns():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, 256, 32, head_dim=64, **FEATURES))
    x = torch.randint(0, 256, (2, 32))
    loss = model(x, x)
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)  # head N(0, 0.001): logits near 0
    optimizer = build_optimizer(model)
    loss.backward()  # zero output projections and smear_lambda = 0: the matrices behind them get no gradient yet
    optimizer.step()
    optimizer.zero_grad()
    model(x, x).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


# --- each feature on and off ---------------------------------------------------------------------
NEUTRAL = {  # the feature's own parameters set so that it computes nothing: the model equals the one without it
    "smear": lambda m: m.smear_lambda.data.zero_(),
    "backout": lambda m: m.backout_lambda.data.zero_(),
    "layer_lambdas": lambda m: (m.resid_lambdas.data.fill_(1.0), m.x0_lambdas.data.zero_()),
    "value_embeds": lambda m: [t.weight.data.zero_() for t in m.value_embeds.values()],
}


@pytest.mark.parametrize("feature", sorted(NEUTRAL))
def test_a_feature_changes_the_output_and_computes_nothing_when_neutral(feature):
    on = arch_model()
    off = GPT(replace(on.config, **{feature: False})).eval()
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k in off.state_dict()})
    assert set(on.state_dict()) > set(off.state_dict())  # its parameters exist only when it is on
    idx = torch.randint(0, 200, (2, 40))
    with torch.no_grad():
        assert (on(idx) - off(idx)).abs().max() > 1e-2
        NEUTRAL[feature](on)
        torch.testing.assert_close(on(idx), off(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key,value", [("qk_scale", 1.0), ("rope_base", 10_000.0), ("window_pattern", "L")])
def test_a_parameter_free_switch_changes_the_output(key, value):
    on = arch_model()
    off = GPT(replace(on.config, **{key: value})).eval()
    off.load_state_dict(on.state_dict())
    idx = torch.randint(0, 200, (2, 40))  # 40 tokens: past the 6-token short window
    with torch.no_grad():
        assert (on(idx) - off(idx)).abs().max() > 1e-2
        short = idx[:, :7]  # every key inside the window: S equals L
        if key == "window_pattern":
            torch.testing.assert_close(on(short), off(short), atol=1e-5, rtol=1e-5)


def test_padded_vocab_pads_the_tables_and_cuts_the_logits_back():
    padded = arch_model()
    assert padded.transformer.wte.weight.shape[0] == padded.lm_head.weight.shape[0] == 256
    assert padded.value_embeds["0"].weight.shape[0] == 256
    plain = GPT(replace(padded.config, pad_vocab_to=1)).eval()
    tables = ("transformer.wte", "lm_head", "value_embeds")
    plain.load_state_dict({k: v[:200] if k.startswith(tables) else v for k, v in padded.state_dict().items()})
    idx = torch.randint(0, 200, (2, 20))
    with torch.no_grad():
        logits = padded(idx)
        assert logits.shape == (2, 20, 200)
        torch.testing.assert_close(logits, plain(idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded(idx, idx), plain(idx, idx), atol=1e-6, rtol=1e-6)
    loss = padded(idx, idx)
    loss.backward()
    assert padded.lm_head.weight.grad[200:].abs().sum() == 0  # the padded rows never score


def test_the_fused_loss_equals_the_plain_loss_with_every_feature(precision):
    model = arch_model()
    idx = torch.randint(0, 200, (2, 40))
    with torch.no_grad(), computing(model, dtype_of(precision)):
        fused = model(idx, idx)
        logits = model(idx)
    plain = torch.nn.functional.cross_entropy(logits.view(-1, 200), idx.view(-1))
    torch.testing.assert_close(fused, plain, atol=1e-5 if precision == "fp32" else 1e-3, rtol=0)


# --- windows -------------------------------------------------------------------------------------
def test_window_sizes_tile_the_pattern_and_keep_the_last_layer_full():
    c = GPTConfig.from_depth(6, 512, 2048, head_dim=64, window_pattern="SSSL")
    assert c.window == 512 and c.window_sizes() == [512, 512, 512, None, 512, None]
    assert GPTConfig.from_depth(4, 512, 512, window_pattern="SSSL").window == 128  # a quarter, rounded up to 128
    assert GPTConfig.from_depth(4, 512, 1000, window_pattern="SL").window == 256  # 250 -> 256
    assert GPTConfig.from_depth(2, 512, 64, window_pattern="SL", short_window=8).window_sizes() == [8, None]


def brute_force(q, k, v, allowed):
    """Attention written out: softmax over the allowed keys of each query (q: B, H, Tq, D; allowed: B, 1, Tq, Tk)."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("window", [None, 0, 3, 9, 30])
def test_attend_sees_exactly_the_window_in_every_case(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    pos = torch.arange(12)
    allowed = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] <= window) if window is not None else True)
    full = brute_force(q, k, v, allowed.expand(2, 1, 12, 12))
    torch.testing.assert_close(attention.attend(q, k, v, window), full, atol=1e-5, rtol=1e-5)  # training, prefill
    torch.testing.assert_close(attention.attend(q[:, :, 5:], k, v, window), full[:, :, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention.attend(q[:, :, -1:], k, v, window), full[:, :, -1:], atol=1e-5, rtol=1e-5)
    # rows at their own positions (the server's batch cache): row 0 at position 11, row 1 at position 6
    positions = torch.tensor([11, 6])
    key_mask = (pos[None, :] <= positions[:, None]).view(2, 1, 1, 12)
    rows_q = torch.stack([q[0, :, 11:12], q[1, :, 6:7]])
    got = attention.attend(rows_q, k, v, window, attention.window_key_mask(key_mask, positions, window))
    torch.testing.assert_close(got, torch.stack([full[0, :, 11:12], full[1, :, 6:7]]), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_flex_attention_path_equals_sdpa_with_a_mask(monkeypatch):
    """The CUDA path (FlexAttention with a block mask) run on the CPU, where it has a forward only: the same logits
    as the SDPA-with-a-mask path, and it really ran for the three windowed layers."""
    from torch.nn.attention.flex_attention import flex_attention

    model = arch_model(sequence_len=256, short_window=None, n_layer=4, window_pattern="SSSL")  # windows of 128
    idx = torch.randint(0, 200, (2, 200))
    with torch.no_grad():
        sdpa = model(idx)
        calls = []
        monkeypatch.setattr(attention, "FLEX_DEVICES", {"cpu"})
        monkeypatch.setattr(attention, "_flex_kernel", lambda *a, **kw: calls.append(kw) or flex_attention(*a, **kw))
        flex = model(idx)
    assert len(calls) == 3 and all(kw["enable_gqa"] for kw in calls)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)
    assert attention.sliding_block_mask(128, 200, torch.device("cpu")) is attention.sliding_block_mask(
        128, 200, torch.device("cpu")
    )  # built once per (window, length)


def test_the_compiled_flex_attention_kernel_equals_sdpa_with_a_mask():
    """The kernel as CUDA runs it, torch.compile'd FlexAttention (inductor's CPU template here; 2-7 s to compile)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 256, 32), torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attention.band_mask(256, 256, 64, "cpu"), enable_gqa=True
    )
    torch.testing.assert_close(attention.flex_windowed(q, k, v, 64), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "depth,seq,vocab,windows,flops,params",
    [  # nanochat's estimate_flops and parameter count
        (4, 512, 4000, "SSSL", 27_820_464, 7_274_578),
        (4, 512, 4000, "L", 31_359_408, 7_274_578),
        (20, 2048, 32768, "SSSL", 2_886_212_784, 896_533_746),
    ],
)
def test_flops_per_token_counts_each_layers_window_as_nanochat_does(depth, seq, vocab, windows, flops, params):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab, seq, **{**preset("nanochat2026"), "window_pattern": windows}))
    assert model.flops_per_token() == flops and model.num_params() == params
    c = model.config
    matmuls = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    keys = sum(min(w or seq, seq) for w in c.window_sizes())  # 3 x 128 + 512 at d4 SSSL: a quarter of the keys
    assert flops == 6 * matmuls + 12 * c.n_head * c.head_dim * keys


def test_flops_per_token_of_the_2025_model_is_unchanged():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(20, 65536, 2048))
    assert model.flops_per_token() == 3_491_758_080


# --- optimizer groups, training ------------------------------------------------------------------
def test_every_parameter_is_in_exactly_one_role_and_one_optimizer_group():
    model = arch_model()
    roles = model.param_roles()
    ids = [id(p) for group in roles.values() for p in group]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert [p.shape for p in roles["smear_backout"]] == [(1, 24), (1,), (1,)]
    assert len(roles["value_embedding"]) == 2 and roles["resid_lambda"] == [model.resid_lambdas]
    optimizer = build_optimizer(model)
    kinds = {id(p): g["kind"] for g in optimizer.param_groups for p in g["params"]}
    assert kinds[id(model.transformer.h[0].attn.ve_gate.weight)] == "muon"  # a block matrix, as nanochat has it
    assert all(
        kinds[id(p)] == "adamw"
        for role in ("value_embedding", "resid_lambda", "x0_lambda", "smear_backout")
        for p in roles[role]
    )
    before = copy.deepcopy(model.state_dict())
    idx = torch.randint(0, 200, (2, 40))
    model.train()
    model(idx, idx).backward()
    optimizer.step()
    assert [n for n, v in model.state_dict().items() if torch.equal(v, before[n])] == []  # every tensor moved
    assert build_optimizer(GPT(GPTConfig.from_depth(2, 128, 16))).param_groups.__len__() == 3  # the 2025 groups


def test_the_2026_preset_trains_through_the_trainer_and_exports(tiny_run, precision):
    from nanochat.configs import compose
    from nanochat.export import load_export
    from nanochat.stages.fit import build

    cfg = compose(
        tiny_run(
            "arch=nanochat2026",
            "model.arch.short_window=4",
            "budget.base_steps=4",
            "budget.eval_every=2",
            "budget.save_every=4",
            f"precision={precision}",
        )
    )
    trainer, module, datamodule, ckpt = build(cfg)
    assert module.config.features()[0] == "window pattern SSSL (short window 4)"
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    assert trainer.global_step == 4
    assert [k for k, v in module.model.state_dict().items() if torch.equal(v, before[k])] == []  # everything trained
    model, _, meta = load_export(cfg.paths.run_dir)
    assert model.config == module.config and meta["step"] == 4
    assert math.isfinite(meta["metrics"]["val/bpb"])
    for k, v in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.float()), k


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(window_pattern="SSXL"), r"window_pattern='SSXL' may hold only the letters S \(short window\) and L"),
        (dict(window_pattern=""), "window_pattern='' may hold only"),
        (
            dict(window_pattern="SL", short_window=64),
            r"short window of 64 tokens, which is not shorter than the context "
            r"sequence_len=64",
        ),
        (
            dict(window_pattern="SL"),
            "short window of 128 tokens, which is not shorter than the context sequence_len=64",
        ),
        (dict(short_window=0), "short_window=0 must be a positive integer or null"),
        (dict(value_embeds=True, n_embd=8, n_head=1, n_kv_head=1), r"value_embeds=true needs n_embd >= 12 \(its gate"),
        (dict(smear=True, n_embd=16, n_head=1, n_kv_head=1), "smear=true needs n_embd >= 24"),
        (dict(init="xavier"), "init='xavier' is not one of nanochat2025, nanochat2026"),
        (dict(qk_scale=0), "qk_scale=0 must be a positive number"),
        (dict(pad_vocab_to=0), "pad_vocab_to=0 must be a positive integer"),
    ],
)
def test_bad_architecture_values_are_one_line_errors(overrides, message):
    base = dict(sequence_len=64, vocab_size=200, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    with pytest.raises(UserError, match=message) as err:
        GPTConfig(**{**base, **overrides})
    assert "\n" not in str(err.value)


def test_a_pattern_whose_only_s_is_the_last_layer_needs_no_short_window():
    config = GPTConfig(sequence_len=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=64, window_pattern="S")
    assert config.window_sizes() == [None]


def test_an_unknown_arch_key_is_one_line_error():
    with pytest.raises(UserError, match=r"model arch has unknown keys \['windows'\]"):
        GPTConfig.from_depth(2, 128, 64, windows="SSSL")


def test_a_bad_arch_value_stops_a_training_run_with_one_line(tiny_run, stage_error):
    from nanochat.configs import compose

    line = stage_error(compose(tiny_run("arch=nanochat2026")))  # seq 16: the 128-token short window does not fit
    assert "short window of 128 tokens, which is not shorter than the context sequence_len=16" in line


# --- the KV caches carry smear's previous embedding ----------------------------------------------
def test_caches_carry_each_rows_previous_embedding():
    from nanochat.engine.kv_cache import RowKVCache

    prefix = KVCache(1, 1, 1, 4, max_len=8, dtype=torch.float32)
    prefix.prev_embedding = torch.tensor([[[1.0, 2.0]]])
    rows = prefix.replicate(3, 10)
    assert torch.equal(rows.prev_embedding, torch.tensor([[[1.0, 2.0]]] * 3))
    rows.prev_embedding[0] += 1  # its own copy
    assert prefix.prev_embedding[0, 0, 0] == 1.0
    rows.reset()
    assert rows.prev_embedding is None
    batch = RowKVCache(1, 1, 4, dtype=torch.float32)
    batch.add(prefix, copies=2)
    other = KVCache(1, 1, 1, 4, max_len=8, dtype=torch.float32)
    other.prev_embedding = torch.tensor([[[5.0, 6.0]]])
    batch.add(other)
    assert batch.prev_embedding[:, 0].tolist() == [[1, 2], [1, 2], [5, 6]]
    batch.remove(0)  # the last row moves into the freed place
    assert batch.prev_embedding[:, 0].tolist() == [[5, 6], [1, 2]]
    batch.remove(1)
    batch.remove(0)
    assert batch.prev_embedding is None


@pytest.mark.slow
def test_the_compiled_gpt_traces_the_flex_attention_path(monkeypatch):
    """compile=true compiles the whole GPT: the FlexAttention path (block mask built inside the graph) traces and
    computes the eager SDPA logits (forward only on a CPU; 20-120 s to compile here)."""
    model = arch_model(sequence_len=256, short_window=None, n_layer=4, window_pattern="SSSL")
    idx = torch.randint(0, 200, (2, 256))
    with torch.no_grad():
        expected = model(idx)
        monkeypatch.setattr(attention, "FLEX_DEVICES", {"cpu"})
        compiled = torch.compile(model, dynamic=False)
        torch.testing.assert_close(compiled(idx), expected, atol=1e-4, rtol=1e-4)
