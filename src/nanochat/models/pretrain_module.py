"""PretrainModule: next-token prediction on packed token rows with the Muon+AdamW hybrid, nanochat's base_train.

One `training_step` is one optimizer step. Its batch holds all gradient-accumulation micro-batches,
shape (accum, device_batch, seq_len + 1), so `global_step` counts optimizer steps and DDP all-reduces only
on the last micro-batch. Schedules are pure functions of the step, set on the optimizer before it steps.
Metrics stay on the device between log points: one host sync every `log_every` steps, not every step.
"""

from __future__ import annotations

import logging

import lightning as L

from nanochat.models import stage_parts
from nanochat.models.horizon import pretrain_plan, ratio_params
from nanochat.optim import build_optimizer
from nanochat.settings import HorizonConfig, OptimizerConfig, ScheduleConfig, TransferConfig

log = logging.getLogger(__name__)


class PretrainModule(L.LightningModule):
    def __init__(
        self,
        *,
        depth: int,
        tokenizer_dir: str | None,
        sequence_len: int = 2048,
        total_batch_size: int = 524_288,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        n_kv_head: int | None = None,
        arch: dict | None = None,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        horizon: HorizonConfig | None = None,
        transfer: TransferConfig | None = None,
        compile: bool = False,
        fp8: bool = False,
        init_from: str | None = None,
        log_every: int = 10,
        on_nonfinite: str = "stop",
    ):
        super().__init__()
        self.automatic_optimization = False
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer, self.model, self.parent = stage_parts.build_gpt(
            depth=depth,
            tokenizer_dir=tokenizer_dir,
            init_from=init_from,
            sequence_len=sequence_len,
            aspect_ratio=aspect_ratio,
            head_dim=head_dim,
            n_kv_head=n_kv_head,
            **dict(arch or {}),
        )
        self.config = self.model.config
        self.optimizer_config = optimizer or OptimizerConfig()
        self.stepper = stage_parts.OptimizerStep(schedule or ScheduleConfig(), on_nonfinite)
        self.total_batch_size = total_batch_size
        self.horizon = horizon or HorizonConfig()
        self.transfer = transfer or TransferConfig()
        reference_shape = dict(
            vocab_size=self.config.vocab_size,
            sequence_len=sequence_len,
            aspect_ratio=aspect_ratio,
            head_dim=head_dim,
            n_kv_head=n_kv_head,
            **dict(arch or {}),
        )
        self.num_iterations, self.lr_scale, self.weight_decay_scale = pretrain_plan(
            self.model,
            total_batch_size=total_batch_size,
            horizon=self.horizon,
            transfer=self.transfer,
            reference_shape=reference_shape,
        )
        self.log_every, self.compile, self.fp8 = log_every, compile, fp8
        self.meter = stage_parts.Meter()

    def fit_horizon(self, datamodule) -> int:
        """Optimizer steps of the run (the Trainer's max_steps): pretraining's follow from the model alone."""
        return self.num_iterations

    # --- Lightning hooks --------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.fp8 and "_fp8" not in self.__dict__:  # before compiling; once, though Lightning may call this again
            from nanochat.models import float8

            self.__dict__["_fp8"] = float8.enable(self.model, self.trainer.strategy.root_device)
        if self.compile:
            stage_parts.compile_model(self)

    def configure_optimizers(self):
        return build_optimizer(
            self.model, self.optimizer_config, lr_scale=self.lr_scale, weight_decay_scale=self.weight_decay_scale
        )

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
        n, per_token = self.model.num_params(), self.model.flops_per_token()
        tokens = self.num_iterations * self.total_batch_size
        counted = ratio_params(self.model, self.horizon)
        which = "" if self.horizon.ratio_params == "total" else f" of {counted:,} block-matrix + head params"
        text = (
            f"model {self.config.summary()}, {n:,} params, {per_token:.3e} FLOPs/token\n"
            f"horizon: {self.num_iterations:,} steps x {self.total_batch_size:,} tokens = {tokens:,} tokens "
            f"({tokens / counted:.1f} tokens/param{which}), {per_token * tokens:.3e} FLOPs"
        )
        if self.transfer.lr or self.transfer.weight_decay:
            wd = self.optimizer_config.muon_weight_decay
            t = self.transfer
            text += (
                f"\ntransfer from d{t.reference_depth} at {t.reference_batch_size:,} tokens: "
                f"lrs x {self.lr_scale:.4f}, Muon weight decay {wd} -> {wd * self.weight_decay_scale:.6f}"
            )
        return text

    def report_items(self) -> dict:
        """This run's configuration and totals, for its report card section."""
        items = {
            **stage_parts.common_report_items(self),
            **stage_parts.throughput_items(self, f"{self.total_batch_size:,}"),
        }
        items["training time (nanochat's count)"] = stage_parts.nanochat_training_time(self)
        if self.lr_scale != 1.0 or self.weight_decay_scale != 1.0:
            t = self.transfer
            items["transfer"] = (
                f"lrs x {self.lr_scale:.4f}, Muon weight decay x {self.weight_decay_scale:.4f} "
                f"(from d{t.reference_depth} at {t.reference_batch_size:,} tokens)"
            )
        if self.fp8:
            converted = self.__dict__.get("_fp8")
            items["fp8"] = f"{converted} Linear layers" if converted else "off (no fp8 GPU)"
        return items

    def export_meta(self) -> dict:
        return stage_parts.export_meta(self, self.total_batch_size)
