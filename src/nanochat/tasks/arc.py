"""ARC (`allenai/ai2_arc`, `ARC-Easy` / `ARC-Challenge`): multiple choice with the dataset's own labels.

Local files may also be the CORE bundle's ARC test sets (`query`, `choices`, `gold`; letters A, B, ... assigned
in order), so chat evaluation runs ARC offline from ../shared/data/core_eval.
"""

from __future__ import annotations

from nanochat.errors import UserError
from nanochat.tasks.base import MultipleChoice, render_mc
from nanochat.tasks.sources import load_rows

SUBSETS = ("ARC-Easy", "ARC-Challenge")


class ARC(MultipleChoice):
    def __init__(self, subset: str = "ARC-Easy", split: str = "train", path=None, shuffle_seed: int | None = 42, **kw):
        super().__init__(**kw)
        if subset not in SUBSETS:
            raise UserError(f"ARC subset {subset!r} is not one of {', '.join(SUBSETS)}")
        self.subset, self.split = subset, split
        self.rows = load_rows("allenai/ai2_arc", subset, split, path=path, shuffle_seed=shuffle_seed)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if "query" in row:  # the CORE bundle's copy of the test sets: "Question: ...", choices, gold index
            question, choices = row["query"].removeprefix("Question: "), list(row["choices"])
            letters = [chr(ord("A") + i) for i in range(len(choices))]
            answer = letters[row["gold"]] if 0 <= row["gold"] < len(choices) else None
        else:
            question = row["question"]
            letters = [str(x) for x in row["choices"]["label"]]  # usually A-D, sometimes 1-4
            choices = list(row["choices"]["text"])
            answer = str(row["answerKey"])
        if answer not in letters:
            raise UserError(f"ARC row {index}: answerKey {answer!r} is not one of the labels {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(question, letters, choices)},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
        }


class ARCEasy(ARC):
    def __init__(self, split: str = "train", **kw):
        super().__init__(subset="ARC-Easy", split=split, **kw)


class ARCChallenge(ARC):
    def __init__(self, split: str = "train", **kw):
        super().__init__(subset="ARC-Challenge", split=split, **kw)
