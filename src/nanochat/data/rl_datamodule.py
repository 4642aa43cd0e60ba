"""RL prompts: each optimizer step takes `examples_per_step` questions (split over ranks) and the reward for each.

A question is a conversation of the task mixture; the model is prompted with everything before its final
assistant message. Its reward is `reward(conversation, completion)`: the configured callable when there is one,
else the question's own task's `reward` (GSM8K: 1.0 for the right final answer). Positions and resume work as
for SFT: a batch records the next question, so a resumed run asks the questions it had not reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from typing import NamedTuple

from nanochat.data.chat_datamodule import SFTDataModule, _Conversations
from nanochat.data.stream import Position
from nanochat.errors import UserError
from nanochat.tasks.base import Task

Reward = Callable[[dict, str], float]


class Prompt(NamedTuple):  # a tuple: Lightning's device transfer rebuilds it without copying the task behind `reward`
    conversation: dict
    reward: Reward
    index: int  # in the mixture: with the step, it seeds this question's samples


class PromptGroups(_Conversations):
    """This rank's questions, `per_step` mixture indices per item, epoch after epoch."""

    def __init__(self, mixture, tokenizer, *, per_step: int, **kwargs):
        super().__init__(mixture, tokenizer, **kwargs)
        self.per_step = per_step

    def __iter__(self) -> Iterator[dict]:
        group = []
        for pos, index in self.indices():
            group.append(index)
            if len(group) == self.per_step:
                nxt = Position(pos.epoch, pos.round + 1, 0, 0)
                yield {"indices": group, "state": {"slot": 0, "skipped": 0, **asdict(nxt)}}
                group = []


class RLDataModule(SFTDataModule):
    """SFT's bookkeeping (`examples_per_step` over ranks, epochs, resume) with questions and rewards for rows."""

    def __init__(self, *, examples_per_step: int = 16, reward: Reward | None = None, **kwargs):
        kwargs.setdefault("device_batch_size", 1)  # one question per "row": ranks split examples_per_step evenly
        super().__init__(examples_per_step=examples_per_step, **kwargs)
        self.reward = reward
        if reward is not None and not callable(reward):
            raise UserError(f"datamodule.reward must be a callable (conversation, completion) -> float, not {reward!r}")

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.reward is None:
            for task in self.train_mixture.tasks:
                if type(task).reward is Task.reward and type(task).evaluate is Task.evaluate:
                    raise UserError(f"task {task.name!r} has neither `reward` nor `evaluate`: give it a "
                                    f"reward(conversation, completion) method or set datamodule.reward")

    def train_dataloader(self):
        per_rank = self.examples_per_step // self.rank_and_world[1]
        return self.loader(PromptGroups(self.train_mixture, per_step=per_rank, **self._stream_kwargs(True)))

    def training_batch(self, item: Mapping) -> list[Prompt]:
        mixture = self.train_mixture
        return [Prompt(mixture[i], self.reward or mixture.task_at(i).reward, i) for i in item["indices"]]
