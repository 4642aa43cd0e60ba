"""Cached decoding with the 2026 architecture (sliding windows shorter than the prompts, smear, value embeddings):
Engine.generate and the server's BatchDecoder give what recomputing the whole sequence gives, in fp32 and bf16.

fp32: the same tokens. bf16: a cached forward rounds its matmuls differently from a full one (their logits differ
by up to 0.23 here, at a logit scale of 12, and bf16 logits of that size are multiples of 1/16), so two near-tied
tokens may swap and the sequences part (2 of the 5 prompts, measured); each token decoded with the cache must then be
the full forward's best or within BF16_TIE of it (measured up to 0.07)."""

import pytest
import torch
from conftest import dtype_of, random_gpt
from nanochat_parity import StubTokenizer
from test_serving_batching import run_batched

from nanochat.engine.batching import BatchDecoder
from nanochat.engine.engine import Engine, generate_naive
from nanochat.engine.kv_cache import KVCache
from nanochat.precision import computing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = dict(
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
BF16_TIE = 0.25
VOCAB = 600


@pytest.fixture(scope="module")
def model():
    # 3 layers: windows [6, full, full], value embeddings on layers 0 and 2, backout after layer 1
    return random_gpt(VOCAB, 0.5, sequence_len=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, **ARCH)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(VOCAB, (n,), generator=g).tolist() for n in (1, 5, 9, 14, 23)]


def check_against_full_forward(model, prompt: list[int], tokens: list[int], dtype) -> None:
    """Each greedy token is the argmax (fp32) or within BF16_TIE of the max (bf16) of a full forward's logits."""
    with torch.no_grad(), computing(model, dtype):
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
    gap = logits.max(-1).values - logits.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
    assert gap.max() <= (0 if dtype == torch.float32 else BF16_TIE), gap.max()


def test_a_windowed_model_with_smear_sees_past_its_window_only_through_the_full_layers(model):
    assert model.window_sizes == [6, None, None] and sorted(model.value_embeds) == ["0", "2"]


def test_kv_cache_prefill_chunks_and_steps_equal_the_full_forward(model, precision):
    dtype = dtype_of(precision)
    ids = torch.randint(0, VOCAB, (3, 30))
    with torch.no_grad(), computing(model, dtype):
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=3, max_len=30, dtype=dtype)
        parts = [model(ids[:, :9], kv_cache=cache), model(ids[:, 9:14], kv_cache=cache)]  # prefill, a chunk
        parts += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(14, 30)]  # one token at a time
    cached = torch.cat(parts, dim=1)
    assert cache.prev_embedding.shape == (3, 1, 64)
    if precision == "fp32":  # measured 1.7e-5 at a logit scale of 15 (weights N(0, 0.5): a large residual stream)
        torch.testing.assert_close(cached, full, atol=5e-5, rtol=1e-5)
    else:  # no more than what bf16 itself costs against fp32
        with torch.no_grad(), computing(model, torch.float32):
            rounding = (full - model(ids)).abs().max()
        assert 0 < (cached - full).abs().max() < 1.5 * rounding


@pytest.mark.parametrize("num_samples", [1, 3])
def test_engine_generate_equals_naive_recompute_at_temperature_0(model, precision, num_samples):
    dtype = dtype_of(precision)
    engine = Engine(model, StubTokenizer(), use_tools=False, dtype=dtype)
    for prompt in prompts():
        columns = [
            column for column, _ in engine.generate(prompt, num_samples=num_samples, max_tokens=30, temperature=0)
        ]
        rows = [[column[r] for column in columns] for r in range(num_samples)]
        assert all(row == rows[0] for row in rows)  # replicated rows carry the prefix and the previous embedding
        assert len(set(rows[0])) > 5
        if precision == "fp32":
            assert rows[0] == generate_naive(model, prompt, 30, temperature=0, dtype=dtype)
        check_against_full_forward(model, prompt, rows[0], dtype)


def test_batch_decoder_rows_of_different_lengths_decode_as_alone(model, precision):
    """Rows join one per step and one leaves mid-way, so rows move inside the batch cache with their previous
    embeddings; each row's tokens are those it gets alone (fp32) or the full forward's up to a bf16 near-tie."""
    dtype = dtype_of(precision)
    engine = Engine(model, StubTokenizer(), use_tools=False, dtype=dtype)
    reqs = [
        dict(tokens=p, num_samples=1 + i % 2, max_tokens=12 + 5 * i, temperature=0.0, top_k=None, seed=i)
        for i, p in enumerate(prompts())
    ]
    alone = [list(engine.generate(**r)) for r in reqs]
    decoder = BatchDecoder(engine)
    batched = run_batched(decoder, reqs, remove_at={1: 4})
    assert decoder.rows == 0 and decoder.cache.prev_embedding is None
    for i, r in enumerate(reqs):
        tokens = [column[0] for column, _ in batched[i]]
        if precision == "fp32":
            assert batched[i] == alone[i][: len(batched[i])]
        assert len(tokens) == (4 if i == 1 else r["max_tokens"])
        check_against_full_forward(model, r["tokens"], tokens, dtype)
