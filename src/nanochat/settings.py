"""Typed settings, each with the one set of defaults the whole project uses.

The YAML selects them as Hydra schemas (`schema/<name>`, see nanochat.configs) and overrides values; Hydra rejects
unknown keys and wrong types when composing, and each dataclass checks its ranges when it is built, so a bad value
stops a run at the start with one line naming it. Kept free of torch so composing a config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanochat.errors import UserError


def _positive(owner: str, **values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise UserError(f"{owner}.{name}={value} must be positive")


ADAMW_ROLES = ("embedding", "unembedding", "value_embedding", "resid_lambda", "x0_lambda", "smear_backout")
NS_SCHEMES = ("quintic", "polar_express")
WEIGHT_DECAY_SCHEDULES = ("constant", "cosine")
RATIO_PARAMS = ("total", "matrices_head")


@dataclass
class OptimizerConfig:
    """Muon for the matrices inside the blocks, AdamW for the rest (embeddings, output head, 2026 scalars).

    The defaults are nanochat's October-2025 optimizer; conf/optimizer/nanochat2026.yaml turns on its 2026 options.
    """

    matrix_lr: float = 0.02  # Muon; its orthogonalised update needs no width scaling
    embedding_lr: float = 0.2  # AdamW, x (width/768)^-0.5
    unembedding_lr: float = 0.004  # AdamW, x (width/768)^-0.5
    value_embedding_lr: float = 0.1  # AdamW, x (width/768)^-0.5 (2026 architecture)
    resid_lambda_lr: float = 0.005  # AdamW, per-layer residual scales (2026 architecture)
    x0_lambda_lr: float = 0.5  # AdamW, per-layer embedding scales (2026 architecture)
    smear_backout_lr: float = 0.2  # AdamW, smear gate and lambda, backout lambda (2026 architecture); never transferred
    betas: list[float] = field(default_factory=lambda: [0.8, 0.95])  # AdamW, every role not in role_betas
    eps: float = 1e-10
    adamw_weight_decay: float = 0.0  # every AdamW role not in role_weight_decay
    role_betas: dict[str, list[float]] = field(default_factory=dict)  # AdamW role -> [beta1, beta2]
    role_weight_decay: dict[str, float] = field(default_factory=dict)  # AdamW role -> decoupled weight decay
    adamw_fp32_math: bool = False  # AdamW of low-precision (bf16) weights computed in fp32, moments kept in fp32
    muon_weight_decay: float = 0.0  # the schedule may decay it (ScheduleConfig.muon_weight_decay_schedule)
    muon_momentum: float = 0.95  # the schedule ramps it up to momentum_end
    ns_steps: int = 5  # orthogonalisation iterations
    ns_dtype: str = "auto"  # auto | bfloat16 | float32 (train.py sets the run's: bf16 under bf16-mixed)
    ns_coefficients: str = "quintic"  # quintic (one fixed polynomial) | polar_express (one per iteration)
    muon_eq: bool = False  # MuonEq: each row rescaled to the mean row norm before orthogonalising
    muon_plus: bool = False  # Muon+: the orthogonalised update rescaled to Frobenius norm sqrt(min(rows, cols))
    normuon: bool = False  # NorMuon: per-row (or per-column) second moments even out the update's scales
    normuon_beta2: float = 0.9  # EMA of NorMuon's second moments
    cautious_weight_decay: bool = False  # Muon weight decay only where the update and the weight agree in sign

    def __post_init__(self):
        _positive(
            "optimizer",
            matrix_lr=self.matrix_lr,
            embedding_lr=self.embedding_lr,
            unembedding_lr=self.unembedding_lr,
            value_embedding_lr=self.value_embedding_lr,
            resid_lambda_lr=self.resid_lambda_lr,
            x0_lambda_lr=self.x0_lambda_lr,
            smear_backout_lr=self.smear_backout_lr,
            eps=self.eps,
            ns_steps=self.ns_steps,
        )
        for where, betas in [("betas", self.betas)] + [(f"role_betas.{r}", b) for r, b in self.role_betas.items()]:
            if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
                raise UserError(f"optimizer.{where}={list(betas)} must be two numbers in [0, 1)")
        for name, roles in (("role_betas", self.role_betas), ("role_weight_decay", self.role_weight_decay)):
            unknown = sorted(set(roles) - set(ADAMW_ROLES))
            if unknown:
                raise UserError(
                    f"optimizer.{name} names {', '.join(unknown)}, not AdamW roles ({', '.join(ADAMW_ROLES)})"
                )
        decays = {
            "adamw_weight_decay": self.adamw_weight_decay,
            "muon_weight_decay": self.muon_weight_decay,
            **{f"role_weight_decay.{r}": w for r, w in self.role_weight_decay.items()},
        }
        for name, value in decays.items():
            if value < 0:
                raise UserError(f"optimizer.{name}={value} must not be negative")
        if self.ns_dtype not in ("auto", "bfloat16", "float32"):
            raise UserError(f"optimizer.ns_dtype={self.ns_dtype!r} is not one of auto, bfloat16, float32")
        if self.ns_coefficients not in NS_SCHEMES:
            raise UserError(f"optimizer.ns_coefficients={self.ns_coefficients!r} is not one of {', '.join(NS_SCHEMES)}")
        if self.ns_coefficients == "polar_express" and self.ns_steps > 5:
            raise UserError(
                f"optimizer.ns_steps={self.ns_steps}: polar_express has coefficients for at most 5 iterations"
            )
        if not 0 <= self.normuon_beta2 < 1:
            raise UserError(f"optimizer.normuon_beta2={self.normuon_beta2} must be in [0, 1)")


@dataclass
class ScheduleConfig:
    """lr = initial lr x init_lr_frac x (linear warmup, flat, linear warmdown to final_lr_frac); Muon momentum
    ramps from momentum_start to momentum_end over the first momentum_warmup_steps (and, with momentum_final,
    moves on to it during the warmdown); Muon weight decay constant or on a cosine to zero."""

    init_lr_frac: float = 1.0
    warmup_ratio: float = 0.0
    warmup_steps: int = -1  # >= 0: warm up over this many steps instead of warmup_ratio of them
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    momentum_warmup_steps: int = 300
    momentum_start: float = 0.85
    momentum_end: float = 0.95
    momentum_final: float | None = None  # set: momentum goes linearly from momentum_end to this over the warmdown
    muon_weight_decay_schedule: str = "constant"  # constant | cosine (from muon_weight_decay at step 0 to 0 at the end)

    def __post_init__(self):
        w, d = self.warmup_ratio, self.warmdown_ratio
        if not (0 <= w <= 1 and 0 <= d <= 1 and w + d <= 1):
            raise UserError(f"schedule ratios warmup={w}, warmdown={d} must lie in [0, 1] and sum to at most 1")
        _positive("schedule", init_lr_frac=self.init_lr_frac)
        if self.final_lr_frac < 0 or self.momentum_warmup_steps < 0:
            raise UserError("schedule.final_lr_frac and schedule.momentum_warmup_steps must not be negative")
        if self.muon_weight_decay_schedule not in WEIGHT_DECAY_SCHEDULES:
            raise UserError(
                f"schedule.muon_weight_decay_schedule={self.muon_weight_decay_schedule!r} is not one of "
                f"{', '.join(WEIGHT_DECAY_SCHEDULES)}"
            )


@dataclass
class TransferConfig:
    """How hyperparameters tuned on a reference model carry over to this run's batch and horizon (nanochat 2026).

    D is the token horizon, tokens = param_data_ratio x (block matrices + output head), the same ratio at the
    reference depth; B the tokens per step. model.total_batch_size=auto picks B from D; the switches below scale
    the lrs and Muon's weight decay to it. Only shapes enter: the ratio cancels.
    """

    reference_depth: int = 12  # the model the lrs, weight decay and reference batch were tuned on
    reference_batch_size: int = 524_288  # B_ref: tokens per step at the reference depth (2^19)
    batch_exponent: float = 0.383  # total_batch_size=auto: B = B_ref x (D / D_ref)^this, to the nearest power of 2
    lr: bool = False  # every lr but the smear/backout group's x sqrt(B / B_ref)
    weight_decay: bool = False  # Muon weight decay x sqrt(B / B_ref) x D_ref / D

    def __post_init__(self):
        _positive(
            "transfer",
            reference_depth=self.reference_depth,
            reference_batch_size=self.reference_batch_size,
            batch_exponent=self.batch_exponent,
        )


@dataclass
class HorizonConfig:
    """How long a stage trains. Precedence: num_iterations > target_flops > param_data_ratio (pretraining),
    num_iterations > epochs (chat stages, whose length follows from their mixture)."""

    num_iterations: int = -1  # > 0: exactly this many optimizer steps
    target_flops: float = -1.0  # > 0: as many steps as this FLOP budget buys
    param_data_ratio: float = 20.0  # tokens per parameter (Chinchilla; nanochat's d20)
    ratio_params: str = "total"  # which parameters the ratio counts: total | matrices_head (block matrices + head)
    epochs: float = 1.0  # chat stages: passes over the mixture

    def __post_init__(self):
        _positive("horizon", epochs=self.epochs)
        if self.ratio_params not in RATIO_PARAMS:
            raise UserError(f"horizon.ratio_params={self.ratio_params!r} is not one of {', '.join(RATIO_PARAMS)}")


TOKENIZER_TRAINERS = ("rustbpe", "hf")  # the BPE trainers; the first is the default (docs/benchmarks.md)


def check_tokenizer_trainer(name: str) -> None:
    if name not in TOKENIZER_TRAINERS:
        raise UserError(f"tokenizer trainer {name!r} is not one of {', '.join(TOKENIZER_TRAINERS)}")


@dataclass
class TokenizerConfig:
    """How the tokenizer is trained (nanochat's tok_train): at most `max_chars` characters, each document cropped,
    by `trainer` (rustbpe, nanochat's own and ~2x faster, or hf, HF tokenizers: the same ids and files either way)."""

    max_chars: int = 2_000_000_000  # read at most this many characters
    doc_cap: int = 10_000  # crop each document to this many characters (0: no crop)
    trainer: str = TOKENIZER_TRAINERS[0]
    progress: bool = True

    def __post_init__(self):
        _positive("tokenizer", max_chars=self.max_chars)
        if self.doc_cap < 0:
            raise UserError(f"tokenizer.doc_cap={self.doc_cap} must not be negative")
        check_tokenizer_trainer(self.trainer)


@dataclass
class SamplingConfig:
    """What a chat request gets for a setting it leaves out (server, web UI, terminal chat)."""

    temperature: float = 0.6
    top_k: int = 50
    max_tokens: int = 512  # fewer when the context is nearly full

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise UserError(f"sampling.temperature={self.temperature} must be in 0..2")
        _positive("sampling", top_k=self.top_k, max_tokens=self.max_tokens)


@dataclass
class ServerLimits:
    """How much one server takes on: queue, batch, request size and the timeouts that keep a client from holding it."""

    max_waiting: int = 16  # requests accepted beyond one (decoding or waiting for room) before new ones get 503
    max_batch: int = 16  # rows decoded together, one forward per step
    max_body_bytes: int = 1_000_000  # larger request bodies get 413 (a valid request needs ~400 kB at most)
    body_timeout: float = 30.0  # seconds for a request body to arrive (408 after)
    send_timeout: float = 30.0  # seconds a streaming client may stop reading before it is dropped
    stall_timeout: float = 120.0  # seconds without a decoding step before /health reports the worker stuck

    def __post_init__(self):
        _positive(
            "server",
            max_batch=self.max_batch,
            max_body_bytes=self.max_body_bytes,
            body_timeout=self.body_timeout,
            send_timeout=self.send_timeout,
            stall_timeout=self.stall_timeout,
        )
        if self.max_waiting < 0:
            raise UserError(f"server.max_waiting={self.max_waiting} must not be negative")
