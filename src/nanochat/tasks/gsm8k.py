"""GSM8K (`openai/gsm8k`): grade-school math with calculator tool calls; scored by the number after '#### '."""

from __future__ import annotations

import re

from nanochat.tasks.base import Task, extract_answer, last_text
from nanochat.tasks.sources import load_rows

TOOL_CALL_RE = re.compile(r"(<<[^>]+>>)")


def solution_parts(answer: str) -> list[dict]:
    """Split a solution on `<<expr=result>>` into text / python (expr) / python_output (result) parts."""
    parts = []
    for piece in TOOL_CALL_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str = "train", config: str = "main", path=None, shuffle_seed: int | None = 42, **kw):
        super().__init__(**kw)
        self.split = split
        self.rows = load_rows("openai/gsm8k", config, split, path=path, shuffle_seed=shuffle_seed)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": solution_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        reference = extract_answer(last_text(conversation))
        predicted = extract_answer(completion)
        return predicted is not None and predicted == reference
