"""Task, TaskMixture, TaskSequence and the multiple-choice prompt shared by MMLU and ARC."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from nanochat.errors import UserError


class Task:
    """A deterministic, indexable collection of conversations with a logical slice over the underlying examples.

    Subclasses implement `num_examples()` and `get_example(i)` over the *underlying* examples; `task[i]` maps the
    logical index i to the underlying index `start + i * step`. Evaluable tasks also implement `evaluate`.
    """

    eval_type: str = "generative"  # "categorical" (score one letter) or "generative" (sample and check)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise UserError(
                f"task slice start={start}, stop={stop}, step={step} is invalid: need 0 <= start <= stop and step >= 1"
            )
        self.start, self.stop, self.step = start, stop, step

    rows: Sequence  # tasks backed by loaded rows set this; others override num_examples

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        """The conversation for underlying example `index` (before slicing)."""
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool | float:
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL's reward for one sampled completion (the assistant's text, tool calls rendered in): by default
        1.0 when `evaluate` passes it. Override it for partial credit or a task that has no right answer."""
        return float(self.evaluate(conversation, completion))

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def _range(self) -> range:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return range(min(self.start, stop), stop, self.step)

    def __len__(self) -> int:
        return len(self._range())

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, int):
            raise TypeError(f"task indices must be integers, not {type(index).__name__}")
        return self.get_example(self._range()[index])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)})"


class TaskSequence(Task):
    """The tasks one after the other."""

    def __init__(self, tasks: Sequence[Task], **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> dict:
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length
        raise IndexError("task sequence index out of range")


class TaskMixture(Task):
    """All (task, index) pairs of the tasks, shuffled once with random.Random(seed); a task listed twice = 2 epochs."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        task_index, local_index = self.index_map[index]
        return self.tasks[task_index][local_index]

    def task_at(self, index: int) -> Task:
        """The task that `self[index]` comes from (RL asks it for the reward)."""
        return self.tasks[self.index_map[self._range()[index]][0]]


class MultipleChoice(Task):
    """A task answered with one letter (MMLU, ARC, the built-in arithmetic quiz): chat evaluation scores the
    letters' logits; the last assistant message holds the gold letter."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat's multiple-choice prompt; the letter follows the choice with no space so prompt and answer
    share a token."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after '#### ' with commas removed (GSM8K and SpellingBee answers), or None."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def last_text(conversation: dict) -> str:
    """The text of the final assistant message (its last part when it is a list of parts)."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]
