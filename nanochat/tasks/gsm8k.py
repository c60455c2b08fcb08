"""GSM8K (openai/gsm8k, config `main`): grade-school math word problems, solved with the Python tool.

Notable:
- the worked solution's `<<expr=result>>` calculator annotations become a python part (`expr`)
  and a python_output part holding exactly what the sandbox prints for it (`tool_call_parts`:
  48/2 -> "24", not "24.0"); the text after each annotation goes on as written. An annotation
  whose expression is not plain Python arithmetic (e.g. "80,000*1.5", a tuple in Python) or whose
  value disagrees with its stated result is dropped, and the text keeps the result;
- the final answer follows "####"; `evaluate` compares the last "#### N" of the answer with the
  reference as numbers (commas and "$" ignored, 18 == 18.0);
- offline there is no train split: the test split is cut by a hash of each question into a
  labelled "contaminated demo" half (`subset="demo"`, for the RL demo only) and a held-out half
  (`subset="heldout"`, for evaluation). The cut never changes with row order.

Tests: tests/test_tasks.py.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Literal

from nanochat.errors import ConfigError
from nanochat.tasks.base import Task, assistant_text, content_key, normalise, tool_call_parts
from nanochat.tasks.sources import Source, load_rows

Subset = Literal["all", "demo", "heldout"]
DEMO_PERCENT = 50  # share of GSM8K test in the contaminated RL demo part; the rest is held out
MAX_EXPONENT = 64  # ** with a larger exponent is not calculator arithmetic (and could be huge)
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def _arith(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arith(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} over {MAX_EXPONENT}")
        value = _BINOPS[type(node.op)](left, right)
        if type(value) not in (int, float):  # (-8) ** (1/3) is complex
            raise ValueError("not a real number")
        return value
    raise ValueError(f"{type(node).__name__} is not calculator arithmetic")


def evaluate_arithmetic(expr: str) -> int | float | None:
    """Value of a Python arithmetic expression (numbers, + - * / // % **, parentheses), computed as
    Python computes it; None if `expr` is anything else or fails (division by zero, overflow)."""
    try:
        return _arith(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None


def _agrees(value: int | float, stated: str) -> bool:
    """Whether `value` matches an annotation's stated result, up to the result's own rounding."""
    number = _number(stated)
    if number is None or not number.is_finite():
        return False
    decimals = max(-number.as_tuple().exponent, 0)
    return round(Decimal(repr(value)), decimals) == number


def solution_parts(solution: str) -> list[dict]:
    """Assistant parts of a GSM8K solution: text, with each <<expr=result>> as python + python_output."""
    parts: list[dict] = []

    def text(chunk: str) -> None:
        if not chunk:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += chunk
        else:
            parts.append({"type": "text", "text": chunk})

    pos = 0
    for match in _ANNOTATION.finditer(solution):
        text(solution[pos:match.start()])
        pos = match.end()
        expr, eq, stated = match.group(1).rpartition("=")
        value = evaluate_arithmetic(expr) if eq else None
        if value is not None and _agrees(value, stated):
            parts.extend(tool_call_parts(expr.strip(), value))
    text(solution[pos:])
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the last "####" in `text`, commas and "$" removed; None if there is none."""
    found = _ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def answers_match(answer_text: str, reference_text: str) -> bool:
    """Whether the "#### N" answers of two texts are present and equal as numbers."""
    mine, ref = extract_answer(answer_text), extract_answer(reference_text)
    if mine is None or ref is None:
        return False
    a, b = _number(mine), _number(ref)
    return a is not None and b is not None and a == b


def in_demo_part(question: str) -> bool:
    """Whether a GSM8K test question falls in the contaminated demo part (hash of its text)."""
    digest = hashlib.sha256(normalise(question).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < DEMO_PERCENT


class GSM8K(Task):
    """GSM8K as tool-using conversations; `subset` picks the demo or held-out half of a split."""

    eval_type = "generative"

    def __init__(self, split: str = "test", subset: Subset = "all", source: Source = "auto",
                 rows: Sequence[dict] | None = None, **slicing: int | None) -> None:
        super().__init__(**slicing)
        if subset not in ("all", "demo", "heldout"):
            raise ConfigError(f"GSM8K subset must be 'all', 'demo' or 'heldout', got {subset!r}")
        rows = load_rows("gsm8k", split, source) if rows is None else rows
        self.origin = getattr(rows, "origin", "given rows")
        self.rows = (rows if subset == "all"
                     else [r for r in rows if in_demo_part(r["question"]) == (subset == "demo")])
        label = {"all": "", "demo": ":contaminated-demo", "heldout": ":heldout"}[subset]
        self.name = f"gsm8k/{split}{label}"
        self.contaminated = subset == "demo"  # True: these are evaluation items, for the RL demo only

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["solution"])}]}

    def example_key(self, index: int) -> str:
        return content_key(self.rows[index]["question"])

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        """Right when the last "#### N" of the answer equals the reference's final number."""
        return answers_match(answer_text, assistant_text(conversation["messages"][-1]))
