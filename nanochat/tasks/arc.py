"""ARC-Easy and ARC-Challenge (allenai/ai2_arc): grade-school science, 3-5 lettered choices.

Splits: train/validation/test on the hub; validation and test in the pack (test stays for
evaluation). Categorical: the assistant answers with the letter. Tests: tests/test_tasks.py.
"""

from __future__ import annotations

from typing import Literal

from nanochat.errors import ConfigError
from nanochat.tasks.base import MultipleChoiceTask
from nanochat.tasks.sources import Source, load_rows


class ARC(MultipleChoiceTask):
    """ARC multiple choice; `subset` "easy" or "challenge"."""

    def __init__(self, subset: Literal["easy", "challenge"] = "easy", split: str = "test",
                 source: Source = "auto", **slicing: int | None) -> None:
        if subset not in ("easy", "challenge"):
            raise ConfigError(f"ARC subset must be 'easy' or 'challenge', got {subset!r}")
        dataset = f"arc_{subset}"
        super().__init__(load_rows(dataset, split, source), f"{dataset}/{split}", **slicing)
