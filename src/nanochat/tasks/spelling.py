"""SpellingBee (count a letter in a word, then check with a python tool call) and SimpleSpelling (spell a word).

Examples are generated from a word list (default ../shared/data/english_words/words_alpha.txt, one word per
line; `builtin:<dir>` names the built-in starter corpus's words); example `i` uses `random.Random(i)` for the
train split and `random.Random(-(i + 1))` otherwise, so train and test never share a seed. nanochat uses 51
prompt templates; this port has the 24 below, in 8 languages.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from nanochat.data.builtin import resolve_words
from nanochat.errors import DataUnavailable, UserError
from nanochat.paths import shared_data_dir
from nanochat.tasks.base import Task, extract_answer, last_text

LETTERS = "abcdefghijklmnopqrstuvwxyz"

TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many times does {letter} appear in {word}",
    "How many times does the letter {letter} occur in the word {word}",
    "Count the number of {letter} in {word}",
    "Count how many {letter} there are in {word}",
    "What is the count of {letter} in {word}",
    "How often does {letter} appear in {word}",
    "In the word {word}, how many {letter} are there",
    "Tell me how many {letter} are in {word}",
    "Can you count the {letter} in {word}",
    "Number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}",
    "¿Cuántas veces aparece {letter} en {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Quante {letter} ci sono in {word}",
    "Quantas vezes a letra {letter} aparece em {word}",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "{word}に{letter}はいくつありますか",
    "{word}에 {letter}가 몇 개 있나요",
]
QUOTES = ("", "'", '"')


def default_words_path() -> Path | None:
    root = shared_data_dir()
    return None if root is None else root / "english_words" / "words_alpha.txt"


@lru_cache(maxsize=4)
def load_words(path: str) -> tuple[str, ...]:
    p = Path(path)
    if not p.is_file():
        raise DataUnavailable(f"word list {p} does not exist: pass words_path=<a text file with one word per line>")
    words = tuple(w for w in (line.strip() for line in p.read_text(encoding="utf-8").splitlines()) if w)
    if not words:
        raise UserError(f"word list {p} has no words")
    return words


def word_list(words_path=None) -> tuple[str, ...]:
    """The words of `words_path`, else of the shared English word list; DataUnavailable when there is none.
    `builtin:<dir>` is the built-in corpus's word list (nanochat.data.builtin), derived on first use."""
    path = resolve_words(words_path) or default_words_path()
    if path is None:
        raise DataUnavailable(
            "no word list: pass words_path=<a text file with one word per line>, "
            "e.g. the one `nanochat data fetch words` downloads"
        )
    return load_words(str(Path(path).expanduser()))


class _WordTask(Task):
    def __init__(self, size: int = 1000, split: str = "train", words_path=None, **kw):
        super().__init__(**kw)
        if size < 0:
            raise UserError(f"{type(self).__name__} size must be >= 0, got {size}")
        self.size, self.split = size, split
        self.words = word_list(words_path)

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(index if self.split == "train" else -(index + 1))


class SpellingBee(_WordTask):
    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        user = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            user += "?"
        manual = (
            f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n"
            f"First spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of '{letter}':\n"
        )
        running = 0
        for i, char in enumerate(word, 1):
            if char == letter:
                running += 1
                manual += f"{i}:{char} hit! count={running}\n"
            else:
                manual += f"{i}:{char}\n"
        manual += f"\nThis gives us {running}."
        parts = [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and predicted == extract_answer(last_text(conversation))


class SimpleSpelling(_WordTask):
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", words_path=None, **kw):
        super().__init__(size=size, split=split, words_path=words_path, **kw)
        words = list(self.words)
        random.Random(42).shuffle(words)  # a different word order than SpellingBee's
        self.words = tuple(words)

    def get_example(self, index: int) -> dict:
        word = self._rng(index).choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": f"Spell the word: {word}"},
                {"role": "assistant", "content": f"{word}:{','.join(word)}"},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
