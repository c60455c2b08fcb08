"""Social IQa (allenai/social_i_qa): a short situation, a question about people's motives or
feelings, 3 lettered choices.

Not an evaluation set here: its validation split (the pack's only one) feeds the offline chat
mixture. Tests: tests/test_tasks.py.
"""

from __future__ import annotations

from nanochat.tasks.base import MultipleChoiceTask
from nanochat.tasks.sources import Source, load_rows


class SocialIQA(MultipleChoiceTask):
    """Social IQa multiple choice; the situation (`context`) comes before the question."""

    context_label = "Situation"
    random_baseline = 1 / 3

    def __init__(self, split: str = "validation", source: Source = "auto", **slicing: int | None) -> None:
        super().__init__(load_rows("social_iqa", split, source), f"social_iqa/{split}", **slicing)
