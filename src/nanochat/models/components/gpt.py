"""The one GPT: shared by every training stage, evaluation and the inference engine.

By default nanochat's October-2025 architecture: rotary embeddings (base 10,000), QK-norm, ReLU^2 MLP (4x),
RMSNorm without parameters, untied embeddings, logit softcap 15, no biases, zero-initialised output projections,
n_kv_head for GQA/MQA, causal scaled-dot-product attention. GPTConfig's architecture switches add nanochat's 2026
features (docs/model.md): sliding windows, value embeddings, smear, backout, per-layer lambdas, a QK scale, a padded
vocabulary and its initialisation; parameter names are nanochat's, so its state dicts load as they are.

Inference hooks: `forward` accepts a KV cache (see `nanochat.engine.kv_cache.KVCache` for the protocol:
`pos`, `insert_kv(layer_idx, k, v)`, `advance(num_tokens)`) and a position offset (`start_pos`, by
default the cache's position), so a prompt can be prefilled once and then decoded one token at a time.
For batched decoding of rows of different lengths (the server's continuous batching), `positions` gives each
row's position for its one new token and `key_mask` (B, 1, 1, Tk) the cache slots each row may attend to.
With smear, the cache also keeps each row's last token embedding (`prev_embedding`, (B, 1, C) or None).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.errors import UserError
from nanochat.models.components.attention import attend, window_key_mask
from nanochat.models.components.gpt_config import SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS, GPTConfig
from nanochat.models.components.head_loss import softcap_cross_entropy


class KVCacheLike(Protocol):
    pos: int
    prev_embedding: torch.Tensor | None

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
        self.qk_scale = config.qk_scale
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if layer_idx in config.value_embed_layers():  # per kv head, how much of the value embedding joins v
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, ve, cos_sin, window, kv_cache: KVCacheLike | None, key_mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        # In v's dtype, the compute dtype: CUDA's autocast runs rms_norm in fp32 (CPU's in bf16), and a KV cache
        # or attention given fp32 keys beside bf16 values fails.
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = attend(q, k, v, window, key_mask)
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

    def forward(self, x, ve, cos_sin, window, kv_cache, key_mask=None):
        x = x + self.attn(norm(x), ve, cos_sin, window, kv_cache, key_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab, n_layer = config.padded_vocab_size, config.n_layer
        self.window_sizes = config.window_sizes()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, config.n_embd),
                "h": nn.ModuleList(Block(config, i) for i in range(n_layer)),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        if config.layer_lambdas:  # before block i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
            self.resid_lambdas = nn.Parameter(torch.ones(n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.ve_layers = set(config.value_embed_layers())
        if self.ve_layers:
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in sorted(self.ve_layers)})
        # Rotary tables cover 10x the training context so generation can run past it.
        self.rotary_len = 10 * config.sequence_len
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.init_weights()

    @classmethod
    def initialised(cls, config: GPTConfig, device: str | torch.device = "cpu") -> GPT:
        """A GPT whose weights are `init_weights`' draws alone: built on meta, so no module's default initialisation
        uses the generator first. After `torch.manual_seed(s)` these are the weights nanochat draws under seed s."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every weight; call after `to_empty(device=...)` on a model built on `meta`.

        `config.init` decides the embedding, head and block matrices; the 2026 features' own parameters always
        start as nanochat initialises them (drawn after the rest, in its order)."""
        INITIALISERS[self.config.init](self)
        c, s = self.config, 3**0.5 * self.config.n_embd**-0.5
        steps = [i / max(c.n_layer - 1, 1) for i in range(c.n_layer)]
        if c.layer_lambdas:  # a stronger residual and more of the embedding in early layers
            self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * f for f in steps]))
            self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * f for f in steps]))
        if c.backout:
            self.backout_lambda.fill_(0.2)
        if c.smear:
            self.smear_lambda.zero_()
            self.smear_gate.weight.uniform_(0.0, 0.02)
        for table in getattr(self, "value_embeds", {}).values():
            table.weight.uniform_(-s, s)  # as c_v's nanochat2026 init
        for block in self.transformer.h:
            if hasattr(block.attn, "ve_gate"):
                block.attn.ve_gate.weight.uniform_(0.0, 0.02)  # gates start slightly above neutral
        self.cos, self.sin = self._rotary_tables(self.lm_head.weight.device)

    def _rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)[None, :, None, :]  # (1, T, 1, D/2)
        return freqs.cos(), freqs.sin()

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter by the role that decides its optimizer: block matrices (value-embedding gates
        included), input embedding, output head, value embeddings, and the per-layer and smear/backout scalars."""
        return {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": [self.transformer.wte.weight],
            "unembedding": [self.lm_head.weight],
            "value_embedding": list(self.value_embeds.parameters()) if self.ve_layers else [],
            "resid_lambda": [self.resid_lambdas] if self.config.layer_lambdas else [],
            "x0_lambda": [self.x0_lambdas] if self.config.layer_lambdas else [],
            "smear_backout": ([self.smear_gate.weight, self.smear_lambda] if self.config.smear else [])
            + ([self.backout_lambda] if self.config.backout else []),
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention scores.

        Matmul weights are every nn.Linear's (lm_head included); embedding lookups and scalars are not matmuls.
        A windowed layer scores min(window, sequence_len) keys per query, a full one sequence_len.
        """
        c = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        keys = sum(min(c.sequence_len if w is None else w, c.sequence_len) for w in self.window_sizes)
        return 6 * matmul_params + 12 * c.n_head * c.head_dim * keys

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
        c = self.config
        if positions is not None:  # rows at different positions: each row's own rotary angles
            cos_sin = self.cos[0, positions].unsqueeze(1), self.sin[0, positions].unsqueeze(1)  # (B, 1, 1, D/2)
        else:
            if start_pos is None:
                start_pos = kv_cache.pos if kv_cache is not None else 0
            if start_pos + T > self.rotary_len:
                raise UserError(
                    f"sequence of {start_pos + T} positions exceeds the model's rotary table of {self.rotary_len} "
                    f"(10 x sequence_len={c.sequence_len})"
                )
            cos_sin = self.cos[:, start_pos : start_pos + T], self.sin[:, start_pos : start_pos + T]
        key_masks = {}  # per window: the slots each row sees
        if key_mask is not None:
            key_masks = {w: window_key_mask(key_mask, positions, w) for w in set(self.window_sizes)}
        x = norm(self.transformer.wte(idx))
        if c.smear:
            x = self._smear(x, kv_cache)
        x0, x_backout = x, None
        backout_layer = c.n_layer // 2 if c.backout else None
        for i, block in enumerate(self.transformer.h):
            if c.layer_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if i in self.ve_layers else None
            window = self.window_sizes[i]
            x = block(x, ve, cos_sin, window, kv_cache, key_masks.get(window))
            if i == backout_layer:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)
        if x_backout is not None:  # the middle layer's low-level features, taken out before the head
            x = x - self.backout_lambda * x_backout
        x = norm(x)
        cap, vocab = c.softcap, c.vocab_size
        if targets is not None:  # compiled or not: no (N, vocab) logits or their gradient are ever held
            head = self.lm_head.weight[:vocab]  # the padded rows never score
            return softcap_cross_entropy(x.view(-1, x.size(-1)), head, targets.view(-1), cap, loss_reduction)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if c.padded_vocab_size != vocab:
            logits = logits[..., :vocab]
        logits = logits.float()
        logits = cap * torch.tanh(logits / cap)
        return logits

    def _smear(self, x: torch.Tensor, kv_cache: KVCacheLike | None) -> torch.Tensor:
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_(t-1) over the normalised embeddings; the first
        token of a sequence has no previous one, and a cache carries the last embedding into the next forward."""
        prev = kv_cache.prev_embedding if kv_cache is not None else None
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:].clone()  # a copy: a view would keep the whole prompt's embeddings
        if prev is None:
            if x.size(1) == 1:
                return x
            first, x, prev = x[:, :1], x[:, 1:], x[:, :-1]
        else:
            first, prev = None, torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
        x = x + gate * prev
        return x if first is None else torch.cat([first, x], dim=1)


def _init_nanochat2025(model: GPT) -> None:
    """Every matrix N(0, std) with std = fan_in^-0.5 * min(1, sqrt(fan_out/fan_in)), embeddings N(0, 1), and zero
    output projections: every block starts as the identity and the first logits are uniform."""
    for module in [*model.transformer.modules(), model.lm_head]:
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            std = fan_in**-0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 1.0)
    model.lm_head.weight.zero_()
    for block in model.transformer.h:
        block.attn.c_proj.weight.zero_()
        block.mlp.c_proj.weight.zero_()


def _init_nanochat2026(model: GPT) -> None:
    """nanochat's 2026 draw: embedding N(0, 0.8), head N(0, 0.001), q/k/v U(-s, s) and the MLP's input U(-0.4s, 0.4s)
    with s = sqrt(3/width) (uniform: no outliers), zero output projections."""
    s = 3**0.5 * model.config.n_embd**-0.5
    model.transformer.wte.weight.normal_(0.0, 0.8)
    model.lm_head.weight.normal_(0.0, 0.001)
    for block in model.transformer.h:
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            linear.weight.uniform_(-s, s)
        block.attn.c_proj.weight.zero_()
        block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s)
        block.mlp.c_proj.weight.zero_()


INITIALISERS = {"nanochat2025": _init_nanochat2025, "nanochat2026": _init_nanochat2026}
