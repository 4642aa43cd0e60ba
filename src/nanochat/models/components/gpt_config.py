"""GPTConfig: the shape of the one GPT, derived from depth (the one dial) and validated up front.

Every architecture switch defaults to the October-2025 model; `conf/arch/nanochat2026.yaml` turns on nanochat's
2026 combination (docs/model.md describes each key).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from nanochat.errors import UserError

VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many leading channels of the block input
SMEAR_GATE_CHANNELS = 24  # the smear gate reads this many leading channels of the token embedding
INITS = ("nanochat2025", "nanochat2026")  # gpt.INITIALISERS draws each


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
    # Architecture switches (defaults: the 2025 model).
    window_pattern: str = "L"  # per layer, tiled: L = full context, S = short window; the last layer is always L
    short_window: int | None = None  # tokens back an S layer sees; None: a quarter of the context, rounded up to 128
    qk_scale: float = 1.0  # q and k are each multiplied by this after QK-norm
    value_embeds: bool = False  # gated value embeddings on alternating layers, the last included
    smear: bool = False  # mix a gated share of the previous token's embedding into each token's
    backout: bool = False  # subtract a learned share of the middle layer's residual before the final norm
    layer_lambdas: bool = False  # per-layer scales of the residual stream and of the embedding added back to it
    pad_vocab_to: int = 1  # embedding and head tables padded to a multiple of this; logits cut back to vocab_size
    init: str = "nanochat2025"  # nanochat2025 | nanochat2026: how init_weights draws the weights

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "pad_vocab_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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
        self._check_arch()

    def _check_arch(self) -> None:
        pattern = self.window_pattern
        if not isinstance(pattern, str) or not pattern or set(pattern) - set("SL"):
            raise UserError(
                f"model window_pattern={pattern!r} may hold only the letters S (short window) and L "
                f"(full context), e.g. SSSL"
            )
        if self.short_window is not None and (not isinstance(self.short_window, int) or self.short_window < 1):
            raise UserError(f"model short_window={self.short_window!r} must be a positive integer or null")
        if any(w is not None for w in self.window_sizes()) and self.window >= self.sequence_len:
            raise UserError(
                f"model window_pattern={pattern!r} asks for a short window of {self.window} tokens, which is not "
                f"shorter than the context sequence_len={self.sequence_len}; set short_window below it, or "
                f"window_pattern=L"
            )
        if not isinstance(self.qk_scale, (int, float)) or isinstance(self.qk_scale, bool) or not self.qk_scale > 0:
            raise UserError(f"model qk_scale={self.qk_scale!r} must be a positive number")
        for name, channels in (("value_embeds", VE_GATE_CHANNELS), ("smear", SMEAR_GATE_CHANNELS)):
            if getattr(self, name) and self.n_embd < channels:
                raise UserError(
                    f"model {name}=true needs n_embd >= {channels} (its gate reads the first {channels} "
                    f"channels), but n_embd={self.n_embd}"
                )
        if self.init not in INITS:
            raise UserError(f"model init={self.init!r} is not one of {', '.join(INITS)}")

    def summary(self) -> str:
        """The shape in one line, for logs and the report card."""
        shape = (
            f"d{self.n_layer}: width {self.n_embd}, {self.n_head} heads (kv {self.n_kv_head}), "
            f"vocab {self.vocab_size:,}, seq {self.sequence_len}"
        )
        return "; ".join([shape, *self.features()[:1]]) + "".join(f", {f}" for f in self.features()[1:])

    def features(self) -> list[str]:
        """Every architecture switch that differs from the 2025 model, in words."""
        return [words for _, words in self._features()]

    def hf_unsupported(self) -> list[str]:
        """The architecture features transformers' NanoChatForCausalLM cannot express, in words (empty: exportable).

        Its config holds the rope base (rope_theta) and the softcap; a padded vocabulary exports as the first
        vocab_size rows of the embedding and head, and the init is no part of a trained model.
        """
        return [words for key, words in self._features() if key not in ("rope_base", "pad_vocab_to", "init")]

    def _features(self) -> list[tuple[str, str]]:
        default = {f.name: f.default for f in fields(GPTConfig)}
        out = []
        if self.window_pattern != default["window_pattern"]:
            out.append(("window_pattern", f"window pattern {self.window_pattern} (short window {self.window})"))
        if self.rope_base != default["rope_base"]:
            out.append(("rope_base", f"rope base {self.rope_base:g}"))
        if self.qk_scale != default["qk_scale"]:
            out.append(("qk_scale", f"QK scale {self.qk_scale:g}"))
        out += [
            (key, words)
            for key, words in (
                ("value_embeds", "value embeddings"),
                ("smear", "smear"),
                ("backout", "backout"),
                ("layer_lambdas", "residual and x0 lambdas"),
            )
            if getattr(self, key)
        ]
        if self.padded_vocab_size != self.vocab_size:
            out.append(("pad_vocab_to", f"vocab padded to {self.padded_vocab_size:,}"))
        if self.init != default["init"]:
            out.append(("init", f"{self.init} init"))
        return out

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def window(self) -> int:
        """The short window: how many earlier tokens an S layer attends to (besides the token itself)."""
        if self.short_window is not None:
            return self.short_window
        return -(-(self.sequence_len // 4) // 128) * 128  # nanochat's rule: a quarter of the context, up to 128s

    def window_sizes(self) -> list[int | None]:
        """Per layer: the tokens back it attends to, None for the full context (the last layer always)."""
        sizes = [
            self.window if self.window_pattern[i % len(self.window_pattern)] == "S" else None
            for i in range(self.n_layer)
        ]
        sizes[-1] = None
        return sizes

    def value_embed_layers(self) -> list[int]:
        """The layers with value embeddings: every other one, counted back from the last (which always has one)."""
        if not self.value_embeds:
            return []
        return [i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2]

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
        **arch,
    ) -> GPTConfig:
        """nanochat's sizing rule: width = 64*depth, heads = ceil(width/128) (head size 128 when it divides).

        `arch`: the architecture switches (an `arch` preset, conf/arch)."""
        if not isinstance(depth, int) or depth < 1:
            raise UserError(f"model depth={depth!r} must be a positive integer")
        unknown = sorted(set(arch) - ARCH_KEYS)
        if unknown:
            raise UserError(f"model arch has unknown keys {unknown}; known keys are {sorted(ARCH_KEYS)}")
        width = depth * aspect_ratio
        n_head = max(1, math.ceil(width / head_dim))
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head if n_kv_head is None else n_kv_head,
            n_embd=width,
            **arch,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """From `to_dict`'s output; keys added since a model was saved take their defaults (the 2025 model)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"model config has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


# The keys an `arch` preset may set: everything but the shape, which depth, the tokenizer and the stage decide.
SHAPE_KEYS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"}
ARCH_KEYS = {f.name for f in fields(GPTConfig)} - SHAPE_KEYS
