"""pass@k on held-out questions (nanochat chat_rl's evaluation): the RL stage's measure of progress.

Each question gets `k` completions at temperature 1.0 through the engine (calculator live); pass@j is the share
of questions where one of the first j passes the task's check, for j = 1..k. Seeds are fixed per question, so
the evaluation before RL and after it draw the same random numbers. Metrics: `chat/<task>_pass@<j>`.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from nanochat.eval.chat_tasks import load_eval_tasks, sample_passes
from nanochat.eval.evaluator import Evaluator

log = logging.getLogger(__name__)


def evaluate_pass_at_k(
    model,
    tokenizer,
    tasks: dict,
    *,
    k: int,
    max_per_task: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
    show_progress: bool = False,
) -> dict:
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


class PassAtK(Evaluator):
    """`chat/<task>_pass@1..k` on the held-out questions of `tasks` (mixture-style entries)."""

    def __init__(
        self,
        tasks: list,
        k: int = 8,
        max_per_task: int = 400,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = 50,
        offline: bool = False,
    ):
        super().__init__()
        self.entries, self.offline = list(tasks), offline
        self.settings = dict(
            k=k, max_per_task=max_per_task, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k
        )
        self.tasks: dict | None = None

    def load(self) -> dict:
        if self.tasks is None:
            self.tasks = load_eval_tasks(self.entries, self.offline)
        return self.tasks

    def compute(self, model, tokenizer, data, rank, world_size, reduce, show_progress) -> dict:
        return evaluate_pass_at_k(
            model,
            tokenizer,
            data,
            rank=rank,
            world_size=world_size,
            reduce=reduce,
            show_progress=show_progress,
            **self.settings,
        )

    def log_latest(self, prefix: str = "", tasks: bool = True) -> None:
        for r in self.latest["tasks"]:
            rates = "  ".join(f"@{j + 1} {p:.4f}" for j, p in enumerate(r["pass"]))
            log.info(f"{prefix}{r['task']} pass{rates}  n={r['examples']}  {r['seconds']:.1f} s")

    def tables(self) -> list[dict]:
        k = self.settings["k"]
        history = self.history or [("-", self.latest)]  # stage=eval: one evaluation, at no training step
        columns = ["step", "task", "examples", *(f"pass@{j + 1}" for j in range(k)), "seconds"]
        rows = [
            [step, r["task"], r["examples"], *r["pass"], f"{r['seconds']:.1f}"]
            for step, result in history
            for r in result["tasks"]
        ]
        return [{"title": f"pass@k on held-out questions (k = {k})", "columns": columns, "rows": rows}]

    def note(self) -> str:
        s, m = self.settings, self.settings["max_per_task"]
        return (
            f"pass@k: {'all' if m <= 0 else f'at most {m}'} questions per task, {s['k']} samples each at "
            f"temperature {s['temperature']}, top-k {s['top_k']}, at most {s['max_new_tokens']} new tokens; "
            f"the same seeds at every evaluation"
        )
