"""SmolTalk (`HuggingFaceTB/smol-smoltalk`): general chat conversations from the `messages` field, shuffled
(seed 42)."""

from __future__ import annotations

from nanochat.tasks.base import Task
from nanochat.tasks.sources import load_rows


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split: str = "train", path=None, shuffle_seed: int | None = 42, **kw):
        super().__init__(**kw)
        self.split = split
        self.rows = load_rows("HuggingFaceTB/smol-smoltalk", None, split, path=path, shuffle_seed=shuffle_seed)

    def get_example(self, index: int) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        return {"messages": messages}
