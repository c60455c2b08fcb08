"""Synthetic spelling tasks: spell a word letter by letter, and count a letter in a word (with the
Python tool).

Small models see tokens, not letters; these teach the mapping. Words come from the system
dictionary (/usr/share/dict/words) when present, else from the embedded pack's text (lower-case
words of 3-12 letters seen at least 3 times in its first ~3M characters); one INFO line says
which. Words are split into train and test by a hash of the word (1 in 10 is test), so an
evaluation never sees a training word. `get(i)` depends only on (seed, split, i).

- "spelling":     "Spell the word apple." -> "apple is spelled a-p-p-l-e."
- "letter_count": spelled out, the positions, then a python check ('apple'.count('p') -> 2),
                  and "#### 2"; `evaluate` compares the final numbers.

Tests: tests/test_tasks.py.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path

from nanochat.data.dataset import get_source, iter_documents, list_shards
from nanochat.errors import ConfigError, NotFoundError
from nanochat.tasks.base import Task, assistant_text, tool_call_parts
from nanochat.tasks.gsm8k import answers_match

log = logging.getLogger(__name__)

DICT_PATH = Path("/usr/share/dict/words")
PACK_CHARS = 3_000_000  # pack text scanned for words: ~15% of the pack, enough for ~10k distinct words
MIN_COUNT = 3  # a pack word must appear this often (drops typos and fragments)
TEST_ONE_IN = 10  # 1 word in 10 (by hash) is a test word
_WORD = re.compile(r"\b[a-z]{3,12}\b")
_SPELLED = re.compile(r"\b[a-zA-Z](?:-[a-zA-Z])+\b")


@functools.lru_cache(maxsize=4)
def _pack_words(directory: str) -> tuple[str, ...]:
    counts: collections.Counter[str] = collections.Counter()
    seen = 0
    for doc in iter_documents(list_shards(directory)):
        counts.update(_WORD.findall(doc))
        seen += len(doc)
        if seen >= PACK_CHARS:
            break
    return tuple(sorted(w for w, n in counts.items() if n >= MIN_COUNT))


def word_list(dictionary: Path = DICT_PATH) -> list[str]:
    """Lower-case ASCII words of 3-12 letters from `dictionary` if it exists, else from the embedded pack."""
    if dictionary.is_file():
        lines = dictionary.read_text(encoding="utf-8", errors="replace").split()
        words = sorted({w for w in lines
                        if 3 <= len(w) <= 12 and w.isascii() and w.isalpha() and w.islower()})
        origin = str(dictionary)
    else:
        directory = get_source("embedded").directory
        if not directory.is_dir():
            raise NotFoundError(
                f"no word list: {dictionary} does not exist and the embedded pack is missing at {directory}; "
                "install a dictionary (apt-get install wamerican) or build the pack (python -m jobs.data "
                "--source embedded), or pass words=[...]"
            )
        words = list(_pack_words(str(directory)))
        origin = f"embedded pack text at {directory}"
    log.info("tasks: spelling words: %d from %s", len(words), origin)
    return words


def is_test_word(word: str) -> bool:
    """Whether `word` belongs to the test split (hash of the word, 1 in TEST_ONE_IN)."""
    return int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "big") % TEST_ONE_IN == 0


def spelled(word: str) -> str:
    """apple -> a-p-p-l-e"""
    return "-".join(word)


class _WordTask(Task):
    """`size` examples over the words of one split; subclasses build the conversation of (word, rng)."""

    kind = "words"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0,
                 words: Sequence[str] | None = None, **slicing: int | None) -> None:
        super().__init__(**slicing)
        if split not in ("train", "test"):
            raise ConfigError(f"{self.kind} split must be 'train' or 'test', got {split!r}")
        if size < 0:
            raise ConfigError(f"{self.kind} size must be >= 0, got {size}")
        pool = word_list() if words is None else list(words)
        self.words = [w for w in pool if is_test_word(w) == (split == "test")]
        if size and not self.words:
            raise ConfigError(f"{self.kind}: no {split} words among the {len(pool)} given; pass more words")
        self.size, self.seed, self.split = size, seed, split
        self.name = f"{self.kind}/{split}"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"{self.kind}:{self.seed}:{self.split}:{index}")
        return self.conversation(rng.choice(self.words), rng)

    def conversation(self, word: str, rng: random.Random) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement conversation(word, rng)")


class Spelling(_WordTask):
    """Spell a word letter by letter."""

    kind = "spelling"
    eval_type = "generative"
    QUESTIONS = ("Spell the word {w}.", 'How do you spell "{w}"?', "Spell {w} letter by letter.",
                 "Can you spell '{w}' for me?", "spell {w}")

    def conversation(self, word: str, rng: random.Random) -> dict:
        return {"messages": [{"role": "user", "content": rng.choice(self.QUESTIONS).format(w=word)},
                             {"role": "assistant", "content": f"{word} is spelled {spelled(word)}."}]}

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        """Right when the last dash-spelled word of the answer has the reference's letters."""
        mine = _SPELLED.findall(answer_text)
        ref = _SPELLED.findall(assistant_text(conversation["messages"][-1]))
        return bool(mine) and mine[-1].lower() == ref[-1].lower()


class LetterCount(_WordTask):
    """Count one letter in a word: by hand, then checked with the Python tool; the answer after "####"."""

    kind = "letter_count"
    eval_type = "generative"
    QUESTIONS = ("How many times does the letter {c} appear in {w}?",
                 'How many {c}\'s are in the word "{w}"?',
                 "Count the letter '{c}' in '{w}'.", "how many {c} in {w}")

    def conversation(self, word: str, rng: random.Random) -> dict:
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        positions = [str(i + 1) for i, ch in enumerate(word) if ch == letter]
        count = len(positions)
        times = "once" if count == 1 else f"{count} times"
        if positions:
            where = positions[0] if count == 1 else f"{', '.join(positions[:-1])} and {positions[-1]}"
            found = (f"The letter {letter} is at position{'s' if count > 1 else ''} {where}, "
                     f"so it appears {times}.")
        else:
            found = f"The letter {letter} is not in it."
        parts = [{"type": "text",
                  "text": f"Spelled out, {word} is {spelled(word)}. {found}\nChecking with Python: "}]
        parts += tool_call_parts(f"'{word}'.count('{letter}')", count)
        parts.append({"type": "text",
                      "text": f"\nThe letter {letter} appears {times} in {word}.\n#### {count}"})
        user = rng.choice(self.QUESTIONS).format(c=letter, w=word)
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        """Right when the answer's last "#### N" is the true count."""
        return answers_match(answer_text, assistant_text(conversation["messages"][-1]))
