"""The golden run: the newcomer's micro pipeline (tests/newcomer.py, run once per session) must give
the committed results of tests/golden/micro.json, figure by figure (tests/golden.py names them),
within a relative 1e-3. A change that alters them on purpose rewrites the file
(`python -m tests.golden write RUN_DIR`) in its own commit, saying why.
"""

from __future__ import annotations

import json

import pytest

from tests import golden
from tests.newcomer import RUN, describe

pytestmark = pytest.mark.newcomer


def test_the_micro_pipeline_gives_the_golden_results(newcomer_demo):
    assert newcomer_demo.make_rc == 0, describe(newcomer_demo)
    found = golden.figures(newcomer_demo.storage / RUN)
    problems = golden.compare(found, json.loads(golden.GOLDEN.read_text()))
    assert not problems, f"{len(problems)} of {len(found)} figures differ from {golden.GOLDEN.name}:\n" + "\n".join(
        problems[:40])


def test_the_comparison_catches_a_moved_figure():
    base = {"pretrain.loss@1": 6.2383, "rl.reward_mean@1": 0.0, "evaluate.sft.chat.mmlu": 0.25}
    assert golden.compare(dict(base), base) == []
    assert golden.compare({**base, "pretrain.loss@1": 6.2383 * (1 + 2e-3)}, base)[0].startswith("pretrain.loss@1")
    assert golden.compare({**base, "rl.reward_mean@1": 1e-3}, base)  # near 0: absolute tolerance
    assert golden.compare({k: v for k, v in base.items() if "mmlu" not in k}, base) == [
        "missing: evaluate.sft.chat.mmlu (golden 0.25)"]
