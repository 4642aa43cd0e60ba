"""GPTConfig: the shape of the one GPT, derived from depth (the one dial) and validated up front."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from nanochat.errors import UserError


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads: < n_head gives GQA, 1 gives MQA
    n_embd: int = 1280
    rope_base: float = 10_000.0
    softcap: float = 15.0

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"model config {name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model width n_embd={self.n_embd} is not divisible by n_head={self.n_head} "
                f"(head size would be {self.n_embd / self.n_head:.2f}); choose a depth whose width 64*depth "
                f"splits evenly into ceil(width/128) heads, or set n_head explicitly"
            )
        if self.head_dim % 2:
            raise UserError(f"head size {self.head_dim} (n_embd/n_head) must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} for GQA")

    def summary(self) -> str:
        """The shape in one line, for logs and the report card."""
        return (f"d{self.n_layer}: width {self.n_embd}, {self.n_head} heads (kv {self.n_kv_head}), "
                f"vocab {self.vocab_size:,}, seq {self.sequence_len}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(
        cls,
        depth: int,
        vocab_size: int = 65536,
        sequence_len: int = 2048,
        *,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        n_kv_head: int | None = None,
    ) -> GPTConfig:
        """nanochat's sizing rule: width = 64*depth, heads = ceil(width/128) (head size 128 when it divides)."""
        if not isinstance(depth, int) or depth < 1:
            raise UserError(f"model depth={depth!r} must be a positive integer")
        width = depth * aspect_ratio
        n_head = max(1, math.ceil(width / head_dim))
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head if n_kv_head is None else n_kv_head,
            n_embd=width,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"model config has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)
