"""RLModule: on-policy policy gradient on questions with checkable answers (nanochat chat_rl).

One `training_step` is one optimizer step over this rank's questions:

    prompt      the conversation up to the assistant's turn (render_for_completion)
    rollouts    `num_samples` completions through the engine, `device_batch_size` at a time (temperature, top-k,
                calculator live: its outputs are forced tokens with mask 0)
    rewards     r_i = reward(conversation, completion_i); advantages A_i = r_i - mean(r), / std(r) if normalize_std
    loss        per chunk of rows: -sum_t log p(token_t) A_i / (sampled tokens in the chunk x chunks x questions),
                over sampled tokens only (the stop token included); prompt, forced tool output and padding are -1.
                A chunk whose advantages are all 0 has zero gradient and is skipped (a weak model's usual case);
                if it is the step's last, whose backward carries DDP's all-reduce, one masked token stands in

This is nanochat's simplified GRPO: no KL term, no reference model, no ratio clipping, because each rollout batch
is used for exactly one gradient step while the weights are the ones that sampled it. The GPT, the optimizer and
its schedule are the other stages'; the lr is `init_lr_frac` (0.05) of the base lrs, decaying linearly to 0.
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch

from nanochat.callbacks.periodic import log_scalars
from nanochat.data.conversations import sft_pair
from nanochat.engine.engine import Engine
from nanochat.errors import UserError
from nanochat.models import stage_parts
from nanochat.optim import build_optimizer
from nanochat.settings import HorizonConfig, OptimizerConfig, ScheduleConfig

log = logging.getLogger(__name__)


def group_advantages(rewards: torch.Tensor, normalize_std: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """Each sample's reward minus its group's mean; with `normalize_std`, divided by the group's std (GRPO)."""
    advantages = rewards - rewards.mean()
    if normalize_std:
        advantages = advantages / (rewards.std(correction=0) + eps)
    return advantages


def policy_gradient_loss(
    model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, denominator: float = 1.0
) -> torch.Tensor:
    """-sum of log p(target) x the row's advantage over the targets that are not -1, / (their count x denominator)."""
    nll = model(inputs, targets, loss_reduction="none").view_as(targets)  # 0 where the target is -1
    valid = (targets >= 0).sum().clamp(min=1)
    return (nll * advantages.to(nll.dtype)[:, None]).sum() / (valid * denominator)


def rollout(
    engine: Engine,
    prompt_ids: list[int],
    num_samples: int,
    chunk: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(sequences, masks, completions) of `num_samples` samples, generated `chunk` rows at a time with seeds
    seed, seed + 1, ...; sequences keep the stop token (mask 1: stopping is the model's choice too), completions
    are the generated tokens without it. A prompt that fills the context gets empty completions."""
    budget = min(max_new_tokens, engine.max_context - len(prompt_ids))
    if budget <= 0:
        tail = prompt_ids[-2:]
        return (
            [list(tail) for _ in range(num_samples)],
            [[0, 0] for _ in range(num_samples)],
            [[] for _ in range(num_samples)],
        )
    sequences, masks = [], []
    for c, start in enumerate(range(0, num_samples, chunk)):
        rows, row_masks = engine.generate_batch(
            prompt_ids,
            min(chunk, num_samples - start),
            keep_stop=True,
            max_tokens=budget,
            temperature=temperature,
            top_k=top_k,
            seed=seed + c,
        )
        sequences += rows
        masks += row_masks
    n = len(prompt_ids)
    completions = [seq[n:-1] if len(seq) > n and seq[-1] in engine.stop_ids else seq[n:] for seq in sequences]
    return sequences, masks, completions


class RLModule(L.LightningModule):
    def __init__(
        self,
        *,
        stage: str,
        init_from: str | None,
        tokenizer_dir: str | None = None,
        num_samples: int = 16,
        device_batch_size: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = 50,
        normalize_std: bool = False,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        horizon: HorizonConfig | None = None,
        log_every: int = 1,
        on_nonfinite: str = "stop",
    ):
        if not init_from:
            raise UserError(
                f"stage={stage} starts from an earlier stage's model: set init_from=<run dir or export dir>"
            )
        if num_samples < 2:
            raise UserError(
                f"module.num_samples={num_samples}: the group-mean baseline needs at least 2 samples per question"
            )
        if device_batch_size < 1 or max_new_tokens < 1:
            raise UserError(
                f"module.device_batch_size={device_batch_size} and "
                f"module.max_new_tokens={max_new_tokens} must be positive"
            )
        super().__init__()
        self.automatic_optimization = False
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer, self.model, self.parent = stage_parts.build_gpt(
            depth=None, tokenizer_dir=tokenizer_dir, init_from=init_from
        )
        self.config = self.model.config
        self.optimizer_config = optimizer or OptimizerConfig()
        self.stepper = stage_parts.OptimizerStep(schedule or ScheduleConfig(), on_nonfinite)
        self.horizon = horizon or HorizonConfig()
        self.num_iterations = self.horizon.num_iterations if self.horizon.num_iterations > 0 else None
        self.log_every = log_every
        self.meter = stage_parts.Meter()
        self.num_samples, self.chunk, self.max_new_tokens = num_samples, device_batch_size, max_new_tokens
        self.temperature, self.top_k, self.normalize_std = temperature, top_k, normalize_std
        self.reward_history: list[tuple[int, float]] = []  # (steps done, mean reward of the interval), all ranks
        self.rollout_totals = {"samples": 0, "tokens": 0, "seconds": 0.0, "passes": 0, "skipped": 0}

    def fit_horizon(self, datamodule) -> int:
        """`epochs` passes over the questions, unless horizon.num_iterations set the number of steps."""
        if self.num_iterations is None:
            self.num_iterations = max(1, math.ceil(self.horizon.epochs * datamodule.steps_per_epoch()))
        return self.num_iterations

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optimizer_config)

    def on_fit_start(self) -> None:
        stage_parts.start_fit(self)

    def training_step(self, batch: list, batch_idx: int) -> None:
        opt = self.optimizers()
        step = self.global_step
        engine = Engine(self.model, self.tokenizer, use_tools=True)
        pad_id = self.tokenizer.token_id("<|assistant_end|>")
        chunks = math.ceil(self.num_samples / self.chunk)
        passes, done_passes = chunks * len(batch), 0  # forward/backward passes of this step, on every rank
        m = self.meter.sums
        for prompt in batch:
            prompt_ids = self.tokenizer.render_for_completion(prompt.conversation)
            t0 = time.perf_counter()
            sequences, masks, completions = rollout(
                engine,
                prompt_ids,
                self.num_samples,
                self.chunk,
                self.max_new_tokens,
                self.temperature,
                self.top_k,
                seed=seed_for(step, prompt.index),
            )
            self.meter.add(rollout_seconds=time.perf_counter() - t0)
            rewards = torch.tensor([score(prompt, self.tokenizer.decode(c)) for c in completions])
            advantages = group_advantages(rewards, self.normalize_std).to(self.device)
            for start in range(0, self.num_samples, self.chunk):
                done_passes += 1
                last = done_passes == passes
                chunk_advantages = advantages[start : start + self.chunk]
                self.meter.add(passes=1)
                rows = list(zip(sequences[start : start + self.chunk], masks[start : start + self.chunk]))
                if not chunk_advantages.any():  # its gradient is exactly zero
                    self.meter.add(skipped=1)
                    if not last:
                        continue
                    # the step's last backward carries DDP's all-reduce on every rank: one masked token is enough
                    rows, chunk_advantages = [(rows[0][0][:2], [0, 0])], chunk_advantages[:1]
                inputs, targets = (t.to(self.device) for t in sft_pair(rows, pad_id))
                with opt.toggle_model(sync_grad=last):  # DDP all-reduces on the last pass only
                    loss = policy_gradient_loss(self.model, inputs, targets, chunk_advantages, chunks * len(batch))
                    self.manual_backward(loss)
                self.meter.add(loss=loss.item())
            self.meter.add(
                reward=rewards.sum().item(),
                solved=float(rewards.max().item() > 0),
                samples=self.num_samples,
                questions=1,
                generated=sum(len(c) for c in completions),
            )
        if not self.stepper.finite(self, opt, step, None):
            return
        lrm = self.stepper(opt, step, self.num_iterations, self.device.type)
        m["loss_steps"] = m.get("loss_steps", 0) + 1
        self.meter.steps += 1
        done = step + 1
        if done % self.log_every == 0 or done == self.num_iterations:
            self._log_rl(done, lrm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:  # the report of a resumed run covers the whole run
        stage_parts.save_state(self, checkpoint)
        checkpoint["rl"] = {
            "reward_history": self.reward_history,
            "rollout_totals": self.rollout_totals,
            "seconds": self.meter.totals["seconds"],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stage_parts.load_state(self, checkpoint)
        state = checkpoint.get("rl", {})
        self.reward_history = [tuple(x) for x in state.get("reward_history", [])]
        self.rollout_totals.update(state.get("rollout_totals", {}))
        self.meter.totals["seconds"] = state.get("seconds", 0.0)

    # --- metrics ----------------------------------------------------------------------------------
    def _log_rl(self, done: int, lrm: float) -> None:
        m = self.meter.sums
        keys = ("loss", "reward", "solved", "samples", "questions", "generated", "passes", "skipped")
        summed = torch.tensor([m.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.device)
        summed = dict(zip(keys, self.trainer.strategy.reduce(summed, reduce_op="sum").tolist()))
        world = self.trainer.world_size
        seconds = self.meter.seconds()
        steps = self.meter.steps
        reward = summed["reward"] / summed["samples"]
        rollout_seconds = m.get("rollout_seconds", 0.0)
        tok_per_s = summed["generated"] / max(rollout_seconds, 1e-9)  # ranks sample in parallel
        metrics = {
            "rl/reward": reward,
            "rl/solved": summed["solved"] / summed["questions"],
            "rl/seq_len": summed["generated"] / summed["samples"],
            "train/loss": summed["loss"] / (m["loss_steps"] * world),
            "train/lrm": lrm,
            "train/lr": lrm * self.optimizers().optimizer.param_groups[0]["initial_lr"],
            "perf/rollout_tok_per_s": tok_per_s,
            "perf/step_seconds": seconds / steps,
        }
        log_scalars(self.trainer, metrics)
        self.reward_history.append((done, reward))
        t = self.rollout_totals
        t["samples"] += int(summed["samples"])
        t["tokens"] += int(summed["generated"])
        t["passes"] += int(summed["passes"])
        t["skipped"] += int(summed["skipped"])
        t["seconds"] += rollout_seconds
        self.meter.totals["seconds"] += seconds
        if self.trainer.is_global_zero:
            eta = (self.num_iterations - done) * seconds / steps
            log.info(
                f"step {done:5d}/{self.num_iterations} | reward {reward:.4f} | solved {metrics['rl/solved']:.3f} | "
                f"len {metrics['rl/seq_len']:.0f} | lrm {lrm:.3f} | rollouts {tok_per_s:,.0f} tok/s | "
                f"{seconds / steps:.1f} s/step | eta {eta / 60:.1f} min"
            )
        self.meter.reset()

    def describe(self) -> str:
        parent = self.parent or {}
        return (
            f"model {self.config.summary()}, {self.model.num_params():,} params, "
            f"from {parent.get('stage', '?')} step {parent.get('step', '?')} in {parent.get('export')}\n"
            f"horizon: {self.num_iterations:,} steps, lr x {self.stepper.schedule.init_lr_frac}\n"
            f"rollouts: {self.num_samples} samples per question, {self.chunk} per forward, "
            f"temperature {self.temperature}, top-k {self.top_k}, at most {self.max_new_tokens} new tokens; "
            f"advantage {self.advantage_rule()}"
        )

    def advantage_rule(self) -> str:
        return "reward - group mean" + (" / group std" if self.normalize_std else "")

    def report_items(self) -> dict:
        items = {
            k: v
            for k, v in stage_parts.common_report_items(self).items()
            if k in ("model", "parameters", "optimizer steps", "learning rates", "started from")
        }
        t = self.rollout_totals
        datamodule = self.trainer.datamodule
        items.update(
            {
                "questions per step": datamodule.examples_per_step,
                "samples per question": self.num_samples,
                "sampling": f"temperature {self.temperature}, top-k {self.top_k}, at most {self.max_new_tokens} new "
                f"tokens, calculator on",
                "reward": reward_name(datamodule.reward)
                if datamodule.reward is not None
                else ", ".join(f"{task.name}.reward" for task in dict.fromkeys(datamodule.train_mixture.tasks)),
                "advantage": self.advantage_rule(),
                "samples generated": t["samples"],
                "tokens generated": t["tokens"],
                "rollout throughput": f"{t['tokens'] / max(t['seconds'], 1e-9):,.0f} tok/s (rank 0's sampling time)",
                "update passes": (
                    f"{t['passes']:,} of up to {self.chunk} samples, {t['skipped']:,} skipped (all advantages 0)"
                ),
                "training time": f"{self.meter.totals['seconds']:.1f} s (evaluation excluded)",
            }
        )
        h = self.reward_history
        if h:

            def steps(i: int) -> str:  # the optimizer steps a logged mean covers
                lo, hi = (h[i - 1][0] + 1 if i else 1), h[i][0]
                return f"step {hi}" if lo == hi else f"steps {lo}-{hi}"

            items["mean reward"] = f"{h[0][1]:.4f} ({steps(0)}) -> {h[-1][1]:.4f} ({steps(len(h) - 1)})"
        return items

    def export_meta(self) -> dict:
        return stage_parts.export_meta(self, None)


def score(prompt, completion: str) -> float:
    """The prompt's reward for one completion, as a finite float; a reward that fails says so in one line."""
    name = reward_name(prompt.reward)
    try:
        value = float(prompt.reward(prompt.conversation, completion))
    except Exception as e:  # a user's reward: name it and the question, not a traceback through the trainer
        raise UserError(f"reward {name} failed on question {prompt.index}: {type(e).__name__}: {e}") from e
    if not math.isfinite(value):
        raise UserError(f"reward {name} returned {value} on question {prompt.index}; rewards must be finite numbers")
    return value


def reward_name(reward) -> str:
    fn = getattr(reward, "func", reward)  # a Hydra `_partial_` function (or functools.partial): what it wraps
    return getattr(fn, "__qualname__", type(fn).__name__)


def seed_for(step: int, index: int) -> int:
    """A different stream of samples for each question at each step, the same on a re-run."""
    return (step * 1_000_003 + index * 7_919) % 2**31
