import math

import pytest
import torch
from conftest import dtype_of

from nanochat.engine.kv_cache import KVCache
from nanochat.errors import UserError
from nanochat.models.components import GPT, GPTConfig
from nanochat.optim import build_optimizer


def tiny(vocab=512, seq=64, depth=4, **kw):
    return GPT(GPTConfig.from_depth(depth, vocab_size=vocab, sequence_len=seq, **kw))


@pytest.mark.parametrize(
    "depth,params,flops",
    [(20, 560_988_160, 3_491_758_080), (26, 1_081_999_360, 6_900_940_800), (32, 1_879_048_192, 12_079_595_520)],
)
def test_parameter_counts_and_flops_at_vocab_65536(depth, params, flops):
    with torch.device("meta"):  # no memory: the d32 model would need 7.5 GB in fp32
        model = GPT(GPTConfig.from_depth(depth, vocab_size=65536, sequence_len=2048))
    assert model.num_params() == params
    assert model.flops_per_token() == flops  # nanochat's: 3.492e9, 6.901e9, 1.208e10


@pytest.mark.parametrize("depth,width,heads", [(4, 256, 2), (6, 384, 3), (12, 768, 6), (20, 1280, 10), (26, 1664, 13)])
def test_from_depth_derives_width_and_heads(depth, width, heads):
    c = GPTConfig.from_depth(depth)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.n_layer) == (width, heads, heads, 128, depth)


def test_width_not_divisible_by_heads_is_a_clear_error():
    with pytest.raises(UserError, match=r"n_embd=320 is not divisible by n_head=3"):
        GPTConfig.from_depth(5)  # 320 wide -> ceil(320/128) = 3 heads
    with pytest.raises(UserError, match="multiple of n_kv_head"):
        GPTConfig(n_embd=256, n_head=4, n_kv_head=3)
    with pytest.raises(UserError, match="depth"):
        GPTConfig.from_depth(0)


def test_init_loss_is_ln_vocab_and_backward_is_finite():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randint(0, 512, (2, 64))
    loss = model(x, x)
    # The zero-initialised lm_head makes the first logits uniform: loss is exactly ln(V).
    assert loss.item() == pytest.approx(math.log(512), abs=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_architecture_invariants():
    model = tiny()
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.transformer.wte.weight is not model.lm_head.weight  # untied
    assert model.lm_head.weight.abs().sum() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        assert block.mlp.c_fc.weight.shape == (4 * 256, 256)
    # No norm parameters anywhere: wte + lm_head + 12 d^2 per block is everything.
    assert model.num_params() == 2 * 512 * 256 + 4 * 12 * 256**2
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)
    logits = model(torch.randint(0, 512, (1, 16)))
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15.0 + 1e-4  # softcap


def test_gqa_and_mqa_shapes_and_forward():
    model = tiny(n_kv_head=1)  # MQA: 2 query heads share one key/value head
    attn = model.transformer.h[0].attn
    assert (
        attn.c_q.weight.shape == (256, 256)
        and attn.c_k.weight.shape == (128, 256)
        and attn.c_v.weight.shape == (128, 256)
    )
    loss = model(torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32)))
    assert torch.isfinite(loss)


def test_meta_build_then_materialise_matches_a_direct_build():
    config = GPTConfig.from_depth(4, vocab_size=512, sequence_len=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    direct = GPT(config)
    torch.manual_seed(1)
    direct.init_weights()  # init_weights alone decides every value, whatever the constructors drew
    for (name, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(model.cos, direct.cos)


def _randomised(model):
    torch.manual_seed(3)
    with torch.no_grad():  # non-zero output projections so every layer matters
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("n_kv_head", [None, 1])
def test_kv_cache_decode_equals_full_forward(n_kv_head, precision):
    from nanochat.precision import computing

    dtype = dtype_of(precision)
    model = _randomised(tiny(n_kv_head=n_kv_head)).eval()
    ids = torch.randint(0, 512, (3, 20))
    with torch.no_grad(), computing(model, dtype):
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=3, max_len=20, dtype=dtype)
        parts = [model(ids[:, :8], kv_cache=cache)]  # prefill
        parts.append(model(ids[:, 8:13], kv_cache=cache))  # a chunk after a cached prefix
        parts += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(13, 20)]  # single-token decode
    cached = torch.cat(parts, dim=1)
    assert cache.pos == 20 and cache.k.dtype == dtype
    if precision == "fp32":
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        return
    # prefill, chunk and one-token steps round their bf16 matmuls differently: the cache may cost no more than bf16
    # itself costs against fp32 (measured 0.018-0.023 vs 0.028, logits up to 3.6)
    with torch.no_grad():
        rounding = (full - model(ids)).abs().max()
    assert 0 < (cached - full).abs().max() < 1.5 * rounding


def test_start_pos_shifts_rotary_positions():
    model = _randomised(tiny()).eval()
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        a, b = model(ids), model(ids, start_pos=5)
    assert not torch.allclose(a, b)  # positions matter
    torch.testing.assert_close(a[:, 0], b[:, 0])  # ...except to a lone first token (attends only to itself)
    with pytest.raises(UserError, match="rotary table"):
        model(ids, start_pos=10 * 64)


def test_overfitting_a_fixed_batch_with_muon_adamw():
    torch.manual_seed(0)
    model = tiny(vocab=256, seq=32, depth=2)  # Muon's cost does not shrink with the batch: keep the model small
    optimizer = build_optimizer(model)
    x = torch.randint(0, 256, (4, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(50):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=1e-4)
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_last_only_logits_equal_the_last_row_of_full_logits():
    from nanochat.engine.kv_cache import KVCache

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, sequence_len=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
        cached = model(idx, kv_cache=KVCache.for_model(model, 2, 20, torch.float32), last_only=True)
    assert last.shape == cached.shape == (2, 1, 256)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)  # a one-row matmul rounds differently
    torch.testing.assert_close(cached, last, rtol=1e-5, atol=1e-5)
