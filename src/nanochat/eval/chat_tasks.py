"""Chat evaluation (nanochat chat_eval): task accuracies of a chat model and ChatCORE.

    categorical (ARC, MMLU)     the logits after <|assistant_start|>, restricted to the answer letters; argmax == gold
    generative (GSM8K, HumanEval, SpellingBee)
                                `num_samples` completions through the engine (calculator live); passes if any
                                passes the task's own check (#### answer, or the HumanEval tests in the sandbox)
    ChatCORE                    mean centered accuracy (baseline 0.25 categorical, 0 generative) over the tasks
                                that ran, with their names

Examples are strided over ranks; the counts are summed across them. Metrics: `chat/<task>`, `chat/chatcore`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

import torch

from nanochat.errors import UserError
from nanochat.eval.evaluator import Evaluator

log = logging.getLogger(__name__)

CATEGORICAL_BASELINE = 0.25  # nanochat's, for ARC-Easy, ARC-Challenge and MMLU alike


@torch.no_grad()
def categorical_correct(model, tokenizer, conversations: list[dict]) -> int:
    """How many of the conversations' gold letters get the highest logit among their letters (one forward)."""
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([p + [tokenizer.bos_token_id] * (width - len(p)) for p in prompts], device=device)
    logits = model(ids)
    correct = 0
    for row, (prompt, conversation) in enumerate(zip(prompts, conversations)):
        letters = conversation["letters"]
        letter_ids = [letter_token(tokenizer, letter) for letter in letters]
        scores = logits[row, len(prompt) - 1, letter_ids]
        correct += letters[int(scores.argmax())] == conversation["messages"][-1]["content"]
    return correct


def letter_token(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise UserError(
            f"answer letter {letter!r} is {len(ids)} tokens in this tokenizer; categorical scoring needs one"
        )
    return ids[0]


def sample_passes(
    engine,
    tokenizer,
    task,
    conversation: dict,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> list[bool]:
    """Whether each of `num_samples` completions passes the task's check (all False when no answer fits)."""
    prompt = tokenizer.render_for_completion(conversation)
    budget = min(max_new_tokens, engine.max_context - len(prompt))
    if budget <= 0:
        return [False] * num_samples  # the question alone fills the context: no room to answer
    rows, _ = engine.generate_batch(
        prompt, num_samples, max_tokens=budget, temperature=temperature, top_k=top_k, seed=seed
    )
    return [bool(task.evaluate(conversation, tokenizer.decode(row[len(prompt) :]))) for row in rows]


def evaluate_chat(
    model,
    tokenizer,
    tasks: Mapping[str, object],
    max_per_task: int = -1,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
    show_progress: bool = False,
) -> dict:
    """{"tasks": [per-task rows], "chatcore", "chatcore_tasks", "metrics": {chat/<task>, chat/chatcore}}."""
    from tqdm.auto import tqdm

    from nanochat.engine.engine import Engine

    engine = Engine(model, tokenizer, use_tools=True)
    device = next(model.parameters()).device
    limits = {name: len(task) if max_per_task <= 0 else min(len(task), max_per_task) for name, task in tasks.items()}
    rows = []
    total = sum(len(range(rank, n, world_size)) for n in limits.values())
    with tqdm(
        total=total, desc="chat eval", unit="example", disable=not (show_progress and sys.stderr.isatty())
    ) as bar:
        for name, task in tasks.items():
            t0 = time.perf_counter()
            bar.set_postfix_str(name)
            n = limits[name]
            mine = list(range(rank, n, world_size))
            correct = 0
            if task.eval_type == "categorical":
                for i in range(0, len(mine), batch_size):
                    correct += categorical_correct(model, tokenizer, [task[j] for j in mine[i : i + batch_size]])
                    bar.update(len(mine[i : i + batch_size]))
            else:
                for j in mine:
                    correct += any(
                        sample_passes(
                            engine, tokenizer, task, task[j], num_samples, max_new_tokens, temperature, top_k, seed=j
                        )
                    )
                    bar.update(1)
            counts = torch.tensor([float(correct)], dtype=torch.float64, device=device)
            if reduce is not None:
                counts = reduce(counts)
            accuracy = counts.item() / n if n else float("nan")
            baseline = CATEGORICAL_BASELINE if task.eval_type == "categorical" else 0.0
            rows.append(
                {
                    "task": name,
                    "type": task.eval_type,
                    "examples": n,
                    "accuracy": accuracy,
                    "baseline": baseline,
                    "centered": (accuracy - baseline) / (1 - baseline),
                    "seconds": time.perf_counter() - t0,
                }
            )
            if show_progress:
                log_task(rows[-1])
    ran = [r for r in rows if r["examples"]]
    chatcore = sum(r["centered"] for r in ran) / len(ran) if ran else float("nan")
    metrics = {f"chat/{r['task']}": r["accuracy"] for r in ran}
    if ran:
        metrics["chat/chatcore"] = chatcore
    return {"tasks": rows, "chatcore": chatcore, "chatcore_tasks": [r["task"] for r in ran], "metrics": metrics}


def chat_table(result: dict) -> dict:
    columns = ["task", "type", "examples", "accuracy", "baseline", "centered", "seconds"]
    rows = [[f"{r[c]:.1f}" if c == "seconds" else r[c] for c in columns] for r in result["tasks"]]
    rows.append(
        [
            "ChatCORE",
            f"mean centered over {', '.join(result['chatcore_tasks'])}",
            "",
            "",
            "",
            result["chatcore"],
            f"{sum(r['seconds'] for r in result['tasks']):.1f}",
        ]
    )
    return {"title": "Chat evaluation", "columns": columns, "rows": rows}


def build_eval_tasks(entries: list) -> dict:
    """{metric name: Task} from mixture-style entries (`label` renames one) or Task objects (named by `.name`);
    `optional` entries without data are skipped."""
    from nanochat.tasks.base import Task
    from nanochat.tasks.registry import build_entry, entry_name

    tasks = {}
    for entry in entries:
        label = None
        if not isinstance(entry, Task):
            entry = dict(entry)
            label = entry.pop("label", None)
        task = build_entry(entry)
        if task is not None:
            tasks[label or entry_name(entry)] = task
    return tasks


def load_eval_tasks(entries: list, offline: bool) -> dict:
    """`build_eval_tasks`, reading hub datasets from the local cache only when `offline`."""
    from nanochat.tasks.sources import hub_offline

    if offline:
        hub_offline()
    return build_eval_tasks(entries)


class ChatEval(Evaluator):
    """`chat/<task>` accuracies and `chat/chatcore` on the tasks of `tasks` (mixture-style entries)."""

    def __init__(
        self,
        tasks: list[Mapping],
        max_per_task: int = -1,
        num_samples: int = 1,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_k: int | None = 50,
        batch_size: int = 8,
        offline: bool = False,
    ):
        super().__init__()
        self.entries, self.offline = list(tasks), offline
        self.settings = dict(
            max_per_task=max_per_task,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            batch_size=batch_size,
        )
        self.tasks: dict | None = None

    def load(self) -> dict:
        if self.tasks is None:
            self.tasks = load_eval_tasks(self.entries, self.offline)
        return self.tasks

    def compute(self, model, tokenizer, data, rank, world_size, reduce, show_progress) -> dict:
        return evaluate_chat(
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
        log_chat(self.latest, prefix, tasks)

    def tables(self) -> list[dict]:
        return [chat_table(self.latest)]

    def note(self) -> str:
        m = self.settings["max_per_task"]
        return (
            f"chat evaluation: {'all' if m <= 0 else f'at most {m}'} examples per task, "
            f"{self.settings['num_samples']} sample(s) at temperature {self.settings['temperature']}"
        )


def log_task(r: dict, prefix: str = "") -> None:
    log.info(
        f"{prefix}chat {r['task']:14s} acc {r['accuracy']:.4f}  centered {r['centered']:+.4f}  "
        f"n={r['examples']}  {r['seconds']:.1f} s"
    )


def log_chat(result: dict, prefix: str = "", tasks: bool = True) -> None:
    for r in result["tasks"] if tasks else ():
        log_task(r, prefix)
    log.info(f"{prefix}ChatCORE {result['chatcore']:.4f} over {', '.join(result['chatcore_tasks'])}")
