"""Which optimizer each parameter gets, decided by its role in the model (`GPT.param_roles()`), not its name."""

from __future__ import annotations

from torch import nn

from nanochat.optim.muon_adamw import MuonAdamW


def build_optimizer(
    model: nn.Module,
    *,
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    value_embedding_lr: float = 0.1,
    resid_lambda_lr: float = 0.005,
    x0_lambda_lr: float = 0.5,
    smear_backout_lr: float = 0.2,
    betas: tuple[float, float] = (0.8, 0.95),
    eps: float = 1e-10,
    adamw_weight_decay: float = 0.0,
    muon_weight_decay: float = 0.0,
    muon_momentum: float = 0.95,
    ns_steps: int = 5,
    ns_dtype: str = "auto",
) -> MuonAdamW:
    """Muon for every matrix inside the transformer blocks; AdamW for the embedding and the lm_head, and for the
    value embeddings and scalars of the 2026 architecture when the model has them.

    The AdamW learning rates were tuned at width 768 and scale as (width/768)^-0.5 (nanochat's rule), the value
    embeddings' too; Muon's lr needs no width scaling because its update is orthogonalised. The lrs of the 2026
    groups are placeholders, nanochat's base values for them (value embeddings at half the embedding lr), with
    the shared AdamW betas, eps and weight decay rather than nanochat's per-group ones: not a tuned recipe.
    """
    roles = model.param_roles()
    width = model.config.n_embd
    dmodel_scale = (width / 768) ** -0.5
    adamw = dict(kind="adamw", betas=tuple(betas), eps=eps, weight_decay=adamw_weight_decay)
    groups = [
        dict(params=roles["matrix"], kind="muon", lr=matrix_lr, momentum=muon_momentum, nesterov=True,
             ns_steps=ns_steps, ns_dtype=ns_dtype, weight_decay=muon_weight_decay),
        dict(params=roles["embedding"], lr=embedding_lr * dmodel_scale, **adamw),
        dict(params=roles["unembedding"], lr=unembedding_lr * dmodel_scale, **adamw),
    ]
    extra = {"value_embedding": value_embedding_lr * dmodel_scale, "resid_lambda": resid_lambda_lr,
             "x0_lambda": x0_lambda_lr, "smear_backout": smear_backout_lr}
    groups += [dict(params=roles[role], lr=lr, **adamw) for role, lr in extra.items() if roles.get(role)]
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
