"""The inference engine: cached decoding equals naive decoding, seeded sampling, the tool-use state machine."""

import pytest
import torch
from conftest import dtype_of
from torch import nn

from nanochat.engine.engine import Engine, generate_naive
from nanochat.engine.kv_cache import KVCache, RowKVCache
from nanochat.models.components import GPTConfig
from nanochat.precision import computing

BF16_TIE = 0.1  # logits this close (~1 % of these models' logit scale) are a tie that bf16 rounding may break


@pytest.mark.parametrize("text", ["def fibonacci(n):", "The"])
def test_kv_cache_decoding_equals_naive_recompute_at_temperature_0(random_model, tiny_tokenizer, precision, text):
    dtype = dtype_of(precision)
    engine = Engine(random_model, tiny_tokenizer, use_tools=False, dtype=dtype)
    prompt = tiny_tokenizer.encode(text, prepend="<|bos|>")
    cached = [column[0] for column, _ in engine.generate(prompt, max_tokens=40, temperature=0)]
    naive = generate_naive(random_model, prompt, max_tokens=len(cached), temperature=0, dtype=dtype)
    assert len(set(cached)) > 3  # a real sequence, not one repeated token
    if dtype == torch.float32:
        assert cached == naive
        return
    # bf16 rounds a matmul differently for each shape (the prefill's rows, a decode step's one row, the naive
    # recompute's growing length; AMX and AVX-512 kernels differ again), so a near-tie may go either way. Every
    # cached token is within BF16_TIE of the best logit a whole-sequence forward gives its prefix, and the two
    # decodings agree exactly up to the first step whose top two logits are that close.
    with computing(random_model, dtype):
        logits = random_model(torch.tensor([prompt + cached]))[0, len(prompt) - 1 : -1]
    gaps = logits.max(-1).values - logits.gather(-1, torch.tensor(cached)[:, None]).squeeze(-1)
    assert gaps.max() <= BF16_TIE
    top2 = logits.topk(2, dim=-1).values
    close = (top2[:, 0] - top2[:, 1] < BF16_TIE).nonzero()
    first_tie = int(close[0]) if len(close) else len(cached)
    assert cached[:first_tie] == naive[:first_tie] and first_tie >= 5


def test_seeded_samples_differ_between_rows_and_repeat_with_the_seed(random_model, tiny_tokenizer, precision):
    engine = Engine(random_model, tiny_tokenizer, use_tools=False, dtype=dtype_of(precision))
    prompt = tiny_tokenizer.encode("The", prepend="<|bos|>")
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=2)
    assert a == b
    assert a != c
    assert len({tuple(row) for row in a}) == 4  # the rows sample independently from the first token on
    assert all(row[: len(prompt)] == prompt for row in a)


def test_top_k_1_is_greedy(random_model, tiny_tokenizer, precision):
    engine = Engine(random_model, tiny_tokenizer, use_tools=False, dtype=dtype_of(precision))
    prompt = tiny_tokenizer.encode("import", prepend="<|bos|>")
    greedy, _ = engine.generate_batch(prompt, max_tokens=10, temperature=0)
    topk1, _ = engine.generate_batch(prompt, max_tokens=10, temperature=1.5, top_k=1, seed=7)
    assert greedy == topk1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replicated_cache_rows_hold_the_prefix(dtype):
    cache = KVCache(1, 2, 3, 4, max_len=5, dtype=dtype)
    k = torch.randn(1, 3, 5, 4, dtype=dtype)
    cache.insert_kv(0, k, k)
    cache.insert_kv(1, k, k)
    cache.advance(5)
    rows = cache.replicate(batch_size=3, max_len=9)
    assert rows.pos == 5 and rows.k.shape == (2, 3, 3, 9, 4) and rows.k.dtype == rows.v.dtype == dtype
    for r in range(3):
        assert torch.equal(rows.k[0, r, :, :5], k[0])


def test_caches_refuse_keys_of_another_dtype():
    """A cache holds its own dtype, not that of the first keys it sees: bf16 keys after fp32 ones are a bug, named."""
    cache = KVCache(1, 1, 2, 4, max_len=8, dtype=torch.float32)
    cache.insert_kv(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    cache.advance(3)
    bf16 = torch.randn(1, 2, 1, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="KV cache holds torch.float32 but layer 0 computed torch.bfloat16 keys"):
        cache.insert_kv(0, bf16, bf16)
    rows = RowKVCache(1, 2, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="a torch.float32 prefill cannot join a torch.bfloat16 batch cache"):
        rows.add(cache)


def test_row_cache_grows_only_the_short_dimension_and_never_past_the_context():
    """The server's batch cache over a long generation: 8 rows decoding 700 tokens keep 8 row slots and fewer than
    twice their length in slots, capped at the context; a row that joins later adds row slots, not length."""
    keys = torch.randn(1, 2, 10, 4)
    prefix = KVCache(1, 1, 2, 4, max_len=10, dtype=torch.float32)
    prefix.insert_kv(0, keys, keys)
    prefix.advance(10)
    cache = RowKVCache(1, 2, 4, dtype=torch.float32, max_length=720)
    cache.add(prefix, copies=8)
    for step in range(700):
        cache.step_inputs()
        new = torch.full((8, 2, 1, 4), float(step))
        cache.insert_kv(0, new, new)
        cache.advance(1)
        end = 10 + step + 1
        assert cache.k.size(1) == 8 and end <= cache.k.size(3) <= min(2 * end, 720), (step, cache.k.shape)
    assert torch.equal(cache.k[0, :, :, :10], keys.expand(8, -1, -1, -1))
    assert torch.equal(cache.v[0, :, :, 10:710, 0], torch.arange(700.0).expand(8, 2, -1))
    cache.add(prefix)
    assert cache.k.size(1) == 16 and cache.k.size(3) == 720 and cache.lengths == [710] * 8 + [10]


class ScriptedModel(nn.Module):
    """Emits a fixed token script, one per forward, whatever the input: drives the tool state machine."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.rotary_len = 640
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script, self.calls, self.seen = script, 0, []

    def forward(self, idx, kv_cache=None, last_only=False):
        self.seen.append(idx[:, -1].tolist())
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        kv_cache.advance(idx.size(1))
        logits = torch.full((idx.size(0), idx.size(1), self.config.vocab_size), -1e9)
        logits[..., token] = 0.0
        return logits


def test_tool_call_gets_the_calculator_output_forced_in(tiny_tokenizer):
    t = tiny_tokenizer.token_id
    expr = tiny_tokenizer.encode("12*(3+4)")
    answer = tiny_tokenizer.encode(" so 84")
    filler = t("<|user_end|>")  # what the model "would" say while the output is forced: must be ignored
    result = tiny_tokenizer.encode("84")
    script = (
        [t("<|python_start|>"), *expr, t("<|python_end|>")]
        + [filler] * (len(result) + 2)
        + answer
        + [t("<|assistant_end|>")]
    )
    model = ScriptedModel(script, tiny_tokenizer.vocab_size)
    engine = Engine(model, tiny_tokenizer)
    steps = list(engine.generate([t("<|bos|>")], max_tokens=100, temperature=0))
    tokens = [c[0] for c, _ in steps]
    masks = [m[0] for _, m in steps]
    forced = [t("<|output_start|>"), *result, t("<|output_end|>")]
    call = [t("<|python_start|>"), *expr, t("<|python_end|>")]
    assert tokens == call + forced + answer + [t("<|assistant_end|>")]
    assert masks == [1] * len(call) + [0] * len(forced) + [1] * (len(answer) + 1)
    # the forced tokens were fed back to the model as its input
    assert [s[0] for s in model.seen[len(call) + 1 : len(call) + 1 + len(forced)]] == forced


def test_refused_expression_forces_nothing_and_batch_masks(tiny_tokenizer):
    t = tiny_tokenizer.token_id
    bad = tiny_tokenizer.encode("__import__('os')")
    script = [t("<|python_start|>"), *bad, t("<|python_end|>"), t("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, tiny_tokenizer.vocab_size), tiny_tokenizer)
    prompt = [t("<|bos|>"), t("<|user_start|>")]
    results, masks = engine.generate_batch(prompt, max_tokens=50)
    assert results[0] == prompt + script[:-1]  # no output block, stop token excluded
    assert masks[0] == [0, 0] + [1] * (len(script) - 1)


def test_prompt_longer_than_the_context_is_refused(random_model, tiny_tokenizer):
    from nanochat.errors import UserError

    engine = Engine(random_model, tiny_tokenizer)
    with pytest.raises(UserError, match="exceeds the context"):
        next(engine.generate([1] * 600, max_tokens=100))
