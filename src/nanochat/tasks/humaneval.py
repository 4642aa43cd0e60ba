"""HumanEval (`openai/openai_humaneval`, 164 problems): user = prompt, assistant = prompt + canonical solution.

The example also carries `task_id`, `entry_point` and `test` for sandboxed evaluation. Local copy: the original
`HumanEval.jsonl.gz` (e.g. ../shared/data/humaneval) works as `path=`.

`evaluate` runs the completion's code (its first fenced block if it has one), the prompt's imports, the
problem's tests and `check(entry_point)` in the sandbox; passing means the program exits 0 within the timeout.
"""

from __future__ import annotations

import re

from nanochat.tasks.base import Task
from nanochat.tasks.sources import load_rows

FENCED_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def completion_code(completion: str) -> str:
    """The code in a model's answer: the first fenced block, else the whole text."""
    match = FENCED_RE.search(completion)
    return match.group(1) if match else completion


def prompt_imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, split: str = "test", path=None, shuffle_seed: int | None = 42, **kw):
        super().__init__(**kw)
        self.split = split
        # The original file is named HumanEval.jsonl.gz, not after a split: local files are read whatever the split.
        self.rows = load_rows(
            "openai/openai_humaneval", "openai_humaneval", split, path=path, shuffle_seed=shuffle_seed, local_split=None
        )

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, completion: str, timeout: float = 5.0) -> bool:
        from nanochat.engine.sandbox import run_code

        program = "\n\n".join(
            [
                prompt_imports(conversation["messages"][0]["content"]),
                completion_code(completion),
                conversation["test"],
                f"check({conversation['entry_point']})",
            ]
        )
        return run_code(program, timeout=timeout).success
