"""ChatModule: midtraining and SFT, nanochat's mid_train and chat_sft.

The GPT, its shape and its tokenizer come from `init_from` (a run dir or export dir of the previous stage),
which is required. The horizon is `epochs` passes over the data mixture unless `num_iterations` is set, so it is
known only once the DataModule has its mixture (`fit_horizon`, called before the Trainer is built). The data
decides the rest: mid's batches are packed token rows like pretraining's, SFT's are padded (inputs, targets)
pairs whose targets are -1 outside the assistant's trained tokens; one training step is the same
language-model step as pretraining's over either.
"""

from __future__ import annotations

import logging
import math

import lightning as L

from nanochat.errors import UserError
from nanochat.models import stage_parts
from nanochat.optim import build_optimizer
from nanochat.settings import HorizonConfig, OptimizerConfig, ScheduleConfig

log = logging.getLogger(__name__)


class ChatModule(L.LightningModule):
    def __init__(
        self,
        *,
        stage: str,
        init_from: str | None,
        tokenizer_dir: str | None = None,
        sequence_len: int | None = None,
        total_batch_size: int | None = None,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        horizon: HorizonConfig | None = None,
        compile: bool = False,
        log_every: int = 10,
        on_nonfinite: str = "stop",
    ):
        if not init_from:
            raise UserError(
                f"stage={stage} starts from an earlier stage's model: set init_from=<run dir or export dir>"
            )
        super().__init__()
        self.automatic_optimization = False
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer, self.model, self.parent = stage_parts.build_gpt(
            depth=None, tokenizer_dir=tokenizer_dir, init_from=init_from, sequence_len=sequence_len
        )
        self.config = self.model.config
        self.optimizer_config = optimizer or OptimizerConfig()
        self.stepper = stage_parts.OptimizerStep(schedule or ScheduleConfig(), on_nonfinite)
        self.horizon = horizon or HorizonConfig()
        self.total_batch_size = (
            total_batch_size  # mid: tokens per step; SFT: None (a step is a number of conversations)
        )
        self.num_iterations = self.horizon.num_iterations if self.horizon.num_iterations > 0 else None
        self.log_every, self.compile = log_every, compile
        self.meter = stage_parts.Meter()

    def fit_horizon(self, datamodule) -> int:
        """`epochs` passes over the mixture, unless horizon.num_iterations set the number of steps."""
        if self.num_iterations is None:
            self.num_iterations = max(1, math.ceil(self.horizon.epochs * datamodule.steps_per_epoch()))
        return self.num_iterations

    # --- Lightning hooks --------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.compile:
            stage_parts.compile_model(self)

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optimizer_config)

    def on_fit_start(self) -> None:
        stage_parts.start_fit(self)

    def training_step(self, batch, batch_idx: int) -> None:
        stage_parts.lm_training_step(self, batch)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        stage_parts.save_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stage_parts.load_state(self, checkpoint)

    # --- reporting ----------------------------------------------------------------------------------
    def describe(self) -> str:
        parent = self.parent or {}
        return (
            f"model {self.config.summary()}, {self.model.num_params():,} params, "
            f"from {parent.get('stage', '?')} step {parent.get('step', '?')} in {parent.get('export')}\n"
            f"horizon: {self.num_iterations:,} steps, lr x {self.stepper.schedule.init_lr_frac}"
        )

    def report_items(self) -> dict:
        per_step = f"{self.total_batch_size:,}" if self.total_batch_size else "one batch of conversations (padded rows)"
        return {**stage_parts.common_report_items(self), **stage_parts.throughput_items(self, per_step)}

    def export_meta(self) -> dict:
        return stage_parts.export_meta(self, self.total_batch_size)
