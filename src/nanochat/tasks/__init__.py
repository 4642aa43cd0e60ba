"""Chat tasks: conversations for mid-training / SFT mixtures and chat evaluation.

A task is an indexable, sliceable collection of conversations `{"messages": [...]}` in the format that
`nanochat.tokenizer.chat_format.render_conversation` accepts; evaluable tasks also score a model's completion.
"""

from nanochat.tasks.arc import ARC
from nanochat.tasks.base import Task, TaskMixture, TaskSequence, render_mc
from nanochat.tasks.custom_json import CustomJSON
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.registry import TASKS, build_mixture, build_task
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spelling import SimpleSpelling, SpellingBee

__all__ = [
    "ARC",
    "GSM8K",
    "MMLU",
    "TASKS",
    "CustomJSON",
    "HumanEval",
    "SimpleSpelling",
    "SmolTalk",
    "SpellingBee",
    "Task",
    "TaskMixture",
    "TaskSequence",
    "build_mixture",
    "build_task",
    "render_mc",
]
