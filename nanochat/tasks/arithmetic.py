"""Synthetic arithmetic word problems solved with one Python tool call, so tool use is learned offline.

Each problem comes from a template (shopping, sharing, rates, discounts, wages, ...) with numbers
drawn so that the answer is a whole number. The reply restates the computation in words, calls
Python with the expression, gets the output the sandbox prints for it (`tool_call_parts`; 96 / 8
prints "12"), and ends with "#### N" as GSM8K does. Problems are split into train and test by a
hash of their text (1 in 10 is test); `get(i)` depends only on (seed, split, i).

Tests: tests/test_tasks.py.
"""

from __future__ import annotations

import hashlib
import random

from nanochat.errors import ConfigError
from nanochat.tasks.base import Task, assistant_text, tool_call_parts
from nanochat.tasks.gsm8k import answers_match, evaluate_arithmetic

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Elif", "Femi", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells", "cards", "eggs")
TEST_ONE_IN = 10
MAX_TRIES = 1000  # redraws until a problem lands in the wanted split (~1.1 tries for train, ~10 for test)


def _buy_packs(r: random.Random, name: str, item: str) -> tuple[str, str, str]:
    a, packs, each = r.randint(2, 60), r.randint(2, 9), r.randint(3, 24)
    q = (f"{name} has {a} {item} and buys {packs} packs of {item} with {each} in each pack. "
         f"How many {item} does {name} have now?")
    return q, f"{a} + {packs} * {each}", f"{name} starts with {a} and adds {packs} packs of {each}"


def _change(r: random.Random, name: str, item: str) -> tuple[str, str, str]:
    price, n = r.randint(2, 15), r.randint(2, 6)
    bill = next(b for b in (20, 50, 100, 200) if b >= price * n)
    q = (f"A shop sells {item} for ${price} each. {name} buys {n} of them and pays with a ${bill} bill. "
         f"How much change does {name} get, in dollars?")
    return q, f"{bill} - {n} * {price}", f"the {item} cost {n} times ${price}, taken from ${bill}"


def _share(r: random.Random, name: str, item: str) -> tuple[str, str, str]:
    friends, each = r.randint(2, 12), r.randint(2, 30)
    q = (f"{name} shares {friends * each} {item} equally among {friends} friends. "
         f"How many {item} does each friend get?")
    return q, f"{friends * each} / {friends}", f"{friends * each} {item} split into {friends} equal groups"


def _reading(r: random.Random, name: str, item: str) -> tuple[str, str, str]:
    per_day, days, last = r.randint(5, 40), r.randint(2, 14), r.randint(1, 30)
    q = (f"{name} reads {per_day} pages a day for {days} days, then {last} pages on the last day. "
         f"How many pages does {name} read in total?")
    return q, f"{per_day} * {days} + {last}", f"{days} days of {per_day} pages, plus {last} pages"


def _discount(r: random.Random, name: str, item: str) -> tuple[str, str, str]:
    price, pct = 20 * r.randint(1, 15), 5 * r.randint(1, 15)  # 20 * (100 - 5k) / 100 is always whole
    q = f"A jacket costs ${price}. It is on sale for {pct}% off. How much does {name} pay for it, in dollars?"
    return q, f"{price} * (100 - {pct}) / 100", f"{100 - pct}% of ${price}"


def _speed(r: random.Random, name: str, item: str) -> tuple[str, str, str]:
    speed, hours, back = r.randint(30, 120), r.randint(2, 8), r.randint(10, 90)
    q = (f"A train travels at {speed} km per hour for {hours} hours, then {back} km more. "
         "How many km does it travel in total?")
    return q, f"{speed} * {hours} + {back}", f"{hours} hours at {speed} km per hour, plus {back} km"


def _wages(r: random.Random, name: str, item: str) -> tuple[str, str, str]:
    wage, hours, weeks = r.randint(8, 30), r.randint(5, 40), r.randint(2, 6)
    spent = r.randint(1, wage * hours * weeks - 1)
    q = (f"{name} earns ${wage} an hour and works {hours} hours a week. "
         f"After {weeks} weeks {name} spends ${spent}. How many dollars are left?")
    return (q, f"{wage} * {hours} * {weeks} - {spent}",
            f"${wage} times {hours} hours times {weeks} weeks, minus ${spent}")


def _rows(r: random.Random, name: str, item: str) -> tuple[str, str, str]:
    rows, per_row, missing = r.randint(3, 25), r.randint(3, 25), r.randint(0, 9)
    q = f"A garden has {rows} rows of {per_row} plants, but {missing} plants died. How many plants are left?"
    return q, f"{rows} * {per_row} - {missing}", f"{rows} rows of {per_row} plants, minus {missing}"


TEMPLATES = (_buy_packs, _change, _share, _reading, _discount, _speed, _wages, _rows)


class Arithmetic(Task):
    """`size` arithmetic word problems with a Python tool call, from (seed, split, i)."""

    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, **slicing: int | None) -> None:
        super().__init__(**slicing)
        if split not in ("train", "test"):
            raise ConfigError(f"arithmetic split must be 'train' or 'test', got {split!r}")
        if size < 0:
            raise ConfigError(f"arithmetic size must be >= 0, got {size}")
        self.size, self.split, self.seed = size, split, seed
        self.name = f"arithmetic/{split}"

    def num_examples(self) -> int:
        return self.size

    def _problem(self, index: int) -> tuple[str, str, str]:
        for attempt in range(MAX_TRIES):
            r = random.Random(f"arithmetic:{self.seed}:{self.split}:{index}:{attempt}")
            question, expr, words = r.choice(TEMPLATES)(r, r.choice(NAMES), r.choice(ITEMS))
            digest = hashlib.sha256(question.encode("utf-8")).digest()
            if (int.from_bytes(digest[:8], "big") % TEST_ONE_IN == 0) == (self.split == "test"):
                return question, expr, words
        raise RuntimeError(f"no {self.split} problem for index {index} after {MAX_TRIES} draws")

    def get_example(self, index: int) -> dict:
        question, expr, words = self._problem(index)
        value = evaluate_arithmetic(expr)
        answer = int(value)  # every template gives a whole number
        parts = [{"type": "text", "text": f"We need {words}. Let me compute it with Python: "}]
        parts += tool_call_parts(expr, value)
        parts.append({"type": "text", "text": f"\nThe answer is {answer}.\n#### {answer}"})
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        """Right when the answer's last "#### N" equals the reference's."""
        return answers_match(answer_text, assistant_text(conversation["messages"][-1]))
