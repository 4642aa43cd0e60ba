"""Which optimizer each parameter gets, decided by its role in the model (`GPT.param_roles()`), not its name."""

from __future__ import annotations

from torch import nn

from nanochat.optim.muon_adamw import MuonAdamW
from nanochat.settings import OptimizerConfig


def build_optimizer(model: nn.Module, config: OptimizerConfig | None = None) -> MuonAdamW:
    """Muon for every matrix inside the transformer blocks; AdamW for the embedding and the lm_head, and for the
    value embeddings and scalars of the 2026 architecture when the model has them.

    The AdamW learning rates were tuned at width 768 and scale as (width/768)^-0.5 (nanochat's rule), the value
    embeddings' too; Muon's lr needs no width scaling because its update is orthogonalised.
    """
    c = config or OptimizerConfig()
    roles = model.param_roles()
    dmodel_scale = (model.config.n_embd / 768) ** -0.5
    adamw = dict(kind="adamw", betas=tuple(c.betas), eps=c.eps, weight_decay=c.adamw_weight_decay)
    groups = [
        dict(params=roles["matrix"], kind="muon", lr=c.matrix_lr, momentum=c.muon_momentum, nesterov=True,
             ns_steps=c.ns_steps, ns_dtype=c.ns_dtype, weight_decay=c.muon_weight_decay),
        dict(params=roles["embedding"], lr=c.embedding_lr * dmodel_scale, **adamw),
        dict(params=roles["unembedding"], lr=c.unembedding_lr * dmodel_scale, **adamw),
    ]
    extra = {"value_embedding": c.value_embedding_lr * dmodel_scale, "resid_lambda": c.resid_lambda_lr,
             "x0_lambda": c.x0_lambda_lr, "smear_backout": c.smear_backout_lr}
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
