"""The one GPT: shared by every training stage, evaluation and the inference engine.

Seed-era nanochat architecture: rotary embeddings (base 10,000), QK-norm, ReLU^2 MLP (4x), RMSNorm
without parameters, untied embeddings, logit softcap 15, no biases, zero-initialised output projections,
n_kv_head for GQA/MQA, causal scaled-dot-product attention.

Inference hooks: `forward` accepts a KV cache (see `nanochat.engine.kv_cache.KVCache` for the protocol:
`pos`, `insert_kv(layer_idx, k, v)`, `advance(num_tokens)`) and a position offset (`start_pos`, by
default the cache's position), so a prompt can be prefilled once and then decoded one token at a time.
For batched decoding of rows of different lengths (the server's continuous batching), `positions` gives each
row's position for its one new token and `key_mask` (B, 1, 1, Tk) the cache slots each row may attend to.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.errors import UserError
from nanochat.models.components.gpt_config import GPTConfig
from nanochat.models.components.head_loss import softcap_cross_entropy


class KVCacheLike(Protocol):
    pos: int

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, num_tokens: int) -> None: ...


def norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free RMSNorm: nothing to learn, nothing to weight-decay, nothing to shard.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (x: B, T, H, D; cos/sin: 1, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache: KVCacheLike | None, key_mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        # In v's dtype, the compute dtype: CUDA's autocast runs rms_norm in fp32 (CPU's in bf16), and a KV cache
        # or attention given fp32 keys beside bf16 values fails.
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if key_mask is not None:  # rows of different lengths: each attends to its own filled cache slots
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=gqa)
        elif Tq == Tk:  # training, or prefill into an empty cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:  # one decode step attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a cached prefix: all of the prefix, causal within the chunk
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache, key_mask=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, key_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 10x the training context so generation can run past it.
        self.rotary_len = 10 * config.sequence_len
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every weight; call after `to_empty(device=...)` on a model built on `meta`."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = fan_in**-0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
        # Zero output projections: every block starts as the identity and the first logits are uniform.
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        self.cos, self.sin = self._rotary_tables(self.lm_head.weight.device)

    def _rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)[None, :, None, :]  # (1, T, 1, D/2)
        return freqs.cos(), freqs.sin()

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter by the role that decides its optimizer: block matrices, input embedding, output head."""
        return {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": [self.transformer.wte.weight],
            "unembedding": [self.lm_head.weight],
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 per non-embedding weight plus attention scores.

        The embedding lookup is not a matmul, so wte is excluded; the lm_head is counted.
        """
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
        start_pos: int | None = None,
        loss_reduction: str = "mean",
        last_only: bool = False,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or the cross-entropy loss when `targets` is given (-1 = ignore).

        With targets, the head, softcap and loss run as one fused op (`head_loss.py`) that reads
        `lm_head.weight` directly, so forward hooks on `lm_head` fire for logits only.
        `last_only`: logits of the last position only, (B, 1, vocab) - all a prefill samples from, and the
        head's matmul over a long prompt is a third of its cost.
        `positions` (B,) and `key_mask` (B, 1, 1, Tk), together and only for one token per row (T = 1): row b's
        token sits at position positions[b] and attends to the cache slots where key_mask[b] is True.
        """
        B, T = idx.shape
        if positions is not None:  # rows at different positions: each row's own rotary angles
            cos_sin = self.cos[0, positions].unsqueeze(1), self.sin[0, positions].unsqueeze(1)  # (B, 1, 1, D/2)
        else:
            if start_pos is None:
                start_pos = kv_cache.pos if kv_cache is not None else 0
            if start_pos + T > self.rotary_len:
                raise UserError(
                    f"sequence of {start_pos + T} positions exceeds the model's rotary table of {self.rotary_len} "
                    f"(10 x sequence_len={self.config.sequence_len})"
                )
            cos_sin = self.cos[:, start_pos : start_pos + T], self.sin[:, start_pos : start_pos + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, key_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        cap = self.config.softcap
        if targets is not None:  # compiled or not: no (N, vocab) logits or their gradient are ever held
            return softcap_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight, targets.view(-1), cap, loss_reduction)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x).float()
        logits = cap * torch.tanh(logits / cap)
        return logits
