"""Greedy completions of fixed prompts during training: the quickest sanity check that a model is learning."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from nanochat.callbacks.periodic import Periodic, evaluating
from nanochat.engine.engine import Engine

log = logging.getLogger(__name__)

PROMPTS = (  # nanochat's base_train prompts
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


CHAT_PROMPTS = (  # what the chat stages teach: arithmetic with the calculator, multiple choice, spelling, identity
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "What is 127 * 46?",
    "Multiple Choice question: What is the largest planet in the solar system?\n- Mars=A\n- Jupiter=B\n- Venus=C\n"
    "- Earth=D\n\nRespond only with the letter of the correct answer.",
    "Spell the word: banana",
    "Who are you?",
)


class Samples(Periodic):
    """Every `every_n_steps` and at the end: complete each prompt greedily, log it and append it to `samples.md`."""

    use_tools = False

    def __init__(self, every_n_steps: int = 2000, prompts: list[str] | tuple[str, ...] = PROMPTS, max_tokens: int = 16):
        super().__init__(every_n_steps)
        self.prompts = list(prompts)
        self.max_tokens = max_tokens
        self.latest: dict[str, str] = {}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        tok = pl_module.tokenizer
        engine = Engine(pl_module.model, tok, use_tools=self.use_tools)
        with evaluating(trainer, pl_module):
            for prompt in self.prompts:
                ids = self.encode(tok, prompt)
                (row,), _ = engine.generate_batch(ids, max_tokens=self.max_tokens, temperature=0)
                self.latest[prompt] = tok.decode(row[len(ids) :])
        lines = [f"### step {trainer.global_step}", ""] + [f"- {p!r} → {c!r}" for p, c in self.latest.items()] + [""]
        for line in lines[2:-1]:
            log.info(f"sample {line[2:]}")
        path = Path(trainer.default_root_dir) / "samples.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:  # an append-only log; a torn last line loses one sample
            f.write("\n".join(lines) + "\n")

    def encode(self, tok, prompt: str) -> list[int]:
        return tok.encode(prompt, prepend="<|bos|>")


class ChatSamples(Samples):
    """Samples for the chat stages: each prompt is a user turn, the reply is decoded with special tokens shown and
    the calculator live, so `<|python_start|>` tool calls and their forced outputs appear in samples.md."""

    use_tools = True

    def __init__(
        self, every_n_steps: int = 500, prompts: list[str] | tuple[str, ...] = CHAT_PROMPTS, max_tokens: int = 96
    ):
        super().__init__(every_n_steps, prompts, max_tokens)

    def encode(self, tok, prompt: str) -> list[int]:
        return tok.render_for_completion({"messages": [{"role": "user", "content": prompt}]})
