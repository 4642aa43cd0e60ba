"""Which optimizer each parameter gets, decided by its role in the model (`GPT.param_roles()`), not its name."""

from __future__ import annotations

from torch import nn

from nanochat.optim.muon_adamw import MuonAdamW
from nanochat.settings import OptimizerConfig

WIDTH_SCALED = ("embedding", "unembedding", "value_embedding")  # AdamW lrs tuned at width 768
NOT_TRANSFERRED = ("smear_backout",)  # nanochat keeps this group's lr fixed across batch sizes


def adamw_lrs(config: OptimizerConfig) -> dict[str, float]:
    c = config
    return {
        "embedding": c.embedding_lr,
        "unembedding": c.unembedding_lr,
        "value_embedding": c.value_embedding_lr,
        "resid_lambda": c.resid_lambda_lr,
        "x0_lambda": c.x0_lambda_lr,
        "smear_backout": c.smear_backout_lr,
    }


def build_optimizer(
    model: nn.Module, config: OptimizerConfig | None = None, *, lr_scale: float = 1.0, weight_decay_scale: float = 1.0
) -> MuonAdamW:
    """Muon for every matrix inside the transformer blocks; AdamW for the embedding and the lm_head, and for the
    value embeddings and scalars of the 2026 architecture when the model has them. Each group carries its `role`.

    The embedding, head and value-embedding AdamW lrs were tuned at width 768 and scale as (width/768)^-0.5
    (nanochat's rule); Muon's lr needs no width scaling because its update is orthogonalised. `lr_scale` and
    `weight_decay_scale` carry the lrs and Muon's weight decay to another batch and horizon (TransferConfig).
    """
    c = config or OptimizerConfig()
    roles = model.param_roles()
    dmodel_scale = (model.config.n_embd / 768) ** -0.5
    groups = [
        dict(
            params=roles["matrix"],
            role="matrix",
            kind="muon",
            lr=c.matrix_lr * lr_scale,
            momentum=c.muon_momentum,
            nesterov=True,
            ns_steps=c.ns_steps,
            ns_dtype=c.ns_dtype,
            weight_decay=c.muon_weight_decay * weight_decay_scale,
            ns_coefficients=c.ns_coefficients,
            muon_eq=c.muon_eq,
            muon_plus=c.muon_plus,
            normuon=c.normuon,
            normuon_beta2=c.normuon_beta2,
            cautious_weight_decay=c.cautious_weight_decay,
        )
    ]
    for role, lr in adamw_lrs(c).items():
        if not roles.get(role):
            continue
        lr = lr * (dmodel_scale if role in WIDTH_SCALED else 1.0) * (1.0 if role in NOT_TRANSFERRED else lr_scale)
        groups.append(
            dict(
                params=roles[role],
                role=role,
                kind="adamw",
                lr=lr,
                betas=tuple(c.role_betas.get(role, c.betas)),
                eps=c.eps,
                weight_decay=c.role_weight_decay.get(role, c.adamw_weight_decay),
                fp32_math=c.adamw_fp32_math,
            )
        )
    check_partition(model, groups)
    return MuonAdamW(groups)


def check_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group: a missing one would silently never train."""
    seen: dict[int, int] = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    repeated = [names.get(i, "?") for i, count in seen.items() if count > 1]
    if missing or repeated:
        raise ValueError(f"optimizer groups must cover each parameter once; missing {missing}, repeated {repeated}")
