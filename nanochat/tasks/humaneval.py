"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, checked by unit tests.

The user message is the prompt (signature + docstring); the reference answer is the whole
function (prompt + canonical solution). `evaluate` runs, in the sandbox (nanochat/sandbox.py),
    prompt + completion + test + "check(entry_point)"
where the completion is the answer's first fenced code block if it has one, else the answer as
written; a body-only completion continues the prompt's function, a full function redefines it.
Status "ok" means pass. Evaluation only (test split, in the pack and on the hub).

Tests: tests/test_tasks.py (runs a canonical and a broken solution in the real sandbox).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nanochat.errors import ConfigError
from nanochat.sandbox import Sandbox
from nanochat.tasks.base import Task
from nanochat.tasks.sources import Source, load_rows

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.S)


def extract_code(answer_text: str) -> str:
    """The first ```-fenced block of an answer, else the answer itself."""
    match = _FENCE.search(answer_text)
    return match.group(1) if match else answer_text


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program whose clean run means the completion passes."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    """HumanEval problems; `sandbox` is created on the first `evaluate` if not given."""

    eval_type = "generative"

    def __init__(self, split: str = "test", source: Source = "auto", sandbox: Sandbox | None = None,
                 timeout_s: float = 10.0, rows: Sequence[dict] | None = None, **slicing: int | None) -> None:
        super().__init__(**slicing)
        self.rows = load_rows("humaneval", split, source) if rows is None else rows
        self.origin = getattr(self.rows, "origin", "given rows")
        self.name = f"humaneval/{split}"
        self.sandbox = sandbox
        self.timeout_s = timeout_s  # wall clock per program; the tests of one problem take well under 1 s

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
            "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"],
        }

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        """Run the completion against the problem's tests in the sandbox; True if they all pass."""
        for key in ("prompt", "test", "entry_point"):
            if key not in conversation:
                raise ConfigError(f"a HumanEval conversation needs its {key!r} key (from HumanEval.get), got "
                                 f"keys {sorted(conversation)}")
        if self.sandbox is None:
            self.sandbox = Sandbox()
        program = humaneval_program(conversation["prompt"], extract_code(answer_text), conversation["test"],
                                    conversation["entry_point"])
        return self.sandbox.run(program, timeout_s=self.timeout_s).ok
