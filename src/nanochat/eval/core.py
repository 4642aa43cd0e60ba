"""CORE: centered accuracy on DCLM's in-context-learning tasks, during training and standalone.

Per example, every prompt (one per choice or context option) is tokenized with <|bos|> first, the rows are
right-padded with <|bos|> and scored in one forward pass. Which tokens count:
  multiple choice   the tokens after the prompts' common prefix (the choice); lowest mean loss wins
  schema            the prompts' common suffix (the shared continuation); lowest mean loss wins
  language model    the continuation; correct only if greedy argmax reproduces every token of it
CORE = mean centered accuracy over the tasks that ran; the result says how many of the 22 that was.
Examples are strided over ranks and the per-example outcomes summed across them.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
import torch.nn.functional as F

from nanochat.errors import DataUnavailable
from nanochat.eval.evaluator import Evaluator
from nanochat.tasks.core_bundle import CoreBundle, CoreTask, fewshot_examples, load_bundle, render_prompts

log = logging.getLogger(__name__)


def common_length(rows: list[list[int]], from_end: bool = False) -> int:
    """How many leading (or trailing) tokens all rows share."""
    n = min(len(r) for r in rows)
    for i in range(n):
        pos = -1 - i if from_end else i
        if any(r[pos] != rows[0][pos] for r in rows):
            return i
    return n


def scored_spans(task_type: str, rows: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """(rows to run, [start, end) of the scored tokens in each)."""
    if task_type == "language_modeling":
        without, full = rows
        return [full], [(min(common_length([without, full]), len(full) - 1), len(full))]
    if task_type == "schema":
        suffix = common_length(rows, from_end=True)
        return rows, [(len(r) - suffix, len(r)) for r in rows]
    prefix = common_length(rows)
    return rows, [(min(prefix, len(r) - 1), len(r)) for r in rows]  # a choice always scores >= 1 token


def crop_left(rows: list[list[int]], spans: list[tuple[int, int]], limit: int):
    """Drop tokens from the left (after <|bos|>) so each row fits `limit` positions; the scored end is kept."""
    cut = [max(0, len(r) - limit) for r in rows]
    rows = [r[:1] + r[1 + c :] if c else r for r, c in zip(rows, cut)]
    return rows, [(max(1, s - c), e - c) for (s, e), c in zip(spans, cut)]


@torch.no_grad()
def score_example(model, task_type: str, rows: list[list[int]], spans, pad_id: int, gold: int | None) -> bool:
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    logits = model(ids)  # (rows, T, vocab); position t predicts token t + 1
    if task_type == "language_modeling":
        ((start, end),) = spans
        return bool((logits[0, start - 1 : end - 1].argmax(-1) == ids[0, start:end]).all())
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    means = [losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(spans)]
    return means.index(min(means)) == gold


def evaluate_task(
    model, tokenizer, task: CoreTask, data: list[dict], rank: int = 0, world_size: int = 1, reduce=None, progress=None
) -> tuple[float, int]:
    """(accuracy, examples whose prompts were cropped to fit the model) on `data`, this task's examples."""
    bos = tokenizer.bos_token_id
    limit = getattr(model, "rotary_len", None) or 10**9
    device = next(model.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, cropped
    for index in range(rank, len(data), world_size):
        item = data[index]
        prompts = render_prompts(task.task_type, item, task.delimiter, fewshot_examples(data, index, task.num_fewshot))
        rows, spans = scored_spans(task.task_type, [tokenizer.encode(p, prepend=bos) for p in prompts])
        cropped = max(len(r) for r in rows) > limit
        rows, spans = crop_left(rows, spans, limit)
        counts[0] += score_example(model, task.task_type, rows, spans, bos, item.get("gold"))
        counts[1] += cropped
        if progress is not None:
            progress.update(1)
    if reduce is not None:
        counts = reduce(counts)
    correct, cropped = counts.tolist()
    return correct / len(data), int(cropped)


def evaluate_core(
    model,
    tokenizer,
    bundle: CoreBundle,
    max_per_task: int = -1,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
    show_progress: bool = False,
) -> dict:
    """{"score", "coverage", "tasks": [per-task rows], "metrics": {core/score, core/<label>}} for one model."""
    from tqdm.auto import tqdm

    rows = []
    datasets = [task.examples(max_per_task) for task in bundle.tasks]
    mine = sum(len(range(rank, len(data), world_size)) for data in datasets)
    with tqdm(total=mine, desc="CORE", unit="example", disable=not (show_progress and sys.stderr.isatty())) as bar:
        for task, data in zip(bundle.tasks, datasets):
            t0 = time.perf_counter()
            bar.set_postfix_str(task.label)
            accuracy, cropped = evaluate_task(model, tokenizer, task, data, rank, world_size, reduce, bar)
            rows.append(
                {
                    "task": task.label,
                    "type": task.task_type,
                    "shots": task.num_fewshot,
                    "examples": len(data),
                    "accuracy": accuracy,
                    "baseline": task.baseline / 100,
                    "centered": task.centered(accuracy),
                    "cropped": cropped,
                    "seconds": time.perf_counter() - t0,
                }
            )
            if show_progress:  # as each task finishes: a long run shows where it is in plain logs too
                log_task(rows[-1])
    score = sum(r["centered"] for r in rows) / len(rows) if rows else float("nan")
    metrics = {"core/score": score, **{f"core/{r['task']}": r["centered"] for r in rows}}
    return {"score": score, "coverage": bundle.coverage(), "tasks": rows, "metrics": metrics}


def core_table(result: dict) -> dict:
    """The per-task results as a report table."""
    columns = ["task", "type", "shots", "examples", "accuracy", "baseline", "centered", "seconds"]
    rows = [[f"{r[c]:.1f}" if c == "seconds" else r[c] for c in columns] for r in result["tasks"]]
    total = sum(r["seconds"] for r in result["tasks"])
    rows.append(["CORE", f"mean centered, {result['coverage']}", "", "", "", "", result["score"], f"{total:.1f}"])
    return {"title": "CORE", "columns": columns, "rows": rows}


def log_task(r: dict, prefix: str = "") -> None:
    note = f" ({r['cropped']} prompts cropped to fit)" if r["cropped"] else ""
    log.info(
        f"{prefix}CORE {r['task']:34s} acc {r['accuracy']:.4f}  centered {r['centered']:+.4f}  "
        f"n={r['examples']}  {r['seconds']:.1f} s{note}"
    )


def log_core(result: dict, prefix: str = "", tasks: bool = True) -> None:
    for r in result["tasks"] if tasks else ():
        log_task(r, prefix)
    log.info(f"{prefix}CORE score {result['score']:.4f} over {result['coverage']}")


class CoreEval(Evaluator):
    """`core/score` and `core/<task>` on the bundle at `bundle_dir`; without one, an error (`required`) or a warning
    and no evaluation (training goes on). `reference` ({name, score}, e.g. GPT-2's 0.256525): the log and the report
    compare the score with it."""

    def __init__(
        self,
        bundle_dir: str,
        max_per_task: int = -1,
        baselines: str = "eval_meta_data.csv",
        tasks: list[str] | None = None,
        required: bool = True,
        reference: dict | None = None,
    ):
        super().__init__()
        self.reference = dict(reference) if reference else None
        self.bundle_dir, self.baselines, self.only = bundle_dir, baselines, tasks
        self.max_per_task = max_per_task
        self.required = required
        self.bundle: CoreBundle | None = None

    def load(self) -> CoreBundle | None:
        if self.bundle is None:
            try:
                self.bundle = load_bundle(self.bundle_dir, self.baselines, self.only)
            except DataUnavailable as e:
                if self.required:
                    raise
                log.warning(f"CORE evaluation off: {e}")
        return self.bundle

    def compute(self, model, tokenizer, data, rank, world_size, reduce, show_progress) -> dict:
        return evaluate_core(model, tokenizer, data, self.max_per_task, rank, world_size, reduce, show_progress)

    def log_latest(self, prefix: str = "", tasks: bool = True) -> None:
        log_core(self.latest, prefix, tasks)
        if self.reference:
            log.info(f"{prefix}{self.against_reference()}")

    def against_reference(self) -> str:
        name, target, score = self.reference["name"], self.reference["score"], self.latest["score"]
        verdict = "reached" if score >= target else "not reached"
        return f"CORE {score:.4f} vs {name}'s {target:.6g}: {score - target:+.4f} ({verdict})"

    def tables(self) -> list[dict]:
        return [core_table(self.latest)]

    def note(self) -> str:
        note = f"CORE over {self.latest['coverage']}, max {self.max_per_task} examples per task"
        return f"{note}; {self.against_reference()}" if self.reference else note
