"""The golden run: the micro pipeline's results, extracted from a run directory and compared with
the committed `tests/golden/micro.json` (tests/test_golden.py compares each session's newcomer run).

The figures are named here, not by the run's files: per-step training loss and validation bpb of
the three training stages, each evaluation's numbers (bpb, CORE and its tasks, chat accuracies,
ChatCORE, format rate), and RL's per-step mean reward, completion length (sampled tokens: a
change in the policy or the sampling shows in it) and held-out rewards. A run written under an
older metric name still maps to the same figure (`_first`), so renaming a stored key does not
change the golden file; changing what the pipeline computes does, on purpose, in its own commit.

    python -m tests.golden write  RUN_DIR     # (re)write tests/golden/micro.json from a run
    python -m tests.golden check  RUN_DIR     # print the figures that differ (exit 1 if any)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "golden" / "micro.json"
REL_TOL = 1e-3  # as the resume test: the same seeds and threads give the same numbers up to float noise
ABS_TOL = 1e-6  # for figures at or near 0 (a centered score, an accuracy of 0)
TRAINED = ("pretrain", "midtrain", "sft")
EVALUATED = ("pretrain", "midtrain", "sft", "rl")


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _first(record: dict[str, Any], *names: str) -> Any:
    """The value under the first of `names` present (current name first, older names after)."""
    for n in names:
        if record.get(n) is not None:
            return record[n]
    return None


def figures(run_dir: Path) -> dict[str, float]:
    """Every golden figure of the run in `run_dir` ({storage}/{run}), by name."""
    out: dict[str, float] = {}
    for stage in TRAINED:
        for r in _records(run_dir / stage / "metrics.jsonl"):
            step = r["step"]
            if r.get("loss") is not None:
                out[f"{stage}.loss@{step}"] = r["loss"]
            bpb = _first(r, "train_val_bpb", "val_bpb")
            if bpb is not None:
                out[f"{stage}.train_val_bpb@{step}"] = bpb
    for stage in EVALUATED:
        path = run_dir / "evaluate" / f"{stage}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        bpb = _first(doc, "eval_bpb", "val_bpb")
        if bpb is not None:
            out[f"evaluate.{stage}.bpb"] = bpb
        core = doc.get("core") or {}
        if core.get("metric") is not None:
            out[f"evaluate.{stage}.core"] = core["metric"]
            for task, v in (core.get("tasks") or {}).items():
                out[f"evaluate.{stage}.core.{task}"] = v["accuracy"] if isinstance(v, dict) else v
        chat = doc.get("chat") or {}
        for task, v in (chat.get("tasks") or {}).items():
            out[f"evaluate.{stage}.chat.{task}"] = v["accuracy"]
        for key in ("chatcore", "format_rate"):
            if chat.get(key) is not None:
                out[f"evaluate.{stage}.chat.{key}"] = chat[key]
    for r in _records(run_dir / "rl" / "metrics.jsonl"):
        step = r["step"]
        for key in ("reward_mean", "completion_len", "eval_reward_mean", "pass_at_1"):
            if r.get(key) is not None:
                out[f"rl.{key}@{step}"] = r[key]
    return out


def compare(actual: dict[str, float], golden: dict[str, float], rel: float = REL_TOL) -> list[str]:
    """One line per figure that is missing, extra, or differs by more than `rel` (relative)."""
    problems = [f"missing: {k} (golden {golden[k]!r})" for k in sorted(set(golden) - set(actual))]
    problems += [f"not in the golden file: {k} = {actual[k]!r}" for k in sorted(set(actual) - set(golden))]
    for k in sorted(set(actual) & set(golden)):
        a, g = actual[k], golden[k]
        if not math.isclose(a, g, rel_tol=rel, abs_tol=ABS_TOL):
            problems.append(f"{k}: {a!r} vs golden {g!r} (relative {abs(a - g) / max(abs(g), 1e-12):.2e})")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    found = figures(Path(argv[1]))
    if not found:
        print(f"error: no pipeline results under {argv[1]} (give {{storage}}/{{run}})", file=sys.stderr)
        return 2
    if argv[0] == "write":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(found.items())), indent=1) + "\n")
        print(f"wrote {len(found)} figures to {GOLDEN}")
        return 0
    problems = compare(found, json.loads(GOLDEN.read_text()))
    print("\n".join(problems) or f"all {len(found)} figures match {GOLDEN.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
