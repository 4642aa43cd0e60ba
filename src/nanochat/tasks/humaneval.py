"""HumanEval (`openai/openai_humaneval`, 164 problems): user = prompt, assistant = prompt + canonical solution.

The example also carries `task_id`, `entry_point` and `test` for sandboxed evaluation. Local copy: the original
`HumanEval.jsonl.gz` (e.g. ../shared/data/humaneval) works as `path=`.
"""

from __future__ import annotations

from nanochat.tasks.base import Task
from nanochat.tasks.sources import load_rows


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
