"""Task names for configs, and `build_mixture` to turn a list of entries into one shuffled TaskMixture.

An entry is `{"name": "gsm8k", "split": "train", "epochs": 1, "start": 0, "stop": None, **loader_kwargs}`;
`epochs: n` lists the same task n times (n passes over it in one mixture); `optional: true` skips the entry,
with a warning, when its data is not on this machine (bad data is an error either way).
An entry may also be a Task object: in a config, `{_target_: my_package.MyTask, ...}`, which Hydra builds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from nanochat.errors import DataUnavailable, UserError
from nanochat.tasks.arc import ARCChallenge, ARCEasy
from nanochat.tasks.arithmetic import Arithmetic, ArithmeticChoice
from nanochat.tasks.base import Task, TaskMixture
from nanochat.tasks.custom_json import CustomJSON
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.identity import Identity
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spelling import SimpleSpelling, SpellingBee

log = logging.getLogger(__name__)

TASKS: dict[str, type[Task]] = {
    "gsm8k": GSM8K,
    "mmlu": MMLU,
    "arc_easy": ARCEasy,
    "arc_challenge": ARCChallenge,
    "humaneval": HumanEval,
    "smoltalk": SmolTalk,
    "custom_json": CustomJSON,
    "spelling_bee": SpellingBee,
    "simple_spelling": SimpleSpelling,
    # generated, no download (mixture=builtin)
    "arithmetic": Arithmetic,
    "arithmetic_choice": ArithmeticChoice,
    "identity": Identity,
}


def build_task(entry: Mapping | Task) -> Task:
    """One task from an entry (its `epochs` key is ignored here)."""
    if isinstance(entry, Task):
        return entry
    kwargs = dict(entry)
    name = kwargs.pop("name", None)
    kwargs.pop("epochs", None)
    kwargs.pop("optional", None)
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    kwargs = {k: v for k, v in kwargs.items() if not (k in ("split", "stop") and v is None)}
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise UserError(f"task {name!r} got bad arguments {sorted(kwargs)}: {e}") from e


def entry_name(entry: Mapping | Task) -> str | None:
    return entry.name if isinstance(entry, Task) else entry.get("name")


def build_entry(entry: Mapping | Task) -> Task | None:
    """The entry's task, or None (said in a warning) when it is `optional` and its data is not on this machine."""
    try:
        return build_task(entry)
    except DataUnavailable as e:
        if isinstance(entry, Task) or not entry.get("optional", False):
            raise
        log.warning(f"skipping optional task {entry_name(entry)!r}: {e}")
        return None


def build_mixture(entries: list[Mapping | Task], seed: int = 42) -> TaskMixture:
    tasks = []
    for entry in entries:
        epochs = 1 if isinstance(entry, Task) else int(entry.get("epochs", 1))
        if epochs < 1:
            raise UserError(f"task {entry_name(entry)!r} has epochs={epochs}; it must be at least 1")
        task = build_entry(entry)
        if task is not None:
            tasks.extend([task] * epochs)
    if not tasks:
        raise UserError(f"the mixture {[entry_name(e) for e in entries]} has no task with data on this machine")
    return TaskMixture(tasks, seed=seed)
