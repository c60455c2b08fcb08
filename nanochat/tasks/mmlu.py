"""MMLU (cais/mmlu, config `all`): 57 subjects, 4 lettered choices; the subject heads the question.

Splits: auxiliary_train/dev/validation/test on the hub; dev, validation and test in the pack (no
auxiliary_train offline; test stays for evaluation). Tests: tests/test_tasks.py.
"""

from __future__ import annotations

from nanochat.tasks.base import MultipleChoiceTask
from nanochat.tasks.sources import Source, load_rows


class MMLU(MultipleChoiceTask):
    """MMLU multiple choice over all subjects."""

    def __init__(self, split: str = "test", source: Source = "auto", **slicing: int | None) -> None:
        super().__init__(load_rows("mmlu", split, source), f"mmlu/{split}", **slicing)

    def header(self, row: dict) -> str:
        subject = row.get("subject", "").replace("_", " ").strip()
        return f"A multiple choice question about {subject}." if subject else ""
