"""pass@k on held-out questions (nanochat chat_rl's evaluation, spec 6.5): the RL stage's measure of progress.

Each question gets `k` completions at temperature 1.0 through the engine (calculator live); pass@j is the share
of questions where one of the first j passes the task's check, for j = 1..k. Seeds are fixed per question, so
the evaluation before RL and after it draw the same random numbers. Metrics: `chat/<task>_pass@<j>`.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from nanochat.callbacks.chat_eval import ChatEval, sample_passes

log = logging.getLogger(__name__)


def evaluate_pass_at_k(model, tokenizer, tasks: dict, k: int = 8, max_per_task: int = 400, max_new_tokens: int = 256,
                       temperature: float = 1.0, top_k: int | None = 50, rank: int = 0, world_size: int = 1,
                       reduce=None, show_progress: bool = False) -> dict:
    """{"tasks": [{"task", "examples", "pass": [pass@1..pass@k], "seconds"}], "metrics": {chat/<task>_pass@j}}."""
    from tqdm.auto import tqdm

    from nanochat.engine.engine import Engine

    engine = Engine(model, tokenizer, use_tools=True)
    device = next(model.parameters()).device
    rows, metrics = [], {}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        n = len(task) if max_per_task <= 0 else min(len(task), max_per_task)
        hits = torch.zeros(k, dtype=torch.float64)
        mine = range(rank, n, world_size)
        bar = tqdm(mine, desc=f"{name} pass@{k}", unit="question", disable=not (show_progress and sys.stderr.isatty()))
        for j in bar:
            passes = sample_passes(engine, tokenizer, task, task[j], k, max_new_tokens, temperature, top_k, seed=j)
            hits += torch.tensor(passes, dtype=torch.float64).cummax(0).values  # 1 from the first passing sample on
        hits = hits.to(device)
        if reduce is not None:
            hits = reduce(hits)
        rates = (hits / max(n, 1)).tolist()
        rows.append({"task": name, "examples": n, "pass": rates, "seconds": time.perf_counter() - t0})
        metrics.update({f"chat/{name}_pass@{j + 1}": rate for j, rate in enumerate(rates)})
    return {"tasks": rows, "metrics": metrics}


class PassAtK(ChatEval):
    """`chat/<task>_pass@1..k` at the start of training, every `every_n_steps` optimizer steps and at the end."""

    def __init__(self, tasks: list, k: int = 8, every_n_steps: int = 60, max_per_task: int = 400,
                 max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = 50, offline: bool = False,
                 at_start: bool = True):
        super().__init__(tasks, every_n_steps=every_n_steps, offline=offline)
        self.at_start = at_start
        self.settings = dict(k=k, max_per_task=max_per_task, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k)
        self.history: list[tuple[int, dict]] = []  # (optimizer step, result) of each evaluation during training

    def compute(self, model, tokenizer, data, rank, world_size, reduce, show_progress) -> dict:
        return evaluate_pass_at_k(model, tokenizer, data, rank=rank, world_size=world_size, reduce=reduce,
                                  show_progress=show_progress, **self.settings)

    def run(self, trainer, pl_module) -> None:
        super().run(trainer, pl_module)
        self.history.append((trainer.global_step, self.latest))

    def state_dict(self) -> dict:  # in the checkpoint: a resumed run's report still shows the evaluation before RL
        return {"history": self.history, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.last_step = state.get("last_step", -1)
        self.latest = self.history[-1][1] if self.history else None

    def log_latest(self, prefix: str = "", tasks: bool = True) -> None:
        for r in self.latest["tasks"]:
            rates = "  ".join(f"@{j + 1} {p:.4f}" for j, p in enumerate(r["pass"]))
            log.info(f"{prefix}{r['task']} pass{rates}  n={r['examples']}  {r['seconds']:.1f} s")

    def tables(self) -> list[dict]:
        k = self.settings["k"]
        history = self.history or [("-", self.latest)]  # stage=eval: one evaluation, at no training step
        columns = ["step", "task", "examples", *(f"pass@{j + 1}" for j in range(k)), "seconds"]
        rows = [[step, r["task"], r["examples"], *r["pass"], f"{r['seconds']:.1f}"]
                for step, result in history for r in result["tasks"]]
        return [{"title": f"pass@k on held-out questions (k = {k})", "columns": columns, "rows": rows}]

    def note(self) -> str:
        s, m = self.settings, self.settings["max_per_task"]
        return (f"pass@k: {'all' if m <= 0 else f'at most {m}'} questions per task, {s['k']} samples each at "
                f"temperature {s['temperature']}, top-k {s['top_k']}, at most {s['max_new_tokens']} new tokens; "
                f"the same seeds at every evaluation")
