"""The evaluator protocol: load data once, compute a result on a model (examples strided over ranks), report it."""

from __future__ import annotations


class Evaluator:
    """`evaluate(model, tokenizer, rank, world_size, reduce, step=None)` keeps its result as `latest` (and, with a
    training step, in `history`); the result's "metrics" are what gets logged and `report()` is its report-card
    part. A subclass says how to load its data, compute a result, log it, and table it."""

    def __init__(self):
        self.latest: dict | None = None
        self.history: list[tuple[int, dict]] = []  # (optimizer step, result) of each evaluation during training

    def load(self):
        """The evaluation data, loaded once; None when there is none and the evaluation is optional."""
        raise NotImplementedError

    def compute(self, model, tokenizer, data, rank: int, world_size: int, reduce, show_progress: bool) -> dict:
        """{"metrics": {...}, ...} on `data` (what `load` returned), examples strided over ranks and `reduce`d."""
        raise NotImplementedError

    def log_latest(self, prefix: str = "", tasks: bool = True) -> None:
        raise NotImplementedError

    def tables(self) -> list[dict]:
        raise NotImplementedError

    def note(self) -> str:
        """One line on how the numbers were obtained (examples, samples), for the report."""
        raise NotImplementedError

    def evaluate(
        self,
        model,
        tokenizer,
        rank: int = 0,
        world_size: int = 1,
        reduce=None,
        show_progress=False,
        step: int | None = None,
    ) -> dict:
        self.latest = self.compute(model, tokenizer, self.load(), rank, world_size, reduce, show_progress)
        if step is not None:
            self.history.append((step, self.latest))
        return self.latest

    def report(self) -> dict:
        if self.latest is None:
            return {}
        return {"tables": self.tables(), "metrics": dict(self.latest["metrics"]), "notes": [self.note()]}

    def state_dict(self) -> dict:  # in the checkpoint: a resumed run's report still shows the earlier evaluations
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.latest = self.history[-1][1] if self.history else None
