"""A toy RL task that an untrained model already solves sometimes: "end your answer with a word
whose last letter is one of these". It exists to prove that the RL stage learns (reward rises) and
that a control run with the advantage sign flipped unlearns (reward falls), in a few dozen CPU steps.

Why this task: a model fresh from nanochat's init has a zero lm_head, so it samples uniformly over
the vocabulary; the reward of a task must then start between 0.05 and 0.5 for GRPO to have a
signal (groups where every sample scores alike have zero advantage) and room to move both ways.
"End with the word X" starts near 1 / vocab_size; "the last letter is a vowel" starts near
the share of vowels among the letters the vocabulary spells (about 0.2 for byte-level vocabularies).

    task = EndLetter("aeiou", size=200)           # a nanochat.tasks Task: len(), get(i), reward(...)
    task.reward(task.get(0), "I say hello")        # 1.0 ("hello" ends with "o")

Tests: `python -m pytest tests/test_rl.py -k toy`.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from nanochat.errors import ConfigError
from nanochat.tasks.base import Task

_TEMPLATES = (
    "Say something about {topic}, and end your answer with a word whose last letter is one of: {letters}.",
    "Write a few words on {topic}. The last word must end with one of the letters {letters}.",
    "Tell me about {topic}; finish with a word ending in {letters}.",
)
_TOPICS = ("the sea", "bread", "a red door", "winter", "music", "the moon", "a long road", "cats",
           "rain", "a small town", "books", "the river", "apples", "a clock", "the wind", "gardens")
_WORDS = {"a": "banana", "e": "stone", "i": "taxi", "o": "hello", "u": "menu", "s": "trees", "y": "sky"}
_LAST_LETTER = re.compile(r"[A-Za-z](?=[^A-Za-z]*$)")


def last_letter(text: str) -> str | None:
    """The last ASCII letter of `text`, lower-cased (None if it has none)."""
    found = _LAST_LETTER.search(text)
    return found.group(0).lower() if found else None


class EndLetter(Task):
    """Prompts asking to end the answer with a word ending in one of `letters`; reward 1/0.

    `split` "train" and "heldout" draw their prompts from different seeds (for pass@k)."""

    eval_type = "generative"

    def __init__(self, letters: str = "aeiou", size: int = 256, split: Literal["train", "heldout"] = "train",
                 **slicing: int | None) -> None:
        super().__init__(**slicing)
        letters = letters.lower()
        if not letters or not all("a" <= c <= "z" for c in letters):
            raise ConfigError(f"letters must be a non-empty string of a-z, got {letters!r}")
        if split not in ("train", "heldout"):
            raise ConfigError(f"split must be 'train' or 'heldout', got {split!r}")
        if size < 1:
            raise ConfigError(f"size must be >= 1, got {size}")
        self.letters, self.size, self.split = letters, size, split
        self.name = f"toy/end-letter-{letters}/{split}"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"{self.split}/{index}")
        shown = ", ".join(self.letters)
        prompt = rng.choice(_TEMPLATES).format(topic=rng.choice(_TOPICS), letters=shown)
        letter = rng.choice(self.letters)
        answer = f"Here is my answer: {_WORDS.get(letter, 'x' + letter)}"
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}

    def example_key(self, index: int) -> str:
        return f"{self.name}/{index}"

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        """Right when the last letter of the answer is one of the task's letters."""
        return last_letter(answer_text) in set(self.letters)
