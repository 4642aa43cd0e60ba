"""A pre-allocated key/value cache: one slab per layer, filled left to right as tokens are processed.

The GPT talks to it through four members: `pos` (tokens already cached, the rotary offset of the next
token), `insert_kv(layer_idx, k, v)` (store this step's keys/values and return everything cached so far
for that layer), `advance(num_tokens)` (called once per forward, after the last layer) and `prev_embedding`
(a model with smear keeps each row's last token embedding there, (rows, 1, C), for the next token to mix in).

Both caches hold the dtype they are built with - the engine's compute dtype - and refuse keys of another:
a cache that took the dtype of the first keys it saw once held bf16 prefill keys while later decode steps
computed fp32 queries, which failed deep inside attention.
"""

from __future__ import annotations

import torch

from nanochat.errors import UserError


def check_dtype(cache_dtype: torch.dtype, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dtype != cache_dtype or v.dtype != cache_dtype:
        raise RuntimeError(
            f"KV cache holds {cache_dtype} but layer {layer_idx} computed {k.dtype} keys and {v.dtype} "
            f"values: the model ran outside the engine's compute dtype"
        )


class KVCache:
    def __init__(
        self,
        batch_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.k: torch.Tensor | None = None  # allocated on first insert (a stand-in model may insert nothing)
        self.v: torch.Tensor | None = None
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype: torch.dtype) -> KVCache:
        c = model.config
        return cls(
            batch_size, c.n_layer, c.n_kv_head, c.head_dim, max_len, dtype=dtype, device=next(model.parameters()).device
        )

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise UserError(f"KV cache holds {self.max_len} tokens but {end} were requested")
        check_dtype(self.dtype, layer_idx, k, v)
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.v = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.k[layer_idx, :, :, self.pos : end] = k
        self.v[layer_idx, :, :, self.pos : end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def replicate(self, batch_size: int, max_len: int) -> KVCache:
        """A cache of `batch_size` rows, each starting with this (one-row) cache's prefix: prefill once, sample many."""
        num_layers, _, num_kv_heads, _, head_dim = self.shape
        new = KVCache(batch_size, num_layers, num_kv_heads, head_dim, max_len, dtype=self.dtype, device=self.device)
        if self.pos > max_len:
            raise UserError(f"KV cache holds {max_len} tokens but the prefix already has {self.pos}")
        if self.k is not None:
            new.k = self.k.new_empty(new.shape)
            new.v = self.v.new_empty(new.shape)
            new.k[:, :, :, : self.pos] = self.k[:, :, :, : self.pos]  # broadcasts the one row to all rows
            new.v[:, :, :, : self.pos] = self.v[:, :, :, : self.pos]
        if self.prev_embedding is not None:
            new.prev_embedding = self.prev_embedding.expand(batch_size, -1, -1).clone()
        new.pos = self.pos
        return new

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    def reset(self) -> None:
        self.pos = 0
        self.prev_embedding = None


class RowKVCache:
    """Rows of different lengths decoding together, joining and leaving between steps (the server's batching).

    Row r holds `lengths[r]` tokens; a decode step writes each row's one new key/value at its own length, and
    `step_inputs()` gives the model each row's position and the slots it may attend to. Slots past a row's length
    hold zeros or keys an earlier row left there, never uninitialised memory: a masked slot's weight is exactly 0,
    and 0 times a finite value adds nothing, so a row's result does not depend on its neighbours. Rows stay packed
    in 0..rows-1: `remove` moves the last row into the freed place. Each dimension grows on demand, by doubling
    and only when it is short (the length never past `max_length`, the model's context), and all memory goes when
    the last row leaves.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_length: int | None = None,
    ):
        self.num_layers, self.num_kv_heads, self.head_dim, self.device = num_layers, num_kv_heads, head_dim, device
        self.dtype, self.max_length = dtype, max_length
        self.k: torch.Tensor | None = None  # (layers, row capacity, kv heads, length capacity, head dim)
        self.v: torch.Tensor | None = None
        self.lengths: list[int] = []
        self.positions: torch.Tensor | None = None  # lengths as a tensor on the cache's device (`step_inputs`)
        self.prev_embedding: torch.Tensor | None = None  # (rows, 1, C): each row's last token embedding (smear)

    @classmethod
    def for_model(cls, model, dtype: torch.dtype) -> RowKVCache:
        c = model.config
        return cls(
            c.n_layer,
            c.n_kv_head,
            c.head_dim,
            dtype=dtype,
            device=next(model.parameters()).device,
            max_length=model.rotary_len,
        )

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _reserve(self, rows: int, length: int) -> None:
        cap_rows, cap_len = (0, 0) if self.k is None else (self.k.size(1), self.k.size(3))
        if rows <= cap_rows and length <= cap_len:
            return
        # Only the short dimension grows: doubling the rows at every length doubling too once turned 8 rows of
        # 2,800 tokens into 4,096 rows x 5,632 slots (6 GB for a 1-layer toy) and stalled the server's worker.
        if rows > cap_rows:
            cap_rows = max(rows, 2 * cap_rows)
        if length > cap_len:
            cap_len = max(length, min(2 * cap_len, self.max_length or 2 * cap_len))
        shape = (self.num_layers, cap_rows, self.num_kv_heads, cap_len, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k is not None:
            old_rows, old_len = self.k.size(1), self.k.size(3)
            k[:, :old_rows, :, :old_len] = self.k
            v[:, :old_rows, :, :old_len] = self.v
        self.k, self.v = k, v

    def add(self, prefix: KVCache, copies: int = 1) -> list[int]:
        """Append `copies` rows holding a one-row cache's prefix (a prefilled prompt); returns their row indices."""
        first, n = self.rows, prefix.pos
        if prefix.k is not None:  # None: a stand-in model that caches nothing
            if prefix.dtype != self.dtype:
                raise RuntimeError(f"a {prefix.dtype} prefill cannot join a {self.dtype} batch cache")
            self._reserve(first + copies, n + 1)
            self.k[:, first : first + copies, :, :n] = prefix.k[:, :, :, :n]  # broadcasts the one row
            self.v[:, first : first + copies, :, :n] = prefix.v[:, :, :, :n]
        if prefix.prev_embedding is not None:
            joining = prefix.prev_embedding.expand(copies, -1, -1)
            before = [] if self.prev_embedding is None else [self.prev_embedding]
            self.prev_embedding = torch.cat([*before, joining])
        self.lengths += [n] * copies
        return list(range(first, first + copies))

    def remove(self, row: int) -> None:
        """Free a row: the last row moves into its place (callers mirror that move)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            if self.k is not None:
                self.k[:, row, :, :n] = self.k[:, last, :, :n]
                self.v[:, row, :, :n] = self.v[:, last, :, :n]
            if self.prev_embedding is not None:
                self.prev_embedding[row] = self.prev_embedding[last]
            self.lengths[row] = n
        self.lengths.pop()
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[:last]
        if not self.lengths:
            self.k = self.v = self.prev_embedding = None

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the next decode step: each row's position (rows,) and the slots each row attends to, its new
        token's included (rows, 1, 1, longest + 1): GPT.forward's `positions` and `key_mask`."""
        self.positions = torch.tensor(self.lengths, device=self.device)
        mask = torch.arange(max(self.lengths) + 1, device=self.device) <= self.positions[:, None]
        return self.positions, mask.view(self.rows, 1, 1, -1)

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's one new key/value at its own length (k, v: rows, heads, 1, dim); after `step_inputs`."""
        rows, end = self.rows, max(self.lengths) + 1
        check_dtype(self.dtype, layer_idx, k, v)
        self._reserve(rows, end)
        index = torch.arange(rows, device=k.device)
        self.k[layer_idx, index, :, self.positions] = k[:, :, 0]
        self.v[layer_idx, index, :, self.positions] = v[:, :, 0]
        return self.k[layer_idx, :rows, :, :end], self.v[layer_idx, :rows, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.lengths = [n + num_tokens for n in self.lengths]
