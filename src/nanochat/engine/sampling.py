"""Greedy completion with the KV cache: the quick look at a model that training callbacks and demos print.

The full engine (temperature, top-k, many samples, tool use) builds on the same cache protocol.
"""

from __future__ import annotations

import torch

from nanochat.engine.kv_cache import KVCache


@torch.no_grad()
def greedy_complete(model, tokenizer, prompt: str, max_tokens: int = 16) -> str:
    """Prefill `<|bos|> prompt` once, then decode one token per step, always taking the most likely one."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, prepend="<|bos|>")
    cache = KVCache.for_model(model, batch_size=1, max_len=len(ids) + max_tokens)
    logits = model(torch.tensor([ids], device=device), kv_cache=cache)
    out: list[int] = []
    for _ in range(max_tokens):
        next_id = int(logits[0, -1].argmax())
        out.append(next_id)
        logits = model(torch.tensor([[next_id]], device=device), kv_cache=cache)
    return tokenizer.decode(out)
