"""The CORE benchmark bundle (DCLM; nanochat's base_eval): which tasks, their examples, their prompts.

    <bundle>/core.yaml                 icl_tasks: label, dataset_uri, icl_task_type, num_fewshot, continuation_delimiter
    <bundle>/eval_meta_data.csv        `Eval Task`, `Random baseline` (percent) per label
    <bundle>/eval_data/<dataset_uri>   one example per jsonl line

Three task types: multiple_choice (`query`, `choices`, `gold`), schema (`context_options`, `continuation`,
`gold`) and language_modeling (`context`, `continuation`). Examples are shuffled with random.Random(1337) and
optionally cut to `max_per_task`; example i's few-shot examples are random.Random(1234 + i).sample of the others.
Scoring (which tokens of each prompt count, and how) is in nanochat.eval.core.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.errors import DataUnavailable, UserError

CORE_TASK_COUNT = 22  # DCLM's low-variance set; a bundle lacking some files covers fewer, and says so
FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
FETCH_HINT = "nanochat data fetch eval_bundle"


@dataclass
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # accuracy of random guessing, in percent
    path: Path

    def examples(self, max_per_task: int = -1) -> list[dict]:
        data = read_examples(self.path, self.task_type)
        random.Random(1337).shuffle(data)
        return data[:max_per_task] if max_per_task > 0 else data

    def centered(self, accuracy: float) -> float:
        """Accuracy rescaled so random guessing scores 0 and a perfect model 1."""
        b = 0.01 * self.baseline
        return (accuracy - b) / (1.0 - b)


@dataclass
class CoreBundle:
    root: Path
    tasks: list[CoreTask]
    missing: list[str] = field(default_factory=list)  # labels listed in core.yaml whose data file is absent

    def coverage(self) -> str:
        listed = len(self.tasks) + len(self.missing)
        text = f"{len(self.tasks)} of {max(listed, CORE_TASK_COUNT)} tasks"
        return text + (f" (missing: {', '.join(self.missing)})" if self.missing else "")


def load_bundle(root: str | Path, baselines: str = "eval_meta_data.csv", only: list[str] | None = None) -> CoreBundle:
    """The tasks of `root/core.yaml` whose files exist (the others listed in `missing`); `only` keeps those labels."""
    import yaml

    root = Path(root).expanduser()
    if not (root / "core.yaml").is_file():
        what = "does not exist" if not root.exists() else "has no core.yaml"
        raise DataUnavailable(
            f"CORE eval bundle {root} {what}; fetch it with `{FETCH_HINT}` or point eval bundle_dir at one"
        )
    try:
        entries = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8"))["icl_tasks"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UserError(f"{root / 'core.yaml'} is not a CORE task list with `icl_tasks` ({e})") from None
    random_baselines = read_baselines(root / baselines)
    tasks, missing = [], []
    for entry in entries:
        label = entry.get("label")
        if only and label not in only:
            continue
        task_type = entry.get("icl_task_type")
        if task_type not in FIELDS:
            raise UserError(
                f"{root / 'core.yaml'}: task {label!r} has icl_task_type {task_type!r}, not one of {', '.join(FIELDS)}"
            )
        if label not in random_baselines:
            raise UserError(f"{root / baselines} has no `Random baseline` for CORE task {label!r}")
        shots = entry.get("num_fewshot", [0])
        path = root / "eval_data" / entry["dataset_uri"]
        task = CoreTask(
            label,
            task_type,
            int(shots[0] if isinstance(shots, list) else shots),
            entry.get("continuation_delimiter", " "),
            random_baselines[label],
            path,
        )
        (tasks.append(task) if path.is_file() else missing.append(label))
    if only and (unknown := sorted(set(only) - {t.label for t in tasks} - set(missing))):
        raise UserError(f"CORE tasks {unknown} are not in {root / 'core.yaml'}")
    return CoreBundle(root, tasks, missing)


def read_baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise UserError(f"the CORE bundle has no {path.name} (random baselines per task) at {path}")
    with open(path, newline="", encoding="utf-8") as f:
        try:
            return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        except (KeyError, ValueError) as e:
            raise UserError(f"{path} needs numeric `Eval Task` / `Random baseline` columns ({e})") from None


def read_examples(path: Path, task_type: str) -> list[dict]:
    """Every example of a jsonl file, checked for the fields its task type scores; errors name file and line."""
    need = FIELDS[task_type]
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e})") from None
            if not isinstance(example, dict) or any(k not in example for k in need):
                raise UserError(f"{path}:{lineno}: a {task_type} example needs the fields {', '.join(need)}")
            options = example.get("choices", example.get("context_options"))
            if "gold" in need and not (isinstance(example["gold"], int) and 0 <= example["gold"] < len(options)):
                raise UserError(
                    f"{path}:{lineno}: gold={example['gold']!r} is not an index into its {len(options)} options"
                )
            examples.append(example)
    if not examples:
        raise UserError(f"{path} has no examples")
    return examples


def fewshot_examples(data: list[dict], index: int, k: int) -> list[dict]:
    """k examples other than `index`, the same ones every run (and fewer only when the list is that short)."""
    if k <= 0:
        return []
    others = [i for i in range(len(data)) if i != index]
    return [data[i] for i in random.Random(1234 + index).sample(others, min(k, len(others)))]


def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """The texts to score: one per choice (multiple choice), per context option (schema), or the prompt without
    and with the continuation (language modelling). Few-shot blocks end in a blank line."""
    if task_type == "multiple_choice":
        shots = "".join(f"{e['query']}{delimiter}{e['choices'][e['gold']]}\n\n" for e in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{e['context_options'][e['gold']]}{delimiter}{e['continuation']}\n\n" for e in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    shots = "".join(f"{e['context'].strip()}{delimiter}{e['continuation']}\n\n" for e in fewshot)
    prompt = f"{shots}{item['context'].strip()}{delimiter}"
    # Stripped so its tokens are a prefix of the full text's: a trailing space would merge into the next token.
    return [prompt.strip(), prompt + item["continuation"]]
