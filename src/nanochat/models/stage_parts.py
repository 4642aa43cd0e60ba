"""The pieces every training stage's LightningModule holds: its GPT, the optimizer step, and the progress meter.

PretrainModule, ChatModule and RLModule are each a LightningModule of their own that keeps one of each piece and
adds its training step and data; none subclasses another.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from nanochat.callbacks.periodic import log_scalars
from nanochat.errors import NonFiniteError, UserError
from nanochat.settings import OptimizerConfig, ScheduleConfig

log = logging.getLogger(__name__)

UNTIMED_STEPS = 11  # nanochat's leaderboard time leaves out steps 0..10 (compilation and warm-up)
MAX_NONFINITE_IN_A_ROW = (
    10  # with on_nonfinite=skip: more bad batches in a row than this means divergence, not bad data
)


def build_gpt(*, depth: int | None, tokenizer_dir, init_from, sequence_len: int | None = None, **shape):
    """(tokenizer, GPT, parent) of a stage: the GPT sized from `depth`, or the shape of `init_from`'s export when
    depth is None (the chat stages: their rows must have its context), with init_from's weights; `parent` says
    where those came from."""
    from nanochat.export import find_export, load_weights, parent_meta, read_export_config, stage_tokenizer
    from nanochat.models.components import GPT, GPTConfig

    tokenizer = stage_tokenizer(tokenizer_dir, init_from)
    if depth is None:
        config = GPTConfig.from_dict(read_export_config(init_from)["model"])
        if sequence_len is not None and sequence_len != config.sequence_len:
            raise UserError(
                f"the model in {find_export(init_from)} was trained with a context of {config.sequence_len} "
                f"tokens but this run's model.sequence_len={sequence_len}; set model.sequence_len="
                f"{config.sequence_len} (or the model= preset it was trained with)"
            )
    else:
        config = GPTConfig.from_depth(depth, tokenizer.vocab_size, sequence_len, **shape)
    model = GPT.initialised(config)  # the run's seed alone decides the weights, as in nanochat
    parent = None
    if init_from:
        load_weights(model, init_from)
        parent = parent_meta(init_from)
    return tokenizer, model, parent


class OptimizerStep:
    """One optimizer step of a stage: the non-finite check, this step's lr multiplier and Muon momentum, the step."""

    def __init__(self, schedule: ScheduleConfig, on_nonfinite: str = "stop"):
        if on_nonfinite not in ("stop", "skip"):
            raise UserError(f"module.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.schedule, self.on_nonfinite = schedule, on_nonfinite
        self.skipped = 0  # batches skipped over the whole run (checkpointed)
        self.in_a_row = 0

    def finite(self, module, opt, step: int, loss: torch.Tensor | None) -> bool:
        """Whether this step's loss and gradients are all finite; if not, stop or skip as `on_nonfinite` says.

        Checked before the optimizer step, so a bad batch never reaches the weights or a checkpoint. It costs one
        host-device sync per step; the gradients are the all-reduced ones, the same on every rank.
        """
        grads = [p.grad for p in module.model.parameters() if p.grad is not None]
        total = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros((), device=module.device)
        if loss is not None:
            total = total + loss
        if module.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(total)), all=True):
            self.in_a_row = 0
            return True
        what = "the loss" if loss is not None and not torch.isfinite(loss) else "a gradient"
        ckpt = module.trainer.checkpoint_callback
        kept = (
            f"the last checkpoint ({ckpt.last_model_path})"
            if ckpt is not None and ckpt.last_model_path
            else "no checkpoint yet"
        )
        if self.on_nonfinite == "stop":
            raise NonFiniteError(
                f"step {step + 1}: {what} is NaN or infinite; stopped before the optimizer step, keeping {kept} "
                f"(lower the learning rate, or set module.on_nonfinite=skip to skip such batches)"
            )
        opt.zero_grad(set_to_none=True)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > MAX_NONFINITE_IN_A_ROW:
            raise NonFiniteError(
                f"step {step + 1}: {what} was NaN or infinite in {MAX_NONFINITE_IN_A_ROW + 1} batches in a "
                f"row, so the model has diverged; stopped, keeping {kept}"
            )
        log.warning(f"step {step + 1}: {what} is NaN or infinite; batch skipped ({self.skipped} so far)")
        return False

    def __call__(self, opt, step: int, num_steps: int, device_type: str) -> float:
        """Set this step's lr multiplier, Muon momentum and weight decay, step, clear the gradients; returns the
        lr multiplier."""
        from nanochat.optim import lr_multiplier, muon_momentum, muon_weight_decay_multiplier

        lrm = lr_multiplier(step, num_steps, self.schedule)
        opt.optimizer.apply_schedule(
            lrm,
            muon_momentum(step, self.schedule, num_steps),
            muon_weight_decay_multiplier(step, num_steps, self.schedule),
        )
        # Lightning's bf16-mixed autocast spans the whole training_step; the optimizer chooses its own dtypes
        # (Newton-Schulz in the run's precision), so it steps outside autocast.
        with torch.autocast(device_type, enabled=False):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return lrm


class Meter:
    """One logging interval's sums (the part a checkpoint keeps, so a resumed run logs the same averages) and its
    timing, with evaluation time (`excluded_seconds`, added by the evaluation callbacks) kept out of throughput."""

    def __init__(self):
        self.totals = {"tokens": 0, "seconds": 0.0}  # trained by this process's fit, all ranks, eval time excluded
        self.from_checkpoint: dict | None = None  # a resumed interval's sums, until the fit starts
        self.clock_at_untimed_end: float | None = None  # training clock when step UNTIMED_STEPS finished
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}  # checkpointed: what the interval's logged averages are made of
        self.steps = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.excluded_seconds = 0.0

    def add(self, **values) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t0 - self.excluded_seconds, 1e-9)

    def clock(self) -> float:
        """Seconds of training in this process's fit so far, evaluation excluded."""
        return self.totals["seconds"] + self.seconds()

    def state(self) -> dict:
        return {k: float(v) for k, v in self.sums.items()}

    def restore(self, state: dict | None) -> None:
        self.sums.update(state or {})


def peak_flops(module) -> float:
    from nanochat.hardware import peak_flops as device_peak

    bf16 = "bf16" in str(module.trainer.precision)
    return device_peak(module.device.type, torch.bfloat16 if bf16 else torch.float32)


def data_faults(module) -> dict[str, int]:
    """Unreadable or unusable data the stream passed over so far in this run (on_bad_data=skip), by kind."""
    datamodule = module.trainer.datamodule if module._trainer is not None else None
    return dict(getattr(datamodule, "data_faults", {}))


def packing_stats(module) -> dict[str, float]:
    """How the stage's packing did so far (best-fit: the share of tokens cropped off, or of rows padded), by name."""
    datamodule = module.trainer.datamodule if module._trainer is not None else None
    return dict(getattr(datamodule, "packing_stats", {}))


def lr_summary(optimizer: OptimizerConfig, schedule: ScheduleConfig) -> str:
    return (
        f"matrix {optimizer.matrix_lr}, embedding {optimizer.embedding_lr}, unembedding {optimizer.unembedding_lr}, "
        f"x {schedule.init_lr_frac}; warmup {schedule.warmup_ratio}, warmdown {schedule.warmdown_ratio}"
    )


def compile_model(module) -> None:
    """torch.compile the GPT for training, once; kept outside the module tree so the state dict has no `_orig_mod.`
    duplicates, and evaluation and sampling use the uncompiled model, whose shapes vary. On a CPU inductor builds
    C++ kernels: without a compiler the GPT trains uncompiled, with one warning."""
    if "_compiled" in module.__dict__:
        return
    if module.device.type == "cpu" and not cpp_compiler_found():
        log.warning(
            "compile=true, but torch.compile finds no C++ compiler on this machine (it needs one to build CPU "
            "kernels): training uncompiled; install g++ (or set CXX) for the faster compiled step, or set "
            "compile=false to silence this"
        )
        return
    module.__dict__["_compiled"] = torch.compile(module.model, dynamic=False)


def cpp_compiler_found() -> bool:
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return False
    return True


def export_meta(module, tokens_per_step: int | None) -> dict:
    """What the export records of this run: its step, tokens (when steps have a token count), tokenizer and parent."""
    meta = {"step": module.global_step}
    if tokens_per_step:
        meta["tokens"] = module.global_step * tokens_per_step
    if module.tokenizer_dir:
        meta["tokenizer_dir"] = str(Path(module.tokenizer_dir))
    if module.parent:
        meta["parent"] = module.parent
    return meta


def common_report_items(module) -> dict:
    """The report card's lines every training stage has: model, optimizer, where it started, what it skipped."""
    items = {
        "model": module.model.config.summary(),
        "parameters": module.model.num_params(),
        "optimizer steps": module.global_step,
        "learning rates": lr_summary(module.optimizer_config, module.stepper.schedule),
    }
    if module.stepper.skipped:
        items["non-finite batches skipped"] = module.stepper.skipped
    for name, share in packing_stats(module).items():
        items[name.replace("_", " ")] = f"{100 * share:.2f} %"
    faults = data_faults(module)
    if faults:
        items["data faults skipped"] = ", ".join(f"{n:,} {name.replace('_', ' ')}" for name, n in faults.items())
    if module.parent:
        p = module.parent
        items["started from"] = f"{p.get('stage', '?')} step {p.get('step', '?')} ({p.get('export')})"
    return items


def start_fit(module) -> None:
    """At the start of fit: describe the run once, and open the first logging interval (resumed if restored)."""
    if module.trainer.is_global_zero:
        log.info(module.describe())
    module.meter.reset()
    module.meter.restore(module.meter.from_checkpoint)
    module.meter.from_checkpoint = None


def save_state(module, checkpoint: dict) -> None:
    """The module's part of a checkpoint beyond weights and optimizer: skipped batches and the partial logging
    interval, so a run resumed mid-interval logs the same averages as one never stopped."""
    checkpoint["nonfinite_skipped"] = module.stepper.skipped
    checkpoint["meter"] = module.meter.state()


def load_state(module, checkpoint: dict) -> None:
    module.stepper.skipped = checkpoint.get("nonfinite_skipped", 0)
    module.meter.from_checkpoint = checkpoint.get("meter")  # applied in start_fit, after the meter's reset


def lm_training_step(module, batch) -> None:
    """One optimizer step of a language-model stage (base, mid, SFT): backward over the micro-batches, the
    non-finite check, the scheduled step, and the interval's metrics."""
    opt = module.optimizers()
    step = module.global_step  # optimizer steps already taken
    loss, tokens = lm_backward(module, opt, batch)
    if not module.stepper.finite(module, opt, step, loss):
        return
    lrm = module.stepper(opt, step, module.num_iterations, module.device.type)
    module.meter.add(loss=loss, loss_steps=1)
    module.meter.steps += 1
    module.meter.tokens += tokens
    done = step + 1
    if done == UNTIMED_STEPS:
        module.meter.clock_at_untimed_end = module.meter.clock()
    if done % module.log_every == 0 or done == module.num_iterations:
        log_progress(module, done, lrm)


def micro_batches(batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) per micro-batch: packed rows (accum, B, T + 1) are shifted by one token; the chat
    stages' padded rows already come as (inputs, targets) pairs with -1 where nothing is trained."""
    if isinstance(batch, torch.Tensor):
        return [(rows[:, :-1], rows[:, 1:].contiguous()) for rows in batch]
    return list(batch)


def lm_backward(module, opt, batch) -> tuple[torch.Tensor, int]:
    """Forward and backward over a step's micro-batches (language-model loss); (mean loss, input tokens)."""
    forward = module.__dict__.get("_compiled", module.model)
    pairs = micro_batches(batch)
    accum = len(pairs)
    loss_sum = torch.zeros((), device=module.device)
    tokens = 0
    for i, (x, y) in enumerate(pairs):
        with opt.toggle_model(sync_grad=i == accum - 1):  # no DDP all-reduce on intermediate micro-batches
            loss = forward(x, y)  # mean over this micro-batch's targets that are not -1
            module.manual_backward(loss / accum)
        loss_sum += loss.detach()
        tokens += x.numel()
    return loss_sum / accum, tokens


def log_progress(module, done: int, lrm: float) -> None:
    """Log the interval's train/perf metrics and one progress line, then start the next interval."""
    m = module.meter
    loss = float(m.sums["loss"] / m.sums["loss_steps"])  # the one host-device sync per interval
    seconds = m.seconds()
    world = module.trainer.world_size
    tok_per_s = m.tokens * world / seconds
    mfu = module.model.flops_per_token() * tok_per_s / (peak_flops(module) * world)
    metrics = {
        "train/loss": loss,
        "train/lrm": lrm,
        "train/lr": lrm * module.optimizers().optimizer.param_groups[0]["initial_lr"],
        "perf/tok_per_s": tok_per_s,
        "perf/mfu": mfu,
        "perf/step_seconds": seconds / m.steps,
    }
    for name, count in data_faults(module).items():
        metrics[f"data/{name}"] = float(count)
    for name, share in packing_stats(module).items():
        metrics[f"data/{name}"] = share
    if module.stepper.skipped:
        metrics["train/nonfinite_skipped"] = float(module.stepper.skipped)
    log_scalars(module.trainer, metrics)  # at step = optimizer steps done, like the evaluation callbacks
    m.totals["tokens"] += m.tokens * world
    m.totals["seconds"] += seconds
    if module.trainer.is_global_zero:
        eta = (module.num_iterations - done) * seconds / m.steps
        log.info(
            f"step {done:6d}/{module.num_iterations} ({100 * done / module.num_iterations:5.1f}%) | loss {loss:.4f} | "
            f"lrm {lrm:.3f} | {tok_per_s:,.0f} tok/s | mfu {100 * mfu:.2f}% | eta {eta / 60:.1f} min"
        )
    m.reset()


def nanochat_training_time(module) -> str:
    """Training time as nanochat's leaderboard counts it: after the first UNTIMED_STEPS steps, evaluation excluded."""
    start = module.meter.clock_at_untimed_end
    if start is None:
        return f"n/a (this process trained fewer than {UNTIMED_STEPS + 1} steps from the start)"
    seconds = module.meter.clock() - start
    return f"{seconds / 60:.2f} min ({seconds:.1f} s; steps {UNTIMED_STEPS + 1} on, evaluation excluded)"


def throughput_items(module, tokens_per_step: str) -> dict:
    """Report lines on what was trained and how fast: tokens, FLOPs, time, throughput, MFU."""
    n, per_token = module.model.num_params(), module.model.flops_per_token()
    tokens, seconds = module.meter.totals["tokens"], max(module.meter.totals["seconds"], 1e-9)
    cpu = " of a matmul's measured FLOP/s (CPU)" if module.device.type == "cpu" else ""
    mfu = per_token * tokens / (seconds * peak_flops(module) * module.trainer.world_size)
    return {
        "FLOPs per token": f"{per_token:.3e}",
        "tokens per step": tokens_per_step,
        "tokens trained": tokens,
        "tokens : params": tokens / n,
        "training FLOPs": f"{per_token * tokens:.3e}",
        "training time": f"{seconds:.1f} s (evaluation excluded)",
        "throughput": f"{tokens / seconds:,.0f} tok/s",
        "MFU": f"{100 * mfu:.2f} %{cpu}",
    }
