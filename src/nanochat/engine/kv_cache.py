"""A pre-allocated key/value cache: one slab per layer, filled left to right as tokens are processed.

The GPT talks to it through three members: `pos` (tokens already cached, the rotary offset of the next
token), `insert_kv(layer_idx, k, v)` (store this step's keys/values and return everything cached so far
for that layer) and `advance(num_tokens)` (called once per forward, after the last layer).
"""

from __future__ import annotations

import torch

from nanochat.errors import UserError


class KVCache:
    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int):
        self.shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.k: torch.Tensor | None = None  # allocated on first insert, in the dtype/device of the keys
        self.v: torch.Tensor | None = None
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> KVCache:
        c = model.config
        return cls(batch_size, c.n_layer, c.n_kv_head, c.head_dim, max_len)

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise UserError(f"KV cache holds {self.max_len} tokens but {end} were requested")
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
        self.k[layer_idx, :, :, self.pos : end] = k
        self.v[layer_idx, :, :, self.pos : end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def replicate(self, batch_size: int, max_len: int) -> KVCache:
        """A cache of `batch_size` rows, each starting with this (one-row) cache's prefix: prefill once, sample many."""
        num_layers, _, num_kv_heads, _, head_dim = self.shape
        new = KVCache(batch_size, num_layers, num_kv_heads, head_dim, max_len)
        if self.pos > max_len:
            raise UserError(f"KV cache holds {max_len} tokens but the prefix already has {self.pos}")
        if self.k is not None:
            new.k = self.k.new_empty(new.shape)
            new.v = self.v.new_empty(new.shape)
            new.k[:, :, :, : self.pos] = self.k[:, :, :, : self.pos]  # broadcasts the one row to all rows
            new.v[:, :, :, : self.pos] = self.v[:, :, :, : self.pos]
        new.pos = self.pos
        return new

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    def reset(self) -> None:
        self.pos = 0
