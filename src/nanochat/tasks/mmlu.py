"""MMLU (`cais/mmlu`, config `all`): four-way multiple choice; `auxiliary_train` for training, `test`/`dev` for eval.

Reads the hub layout (`question, subject, choices, answer`) or the per-subject CSV layout of
../shared/data/mmlu (header `question,choice0..choice3,answer`, answer 0-3, subject from the file name).
"""

from __future__ import annotations

from nanochat.errors import UserError
from nanochat.tasks.base import MultipleChoice, render_mc
from nanochat.tasks.sources import load_rows

LETTERS = ("A", "B", "C", "D")


class MMLU(MultipleChoice):
    letters = LETTERS

    def __init__(
        self, split: str = "auxiliary_train", config: str = "all", path=None, shuffle_seed: int | None = 42, **kw
    ):
        super().__init__(**kw)
        self.split = split
        self.rows = load_rows("cais/mmlu", config, split, path=path, shuffle_seed=shuffle_seed)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if isinstance(row.get("train"), dict):  # the `auxiliary_train` config nests each row under "train"
            row = row["train"]
        if "choices" in row:
            choices = list(row["choices"])
        else:
            choices = [row.get(f"choice{i}") for i in range(4)]
        choices = ["" if c is None else str(c) for c in choices]
        subject = row.get("subject") or row.get("_file", "").removesuffix(f"_{self.split}")
        try:
            answer = int(row["answer"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"MMLU row {index} has no integer 'answer' 0-3 ({e})") from e
        if len(choices) != 4 or not 0 <= answer < 4:
            raise UserError(f"MMLU row {index} needs 4 choices and an answer 0-3, got {len(choices)} and {answer}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[answer]},
            ],
            "subject": subject,
            "letters": LETTERS,
        }
