"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations, the bulk of the seed's mixtures.

Hub only (train ~460k, test ~24k conversations): the embedded pack has no copy, so offline
loading fails with an error that says so (the offline mixtures use the pack's other sets).
Training only: there is no answer to check. Tests: tests/test_tasks.py (with given rows).
"""

from __future__ import annotations

from collections.abc import Sequence

from nanochat.errors import ConfigError
from nanochat.tasks.base import Task
from nanochat.tasks.sources import Source, load_rows


class SmolTalk(Task):
    """SmolTalk conversations as they are (an optional system message, then user/assistant turns)."""

    def __init__(self, split: str = "train", source: Source = "auto", rows: Sequence[dict] | None = None,
                 **slicing: int | None) -> None:
        super().__init__(**slicing)
        self.rows = load_rows("smoltalk", split, source) if rows is None else rows
        self.origin = getattr(self.rows, "origin", "given rows")
        self.name = f"smoltalk/{split}"

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        messages = self.rows[index]["messages"]
        if not messages:
            raise ConfigError(f"{self.name} row {index} has no messages: the dataset is not SmolTalk-shaped")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
