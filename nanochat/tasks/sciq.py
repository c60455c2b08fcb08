"""SciQ (allenai/sciq): science exam questions, 4 lettered choices, with the support passage when there
is one.

Not an evaluation set here, so its validation split (the pack's only one) feeds the offline chat
mixture; the passage teaches reading before answering. Tests: tests/test_tasks.py.
"""

from __future__ import annotations

from nanochat.tasks.base import MultipleChoiceTask
from nanochat.tasks.sources import Source, load_rows


class SciQ(MultipleChoiceTask):
    """SciQ multiple choice; the row's `context` (support passage, often empty) comes first."""

    context_label = "Passage"

    def __init__(self, split: str = "validation", source: Source = "auto", **slicing: int | None) -> None:
        super().__init__(load_rows("sciq", split, source), f"sciq/{split}", **slicing)
