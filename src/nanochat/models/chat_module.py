"""ChatModule: midtraining and SFT. The pretraining step, optimizer and metrics, started from an earlier stage.

What differs from PretrainModule is only where a run starts and how long it lasts:
- weights and tokenizer come from `init_from` (a run dir or export dir of the previous stage), which is required;
- the horizon is `epochs` passes over the data mixture unless `num_iterations` is set, so it is known only
  once the DataModule has its mixture (`fit_horizon`, called before the Trainer is built).
The data decides the rest: mid's batches are packed token rows like pretraining's, SFT's are padded
(inputs, targets) pairs whose targets are -1 outside the assistant's trained tokens.
"""

from __future__ import annotations

import math

from nanochat.errors import UserError
from nanochat.models.pretrain_module import PretrainModule


class ChatModule(PretrainModule):
    def __init__(self, *, stage: str, init_from: str | None, epochs: float = 1.0, total_batch_size: int | None = None, **kwargs):
        if not init_from:
            raise UserError(f"stage={stage} starts from an earlier stage's model: set init_from=<run dir or export dir>")
        if epochs <= 0:
            raise UserError(f"module.epochs={epochs} must be positive")
        self.epochs = epochs
        super().__init__(init_from=init_from, total_batch_size=total_batch_size or 0, **kwargs)

    def _horizon(self, horizon: dict) -> int | None:
        steps = horizon.get("num_iterations", -1)
        return steps if steps and steps > 0 else None  # else: `epochs` of the mixture, once the data is known

    def fit_horizon(self, datamodule) -> int:
        if self.num_iterations is None:
            self.num_iterations = max(1, math.ceil(self.epochs * datamodule.steps_per_epoch()))
        return self.num_iterations

    def describe(self) -> str:
        c, n = self.config, self.model.num_params()
        parent = self.parent or {}
        return (
            f"model {c.summary()}, {n:,} params, "
            f"from {parent.get('stage', '?')} step {parent.get('step', '?')} in {parent.get('export')}\n"
            f"horizon: {self.num_iterations:,} steps, lr x {self.schedule['init_lr_frac']}"
        )

    def export_meta(self) -> dict:
        meta = super().export_meta()
        if not self.total_batch_size:  # SFT steps hold a number of conversations, not of tokens
            meta.pop("tokens", None)
        return meta
