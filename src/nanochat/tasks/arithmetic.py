"""Generated arithmetic: GSM8K-style word problems solved with calculator calls, and a multiple-choice variant.

`Arithmetic` answers look like GSM8K's (`... = <<12*4=48>>48 ...`, then `#### 48`) and become text / python /
python_output parts the same way, so the model learns the calculator on data that needs no download. Every
expression is one the calculator (nanochat.engine.calculator) evaluates to exactly the stated result:
integers only, `//` for divisions that come out even (`/` would print `4.0`).

Example `i` is drawn with `random.Random(i)` for the train split and `random.Random(-(i + 1))` otherwise (as
the spelling tasks do); in addition a question belongs to one split by a hash of its text, and draws that land
in the other split are redrawn, so no question is both a training and a test example.
"""

from __future__ import annotations

import random
import zlib

from nanochat.errors import UserError
from nanochat.tasks.base import MultipleChoice, Task, extract_answer, last_text, render_mc
from nanochat.tasks.gsm8k import solution_parts

NAMES = [
    ("Ava", "she"),
    ("Ben", "he"),
    ("Chloe", "she"),
    ("Dev", "he"),
    ("Elena", "she"),
    ("Farid", "he"),
    ("Grace", "she"),
    ("Hiro", "he"),
    ("Isla", "she"),
    ("Jonas", "he"),
    ("Keiko", "she"),
    ("Liam", "he"),
    ("Maya", "she"),
    ("Noah", "he"),
    ("Olga", "she"),
    ("Pablo", "he"),
    ("Quinn", "she"),
    ("Ravi", "he"),
    ("Sofia", "she"),
    ("Tomas", "he"),
    ("Uma", "she"),
    ("Victor", "he"),
    ("Wen", "she"),
    ("Yusuf", "he"),
]
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "stamps",
    "shells",
    "cards",
    "eggs",
    "buttons",
    "candles",
    "balloons",
    "oranges",
    "beads",
    "coins",
    "cupcakes",
    "toy cars",
    "flowers",
    "nails",
]
GOODS = [
    ("notebook", "notebooks"),
    ("sandwich", "sandwiches"),
    ("ticket", "tickets"),
    ("plant", "plants"),
    ("T-shirt", "T-shirts"),
    ("mug", "mugs"),
    ("puzzle", "puzzles"),
    ("lamp", "lamps"),
    ("scarf", "scarves"),
]
CONTAINERS = [
    ("box", "boxes"),
    ("bag", "bags"),
    ("pack", "packs"),
    ("jar", "jars"),
    ("crate", "crates"),
    ("basket", "baskets"),
]
TEST_SHARE = 5  # one question in 5 belongs to the test split


def _question_split(question: str) -> str:
    return "test" if zlib.crc32(question.encode("utf-8")) % TEST_SHARE == 0 else "train"


def _step(expr: str, value: int) -> str:
    """`<<expr=value>>value`: a calculator call and its result, repeated in the text as GSM8K writes them."""
    return f"<<{expr}={value}>>{value}"


def _gather(rng, name, she, item):
    a, b = rng.randint(12, 95), rng.randint(5, 60)
    c = rng.randint(3, a + b - 1)
    friend = rng.choice([n for n, _ in NAMES if n != name])
    q = (
        f"{name} has {a} {item}. {she.capitalize()} buys {b} more and then gives {c} to {friend}. "
        f"How many {item} does {name} have now?"
    )
    total = a + b
    return (
        q,
        (
            f"After buying more, {name} has {a}+{b} = {_step(f'{a}+{b}', total)} {item}.\n"
            f"After giving {c} to {friend}, {she} has {total}-{c} = {_step(f'{total}-{c}', total - c)} {item}."
        ),
        total - c,
    )


def _packs(rng, name, she, item):
    p, k = rng.randint(3, 25), rng.randint(4, 36)
    one, many = rng.choice(CONTAINERS)
    q = f"{name} buys {p} {many} of {item}. Each {one} holds {k} {item}. How many {item} does {she} buy in all?"
    return q, f"{p} {many} with {k} {item} each make {p}*{k} = {_step(f'{p}*{k}', p * k)} {item}.", p * k


def _share(rng, name, she, item):
    n, each, extra = rng.randint(2, 12), rng.randint(3, 40), rng.randint(1, 30)
    total = n * each + extra
    q = (
        f"{name} has {total} {item}. {she.capitalize()} keeps {extra} and shares the rest equally among {n} "
        f"friends. How many {item} does each friend get?"
    )
    rest = total - extra
    return (
        q,
        (
            f"{name} shares {total}-{extra} = {_step(f'{total}-{extra}', rest)} {item}.\n"
            f"Each of the {n} friends gets {rest}//{n} = {_step(f'{rest}//{n}', each)} {item}."
        ),
        each,
    )


def _change(rng, name, she, _item):
    (one, many), n, price = rng.choice(GOODS), rng.randint(2, 9), rng.randint(3, 45)
    cost = n * price
    bill = next(b for b in (20, 50, 100, 200, 500) if b >= cost)
    q = f"A {one} costs ${price}. {name} buys {n} {many} and pays with a ${bill} bill. How much change does {she} get?"
    return (
        q,
        (
            f"The {many} cost {n}*{price} = ${_step(f'{n}*{price}', cost)}.\n"
            f"The change is {bill}-{cost} = ${_step(f'{bill}-{cost}', bill - cost)}."
        ),
        bill - cost,
    )


def _reading(rng, name, she, _item):
    pages, weeks = rng.randint(5, 60), rng.randint(2, 9)
    q = f"{name} reads {pages} pages every day. How many pages does {she} read in {weeks} weeks?"
    days = weeks * 7
    return (
        q,
        (
            f"{weeks} weeks have {weeks}*7 = {_step(f'{weeks}*7', days)} days.\n"
            f"In {days} days {she} reads {days}*{pages} = {_step(f'{days}*{pages}', days * pages)} pages."
        ),
        days * pages,
    )


def _shopping(rng, name, she, _item):
    (_, many1), (_, many2) = rng.sample(GOODS, 2)
    a, p1, b, p2 = rng.randint(2, 9), rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 30)
    q = f"{name} buys {a} {many1} for ${p1} each and {b} {many2} for ${p2} each. How much does {she} spend in total?"
    c1, c2 = a * p1, b * p2
    return (
        q,
        (
            f"The {many1} cost {a}*{p1} = ${_step(f'{a}*{p1}', c1)}.\n"
            f"The {many2} cost {b}*{p2} = ${_step(f'{b}*{p2}', c2)}.\n"
            f"Altogether {she} spends {c1}+{c2} = ${_step(f'{c1}+{c2}', c1 + c2)}."
        ),
        c1 + c2,
    )


def _garden(rng, name, she, _item):
    length, width = rng.randint(4, 60), rng.randint(3, 40)
    if rng.random() < 0.5:
        q = (
            f"{name}'s garden is a rectangle {length} meters long and {width} meters wide. "
            "What is its area in square meters?"
        )
        area = length * width
        return (
            q,
            f"The area is length times width: {length}*{width} = {_step(f'{length}*{width}', area)} square meters.",
            area,
        )
    q = (
        f"{name} puts a fence around a rectangular garden {length} meters long and {width} meters wide. "
        f"How many meters of fence does {she} need?"
    )
    perimeter = 2 * (length + width)
    expr = f"2*({length}+{width})"
    return q, f"The fence goes around the garden: 2*({length}+{width}) = {_step(expr, perimeter)} meters.", perimeter


def _saving(rng, name, she, _item):
    weekly, weeks = rng.randint(4, 50), rng.randint(3, 20)
    saved = weekly * weeks
    spent = rng.randint(1, min(60, saved - 1))
    q = (
        f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a gift. "
        f"How much money does {she} have left?"
    )
    return (
        q,
        (
            f"{name} saves {weekly}*{weeks} = ${_step(f'{weekly}*{weeks}', saved)}.\n"
            f"After the gift {she} has {saved}-{spent} = ${_step(f'{saved}-{spent}', saved - spent)} left."
        ),
        saved - spent,
    )


def _travel(rng, name, she, _item):
    speed, hours, more = rng.randint(20, 110), rng.randint(2, 8), rng.randint(5, 90)
    q = (
        f"{name} drives at {speed} kilometers per hour for {hours} hours, then another {more} kilometers. "
        f"How many kilometers does {she} drive in total?"
    )
    first = speed * hours
    return (
        q,
        (
            f"In {hours} hours {she} drives {speed}*{hours} = {_step(f'{speed}*{hours}', first)} kilometers.\n"
            f"In total: {first}+{more} = {_step(f'{first}+{more}', first + more)} kilometers."
        ),
        first + more,
    )


def _ages(rng, name, she, _item):
    age, times, years = rng.randint(3, 15), rng.randint(2, 5), rng.randint(2, 20)
    relative = rng.choice(["aunt", "uncle", "grandmother", "cousin", "neighbor", "teacher"])
    q = (
        f"{name} is {age} years old. {name}'s {relative} is {times} times as old. "
        f"How old will the {relative} be in {years} years?"
    )
    now = age * times
    return (
        q,
        (
            f"The {relative} is {age}*{times} = {_step(f'{age}*{times}', now)} years old now.\n"
            f"In {years} years: {now}+{years} = {_step(f'{now}+{years}', now + years)}."
        ),
        now + years,
    )


PROBLEMS = [_gather, _packs, _share, _change, _reading, _shopping, _garden, _saving, _travel, _ages]


class _Generated(Task):
    def __init__(self, size: int = 1000, split: str = "train", **kw):
        super().__init__(**kw)
        if size < 0:
            raise UserError(f"{type(self).__name__} size must be >= 0, got {size}")
        if split not in ("train", "test"):
            raise UserError(f"{type(self).__name__} split must be 'train' or 'test', got {split!r}")
        self.size, self.split = size, split

    def num_examples(self) -> int:
        return self.size

    def _draw(self, index: int, make):
        """`make(rng)` -> (question, ...), redrawn from the same generator until the question is this split's."""
        rng = random.Random(index if self.split == "train" else -(index + 1))
        while True:
            drawn = make(rng)
            if _question_split(drawn[0]) == self.split:
                return drawn


class Arithmetic(_Generated):
    """Word problems answered with `<<expr=result>>` calculator steps and `#### <answer>`; scored like GSM8K."""

    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        def make(rng):
            name, she = rng.choice(NAMES)
            return rng.choice(PROBLEMS)(rng, name, she, rng.choice(ITEMS))

        question, solution, answer = self._draw(index, make)
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": solution_parts(f"{solution}\n#### {answer}")},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and predicted == extract_answer(last_text(conversation))


class ArithmeticChoice(_Generated, MultipleChoice):
    """`What is 37 * 4?` with four numeric choices: a categorical task scored from the answer letter's logit."""

    letters = ("A", "B", "C", "D")

    def get_example(self, index: int) -> dict:
        def make(rng):
            op = rng.choice("+-*")
            a, b = (
                (rng.randint(2, 99), rng.randint(2, 12)) if op == "*" else (rng.randint(10, 999), rng.randint(10, 999))
            )
            if op == "-" and b > a:
                a, b = b, a
            value = a + b if op == "+" else a - b if op == "-" else a * b
            wrong = set()
            while len(wrong) < 3:
                guess = value + rng.choice([-1, 1]) * rng.choice([1, 2, 10, 11, b, max(1, value // 10)])
                if guess != value and guess >= 0:
                    wrong.add(guess)
            choices = [value, *sorted(wrong)]
            rng.shuffle(choices)
            return f"What is {a} {op} {b}?", choices, choices.index(value)

        question, choices, gold = self._draw(index, make)
        return {
            "messages": [
                {"role": "user", "content": render_mc(question, self.letters, [str(c) for c in choices])},
                {"role": "assistant", "content": self.letters[gold]},
            ],
            "letters": self.letters,
        }
