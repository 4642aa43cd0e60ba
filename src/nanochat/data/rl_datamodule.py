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

import lightning as L

from nanochat.data.chat_datamodule import ChatMixtures
from nanochat.data.conversations import Conversations
from nanochat.data.stream import Position
from nanochat.data.stream_state import StreamState, make_loader, rank_and_world
from nanochat.errors import UserError
from nanochat.models.horizon import examples_grad_accum
from nanochat.tasks.base import Task

Reward = Callable[[dict, str], float]


class Prompt(NamedTuple):  # a tuple: Lightning's device transfer rebuilds it without copying the task behind `reward`
    conversation: dict
    reward: Reward
    index: int  # in the mixture: with the step, it seeds this question's samples


class PromptGroups(Conversations):
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


class RLDataModule(L.LightningDataModule):
    """Questions and their rewards, `examples_per_step` questions per optimizer step split evenly over the ranks."""

    def __init__(
        self,
        *,
        train: list[Mapping],
        examples_per_step: int = 16,
        reward: Reward | None = None,
        tokenizer_dir: str | None = None,
        init_from: str | None = None,
        sequence_len: int = 2048,
        seed: int = 42,
        num_workers: int = 0,
        max_conversation_tokens: int = 2048,
        offline: bool = False,
    ):
        super().__init__()
        if examples_per_step <= 0:
            raise UserError(f"datamodule.examples_per_step={examples_per_step} must be positive")
        if reward is not None and not callable(reward):
            raise UserError(f"datamodule.reward must be a callable (conversation, completion) -> float, not {reward!r}")
        self.mixtures = ChatMixtures(train, None, tokenizer_dir, init_from, seed, offline)
        self.examples_per_step, self.reward = examples_per_step, reward
        self.num_workers, self.max_conversation_tokens = min(num_workers, 1), max_conversation_tokens
        self.stream_state = StreamState()

    @property
    def train_mixture(self):
        return self.mixtures.load().train

    def steps_per_epoch(self) -> float:
        return len(self.train_mixture) / self.examples_per_step

    def setup(self, stage: str | None = None) -> None:
        examples_grad_accum(self.examples_per_step, 1, rank_and_world(self.trainer)[1])  # questions split evenly
        if self.reward is None:
            for task in self.train_mixture.tasks:
                if type(task).reward is Task.reward and type(task).evaluate is Task.evaluate:
                    raise UserError(
                        f"task {task.name!r} has neither `reward` nor `evaluate`: give it a "
                        f"reward(conversation, completion) method or set datamodule.reward"
                    )

    def train_dataloader(self):
        per_rank = self.examples_per_step // rank_and_world(self.trainer)[1]
        kwargs = self.mixtures.stream_kwargs(self.trainer, self.stream_state, self.max_conversation_tokens, True)
        return make_loader(
            self.trainer, PromptGroups(self.train_mixture, per_step=per_rank, **kwargs), self.num_workers
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, dict):
            return batch
        mixture = self.train_mixture
        indices = self.stream_state.record(batch)["indices"]
        return [Prompt(mixture[i], self.reward or mixture.task_at(i).reward, i) for i in indices]

    def state_dict(self) -> dict:
        return self.stream_state.state_dict(rank_and_world(self.trainer)[1])

    def load_state_dict(self, state: dict) -> None:
        self.stream_state.load_state_dict(state)
