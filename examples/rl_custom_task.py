"""RL on your own task: a Task that asks questions and scores answers is all the RL stage needs.

    nanochat train stage=rl init_from=<sft run or export dir> \
        'mixture.rl.train=[{_target_: examples.rl_custom_task.PickDigit, size: 512}]' \
        'mixture.rl.eval=[{_target_: examples.rl_custom_task.PickDigit, size: 64, split: test}]'

Each question is a conversation whose last message is the reference answer; the model is prompted with what comes
before it. `reward(conversation, completion)` scores one sampled reply (decoded text, tool calls rendered in);
`evaluate` is the pass/fail check pass@k counts. Without a `reward` method, the reward is 1.0 when `evaluate`
passes. To keep a task and change only its reward, set `datamodule.reward` to any callable of
(conversation, completion), e.g.
`'datamodule.reward={_target_: examples.rl_custom_task.shorter_is_better, _partial_: true}'`.
"""

from __future__ import annotations

import random

from nanochat.tasks.base import Task

QUESTIONS = {
    "train": ("Pick a digit.", "Say one digit.", "Give me a number from 0 to 9.", "Choose a digit, any digit."),
    "test": ("Name a digit.", "Tell me a single digit."),
}  # held-out wordings


class PickDigit(Task):
    """'Pick a digit.' The reference answers are random digits (what SFT would teach); RL rewards one of them."""

    name = "pick_digit"  # metrics: chat/pick_digit_pass@k

    def __init__(self, size: int = 512, target: str = "7", split: str = "train", **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.size, self.target = size, target
        self.questions = QUESTIONS["train" if split == "train" else "test"]

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        question = self.questions[index % len(self.questions)]
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": str(random.Random(index).randrange(10))},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == self.target

    def reward(self, conversation: dict, completion: str) -> float:
        # Partial credit is allowed: the target digit somewhere in a longer reply earns a little.
        return 1.0 if self.evaluate(conversation, completion) else 0.2 * (self.target in completion)


def shorter_is_better(conversation: dict, completion: str) -> float:
    """A reward function in place of a task's own: 1 for an empty reply, falling to 0 at 100 characters."""
    return max(0.0, 1.0 - len(completion) / 100)
