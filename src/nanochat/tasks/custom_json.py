"""CustomJSON: a jsonl file where each line is a JSON list of `{role, content}` messages (nanochat's identity data).

Every line is checked when the task is built: a malformed line or a conversation that does not alternate
user/assistant (starting with user, optionally after one system message) is a UserError naming file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanochat.errors import DataUnavailable, UserError
from nanochat.tasks.base import Task
from nanochat.tokenizer.chat_format import out_of_turn


def _check(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty JSON list of messages")
    first = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    body = messages[first:]
    if len(body) < 2:
        raise UserError(f"{where}: a conversation needs at least one user and one assistant message")
    bad = out_of_turn(messages)
    for i, m in enumerate(body):
        if bad is not None and bad[0] == first + i:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise UserError(
                f"{where}: message {i + 1} has role {role!r} "
                "but messages must alternate user/assistant starting with user"
            )
        if not isinstance(m.get("content"), (str, list)):
            raise UserError(f"{where}: message {i + 1} has no string 'content'")
    return messages


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, path: str | Path, split: str | None = None, **kw):
        super().__init__(**kw)
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataUnavailable(f"CustomJSON file {self.path} does not exist")
        self.conversations = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path} line {lineno}"
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where} is not valid JSON ({e.msg})") from e
                self.conversations.append(_check(messages, where))

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": [dict(m) for m in self.conversations[index]]}
