"""PretrainModule: next-token prediction on packed token rows with the Muon+AdamW hybrid, nanochat's base_train.

One `training_step` is one optimizer step. Its batch holds all gradient-accumulation micro-batches,
shape (accum, device_batch, seq_len + 1), so `global_step` counts optimizer steps and DDP all-reduces only
on the last micro-batch. Schedules are pure functions of the step, set on the optimizer before it steps.
Metrics stay on the device between log points: one host sync every `log_every` steps, not every step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from nanochat.callbacks.periodic import log_scalars
from nanochat.errors import NonFiniteError, UserError
from nanochat.models.components import GPT, GPTConfig
from nanochat.models.horizon import num_iterations
from nanochat.optim import build_optimizer, lr_multiplier, muon_momentum

log = logging.getLogger(__name__)

SCHEDULE_DEFAULTS = dict(
    init_lr_frac=1.0,
    warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0, momentum_warmup_steps=300, momentum_start=0.85, momentum_end=0.95
)
MAX_NONFINITE_IN_A_ROW = 10  # with on_nonfinite=skip: more bad batches in a row than this means divergence, not bad data
HORIZON_DEFAULTS = dict(num_iterations=-1, target_flops=-1.0, param_data_ratio=20.0)


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
        optimizer: dict | None = None,
        schedule: dict | None = None,
        horizon: dict | None = None,
        compile: bool = False,
        init_from: str | None = None,
        log_every: int = 10,
        on_nonfinite: str = "stop",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        from nanochat.export import load_weights, parent_meta, stage_tokenizer

        self.tokenizer = stage_tokenizer(tokenizer_dir, init_from)
        self.config = GPTConfig.from_depth(
            depth, self.tokenizer.vocab_size, sequence_len, aspect_ratio=aspect_ratio, head_dim=head_dim,
            n_kv_head=n_kv_head, **dict(arch or {}),
        )
        self.model = GPT(self.config)
        self.parent = None
        if init_from:
            load_weights(self.model, init_from)
            self.parent = parent_meta(init_from)
        self.optimizer_kwargs = optimizer or {}
        self.schedule = {**SCHEDULE_DEFAULTS, **(schedule or {})}
        self.total_batch_size = total_batch_size
        self.num_iterations = self._horizon({**HORIZON_DEFAULTS, **(horizon or {})})
        self.log_every = log_every
        self.compile = compile
        if on_nonfinite not in ("stop", "skip"):
            raise UserError(f"module.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.nonfinite = {"skipped": 0, "in_a_row": 0}
        self.totals = {"tokens": 0, "seconds": 0.0}  # trained by this process's fit, all ranks, eval time excluded
        self._reset_meter()

    def _horizon(self, horizon: dict) -> int | None:
        return num_iterations(
            num_params=self.model.num_params(),
            flops_per_token=self.model.flops_per_token(),
            total_batch_size=self.total_batch_size,
            **horizon,
        )

    def fit_horizon(self, datamodule) -> int:
        """Optimizer steps of the run (the Trainer's max_steps). Pretraining's follows from the model alone."""
        return self.num_iterations

    # --- Lightning hooks --------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.compile and "_compiled" not in self.__dict__:
            # Stored outside the module tree so the state dict has no `_orig_mod.` duplicates;
            # evaluation and sampling use the uncompiled self.model, whose shapes vary.
            self.__dict__["_compiled"] = torch.compile(self.model, dynamic=False)

    def configure_optimizers(self):
        return build_optimizer(self.model, **self.optimizer_kwargs)

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            log.info(self.describe())
        self._reset_meter()
        self.restore_meter(self.__dict__.pop("_restored_meter", None))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt = self.optimizers()
        step = self.global_step  # optimizer steps already taken
        forward = self.__dict__.get("_compiled", self.model)
        pairs = micro_batches(batch)
        accum = len(pairs)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for i, (x, y) in enumerate(pairs):
            with opt.toggle_model(sync_grad=i == accum - 1):  # no DDP all-reduce on intermediate micro-batches
                loss = forward(x, y)  # mean over this micro-batch's targets that are not -1
                self.manual_backward(loss / accum)
            loss_sum += loss.detach()
            tokens += x.numel()
        if not self.step_is_finite(opt, step, loss_sum):
            return
        lrm = self.optimizer_step(opt, step)
        self._meter_loss += loss_sum / accum
        self._meter_loss_steps += 1
        self._meter_steps += 1
        self._meter_tokens += tokens
        done = step + 1
        if done % self.log_every == 0 or done == self.num_iterations:
            self._log_progress(done, lrm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_skipped"] = self.nonfinite["skipped"]
        # The partial logging interval: a run resumed mid-interval logs the same averages as one never stopped.
        checkpoint["meter"] = self.meter_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite["skipped"] = checkpoint.get("nonfinite_skipped", 0)
        self._restored_meter = checkpoint.get("meter")  # applied in on_fit_start, after the meter's reset

    def meter_state(self) -> dict:
        return {"loss": float(self._meter_loss), "loss_steps": self._meter_loss_steps}

    def restore_meter(self, state: dict | None) -> None:
        if state:
            self._meter_loss, self._meter_loss_steps = state["loss"], state["loss_steps"]

    def step_is_finite(self, opt, step: int, loss: torch.Tensor | None) -> bool:
        """Whether this step's loss and gradients are all finite; if not, stop or skip as `on_nonfinite` says.

        Checked before the optimizer step, so a bad batch never reaches the weights or a checkpoint. It costs one
        host-device sync per step; the gradients are the all-reduced ones, the same on every rank.
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        total = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros((), device=self.device)
        if loss is not None:
            total = total + loss
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(total)), all=True)
        if finite:
            self.nonfinite["in_a_row"] = 0
            return True
        what = "the loss" if loss is not None and not torch.isfinite(loss) else "a gradient"
        ckpt = self.trainer.checkpoint_callback
        kept = f"the last checkpoint ({ckpt.last_model_path})" if ckpt is not None and ckpt.last_model_path else "no checkpoint yet"
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"step {step + 1}: {what} is NaN or infinite; stopped before the optimizer step, keeping {kept} "
                                 f"(lower the learning rate, or set module.on_nonfinite=skip to skip such batches)")
        opt.zero_grad(set_to_none=True)
        self.nonfinite["skipped"] += 1
        self.nonfinite["in_a_row"] += 1
        if self.nonfinite["in_a_row"] > MAX_NONFINITE_IN_A_ROW:
            raise NonFiniteError(f"step {step + 1}: {what} was NaN or infinite in {MAX_NONFINITE_IN_A_ROW + 1} batches in a "
                                 f"row, so the model has diverged; stopped, keeping {kept}")
        log.warning(f"step {step + 1}: {what} is NaN or infinite; batch skipped ({self.nonfinite['skipped']} so far)")
        return False

    def optimizer_step(self, opt, step: int) -> float:
        """Set this step's lr multiplier and Muon momentum, step, clear the gradients; returns the multiplier."""
        s = self.schedule
        lrm = s["init_lr_frac"] * lr_multiplier(step, self.num_iterations, s["warmup_ratio"], s["warmdown_ratio"], s["final_lr_frac"])
        opt.optimizer.apply_schedule(lrm, muon_momentum(step, s["momentum_warmup_steps"], s["momentum_start"], s["momentum_end"]))
        # Lightning's bf16-mixed autocast spans the whole training_step; the optimizer chooses its own dtypes
        # (Newton-Schulz in fp32 where bf16 is emulated), so it steps outside autocast.
        with torch.autocast(self.device.type, enabled=False):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return lrm

    # --- metrics ----------------------------------------------------------------------------------
    def _reset_meter(self) -> None:
        self._meter_loss = 0.0
        self._meter_loss_steps = 0  # steps in _meter_loss: restored on resume, unlike the timing below
        self._meter_steps = 0
        self._meter_tokens = 0
        self._meter_t0 = time.perf_counter()
        self.excluded_seconds = 0.0  # evaluation time inside this logging interval, kept out of tok/s

    def _log_progress(self, done: int, lrm: float) -> None:
        loss = float(self._meter_loss / self._meter_loss_steps)  # the one host-device sync per interval
        seconds = max(time.perf_counter() - self._meter_t0 - self.excluded_seconds, 1e-9)
        tok_per_s = self._meter_tokens * self.trainer.world_size / seconds
        mfu = self.model.flops_per_token() * tok_per_s / (self.peak_flops() * self.trainer.world_size)
        metrics = {
            "train/loss": loss,
            "train/lrm": lrm,
            "train/lr": lrm * self.optimizers().optimizer.param_groups[0]["initial_lr"],
            "perf/tok_per_s": tok_per_s,
            "perf/mfu": mfu,
            "perf/step_seconds": seconds / self._meter_steps,
        }
        for name, count in self.data_faults().items():
            metrics[f"data/{name}"] = float(count)
        if self.nonfinite["skipped"]:
            metrics["train/nonfinite_skipped"] = float(self.nonfinite["skipped"])
        log_scalars(self.trainer, metrics)  # at step = optimizer steps done, like the evaluation callbacks
        self.totals["tokens"] += self._meter_tokens * self.trainer.world_size
        self.totals["seconds"] += seconds
        if self.trainer.is_global_zero:
            eta = (self.num_iterations - done) * seconds / self._meter_steps
            log.info(
                f"step {done:6d}/{self.num_iterations} ({100 * done / self.num_iterations:5.1f}%) | loss {loss:.4f} | "
                f"lrm {lrm:.3f} | {tok_per_s:,.0f} tok/s | mfu {100 * mfu:.2f}% | eta {eta / 60:.1f} min"
            )
        self._reset_meter()

    def data_faults(self) -> dict[str, int]:
        """Unreadable or unusable data the stream passed over so far in this run (on_bad_data=skip), by kind."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return dict(getattr(datamodule, "data_faults", {}))

    def peak_flops(self) -> float:
        from nanochat.hardware import peak_flops

        bf16 = "bf16" in str(self.trainer.precision)
        return peak_flops(self.device.type, torch.bfloat16 if bf16 else torch.float32)

    def describe(self) -> str:
        c, n = self.config, self.model.num_params()
        tokens = self.num_iterations * self.total_batch_size
        flops = self.model.flops_per_token() * tokens
        return (
            f"model {c.summary()}, {n:,} params, {self.model.flops_per_token():.3e} FLOPs/token\n"
            f"horizon: {self.num_iterations:,} steps x {self.total_batch_size:,} tokens = {tokens:,} tokens "
            f"({tokens / n:.1f} tokens/param), {flops:.3e} FLOPs"
        )

    def report_items(self) -> dict:
        """This run's configuration and totals, for its report card section."""
        c, n, per_token = self.config, self.model.num_params(), self.model.flops_per_token()
        tokens, seconds = self.totals["tokens"], max(self.totals["seconds"], 1e-9)
        items = {
            "model": c.summary(),
            "parameters": n,
            "FLOPs per token": f"{per_token:.3e}",
            "optimizer steps": self.global_step,
            "tokens per step": self.total_batch_size or "one batch of conversations (padded rows)",
            "tokens trained": tokens,
            "tokens : params": tokens / n,
            "training FLOPs": f"{per_token * tokens:.3e}",
            "training time": f"{seconds:.1f} s (evaluation excluded)",
            "throughput": f"{tokens / seconds:,.0f} tok/s",
            "MFU": f"{100 * per_token * tokens / (seconds * self.peak_flops() * self.trainer.world_size):.2f} %"
                   + (" of a matmul's measured FLOP/s (CPU)" if self.device.type == "cpu" else ""),
            "learning rates": self.lr_summary(),
        }
        if self.nonfinite["skipped"]:
            items["non-finite batches skipped"] = self.nonfinite["skipped"]
        faults = self.data_faults()
        if faults:
            items["data faults skipped"] = ", ".join(f"{n:,} {name.replace('_', ' ')}" for name, n in faults.items())
        if self.parent:
            p = self.parent
            items["started from"] = f"{p.get('stage', '?')} step {p.get('step', '?')} ({p.get('export')})"
        return items

    def lr_summary(self) -> str:
        s, o = self.schedule, self.optimizer_kwargs
        return (f"matrix {o.get('matrix_lr', 0.02)}, embedding {o.get('embedding_lr', 0.2)}, "
                f"unembedding {o.get('unembedding_lr', 0.004)}, x {s['init_lr_frac']}; "
                f"warmup {s['warmup_ratio']}, warmdown {s['warmdown_ratio']}")

    def export_meta(self) -> dict:
        meta = {"step": self.global_step, "tokens": self.global_step * self.total_batch_size}
        if self.hparams.tokenizer_dir:
            meta["tokenizer_dir"] = str(Path(self.hparams.tokenizer_dir))
        if self.parent:
            meta["parent"] = self.parent
        return meta


def micro_batches(batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) per micro-batch: packed rows (accum, B, T + 1) are shifted by one token; the chat
    stages' padded rows already come as (inputs, targets) pairs with -1 where nothing is trained."""
    if isinstance(batch, torch.Tensor):
        return [(rows[:, :-1], rows[:, 1:].contiguous()) for rows in batch]
    return list(batch)
