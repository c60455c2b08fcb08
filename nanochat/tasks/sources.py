"""Where task rows come from: the Hugging Face hub through `datasets`, or the embedded pack offline.

Every dataset is read into one row schema, the pack's (see jobs/datapack.py): multiple choice
rows have `id`, `question`, `choices`, `answer` (index) and optionally `context` / `subject`;
GSM8K rows `question`, `solution`, `answer_text`; HumanEval rows `prompt`, `canonical_solution`,
`test`, `entry_point`; SmolTalk rows `messages`. Hub rows are converted on access, so a 460k-row
dataset is not copied into Python objects up front.

Choosing the source (`source=`): "hub" (must work), "pack" (must exist), or "auto": the hub when
`hub_reachable()` says so, else the pack. The hub is probed once per process with a short timeout
(HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 skip the probe) and the answer is cached. If the hub
is reachable but a dataset fails to load, "auto" falls back to the pack where it has the split.
Each load logs one INFO line saying which source it used; `Rows.origin` carries the same text.

Tests: `python -m pytest tests/test_tasks.py` (offline: they use the pack).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nanochat.data.dataset import SourceUnavailableError, check_reachable, nanochat_home
from nanochat.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)

Source = Literal["auto", "hub", "pack"]
HUB_PROBE_URL = "https://huggingface.co/api/datasets/allenai/ai2_arc"
HUB_PROBE_TIMEOUT_S = 3.0  # one short probe per process; a dead network costs at most ~4 s once
PACK_HINT = "python -m jobs.data --source embedded"


def _mc(row_id: object, question: str, choices: list[str], answer: int, **extra: Any) -> dict:
    return {"id": str(row_id), "question": question, "choices": list(choices), "answer": int(answer), **extra}


def _arc(row: dict, i: int) -> dict:
    labels = list(row["choices"]["label"])
    return _mc(row["id"], row["question"], row["choices"]["text"], labels.index(row["answerKey"]))


def _mmlu(row: dict, i: int) -> dict:
    row = row["train"] if isinstance(row.get("train"), dict) else row  # the auxiliary_train config nests rows
    return _mc(i, row["question"], row["choices"], row["answer"], subject=row.get("subject", ""))


def _sciq(row: dict, i: int) -> dict:
    # same order as the pack: upstream lists the answer last, so shuffle with a seed from the question
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    random.Random(f"sciq:{row['question']}").shuffle(choices)
    return _mc(i, row["question"], choices, choices.index(row["correct_answer"]), context=row["support"])


def _social_iqa(row: dict, i: int) -> dict:
    choices = [row["answerA"], row["answerB"], row["answerC"]]
    return _mc(i, row["question"], choices, int(row["label"]) - 1, context=row["context"])


def _gsm8k(row: dict, i: int) -> dict:
    answer_text = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
    return {"id": str(i), "question": row["question"], "solution": row["answer"], "answer_text": answer_text}


def _humaneval(row: dict, i: int) -> dict:
    keys = ("prompt", "canonical_solution", "test", "entry_point")
    return {"id": row["task_id"], **{k: row[k] for k in keys}}


def _smoltalk(row: dict, i: int) -> dict:
    return {"id": str(i), "messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its hub address, our split name -> hub split, the row converter, its pack dir."""

    hub_path: str
    hub_config: str | None
    hub_splits: dict[str, str]  # our split name -> split name on the hub
    convert: Callable[[dict, int], dict]  # hub row, position -> pack-schema row
    pack_task: str | None  # directory under {home}/data/eval, None when the pack has no copy


DATASETS: dict[str, DatasetSpec] = {
    "arc_easy": DatasetSpec("allenai/ai2_arc", "ARC-Easy", {s: s for s in ("train", "validation", "test")},
                            _arc, "arc_easy"),
    "arc_challenge": DatasetSpec("allenai/ai2_arc", "ARC-Challenge",
                                 {s: s for s in ("train", "validation", "test")}, _arc, "arc_challenge"),
    "mmlu": DatasetSpec("cais/mmlu", "all", {s: s for s in ("auxiliary_train", "dev", "validation", "test")},
                        _mmlu, "mmlu"),
    "gsm8k": DatasetSpec("openai/gsm8k", "main", {"train": "train", "test": "test"}, _gsm8k, "gsm8k"),
    "humaneval": DatasetSpec("openai/openai_humaneval", None, {"test": "test"}, _humaneval, "humaneval"),
    "smoltalk": DatasetSpec("HuggingFaceTB/smol-smoltalk", None, {"train": "train", "test": "test"},
                            _smoltalk, None),
    "sciq": DatasetSpec("allenai/sciq", None, {s: s for s in ("train", "validation", "test")}, _sciq, "sciq"),
    "social_iqa": DatasetSpec("allenai/social_i_qa", None, {"train": "train", "validation": "validation"},
                              _social_iqa, "social_iqa"),
}


class Rows(Sequence):
    """Read-only rows of one dataset split in the pack schema; `origin` says where they came from."""

    def __init__(self, items: Sequence, convert: Callable[[dict, int], dict] | None, origin: str) -> None:
        self._items = items
        self._convert = convert  # None: items are already pack-schema dicts
        self.origin = origin

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows ({self.origin})")
        row = self._items[i]
        return self._convert(row, i % len(self)) if self._convert else row


def _hub_disabled_by_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """True when huggingface.co answers within HUB_PROBE_TIMEOUT_S and `datasets` is installed.

    Probed once per process (cached); HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set to 1 mean False
    without a probe.
    """
    if _hub_disabled_by_env():
        return False
    try:
        import datasets  # noqa: F401 - only whether it is installed
    except ImportError:
        return False
    try:
        check_reachable(HUB_PROBE_URL, timeout=HUB_PROBE_TIMEOUT_S)
    except SourceUnavailableError:
        return False
    return True


def pack_eval_dir() -> Path:
    """The pack's evaluation sets: {home}/data/eval (read on every call: NANOCHAT_HOME may change)."""
    return nanochat_home() / "data" / "eval"


def pack_splits(dataset: str) -> list[str]:
    """Splits of `dataset` present in the pack here (empty if the pack or the dataset is missing)."""
    spec = _spec(dataset)
    if spec.pack_task is None:
        return []
    directory = pack_eval_dir() / spec.pack_task
    return sorted(p.stem for p in directory.glob("*.jsonl")) if directory.is_dir() else []


def _spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}: "
                          f"the known datasets are {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset]


@functools.lru_cache(maxsize=64)
def _read_jsonl(path: str, mtime_ns: int) -> tuple[dict, ...]:
    with open(path, encoding="utf-8") as lines:
        return tuple(json.loads(line) for line in lines if line.strip())


def _load_pack(dataset: str, split: str) -> Rows:
    spec = _spec(dataset)
    have = pack_splits(dataset)
    if split not in have:
        if spec.pack_task is None:
            where = "the embedded pack has no copy of it"
        elif not have:
            where = f"the embedded pack is missing here ({pack_eval_dir()}): build it with `{PACK_HINT}`"
        else:
            where = f"the embedded pack only has split(s) {', '.join(have)}"
        raise NotFoundError(
            f"{dataset} split {split!r} is not available offline: {where}. It needs the Hugging Face hub "
            f"({spec.hub_path}), which this process cannot use; "
            "pick a pack split or run where the hub is reachable."
        )
    path = pack_eval_dir() / spec.pack_task / f"{split}.jsonl"
    rows = _read_jsonl(str(path), path.stat().st_mtime_ns)
    return Rows(rows, None, f"offline pack copy {path}")


def _load_hub(dataset: str, split: str) -> Rows:
    spec = _spec(dataset)
    if split not in spec.hub_splits:
        raise ConfigError(f"{dataset} has no split {split!r} on the hub: "
                          f"choose one of {', '.join(spec.hub_splits)}")
    import datasets

    ds = datasets.load_dataset(spec.hub_path, spec.hub_config, split=spec.hub_splits[split])
    config = f" {spec.hub_config}" if spec.hub_config else ""
    return Rows(ds, spec.convert, f"Hugging Face hub {spec.hub_path}{config} split={spec.hub_splits[split]}")


def load_rows(dataset: str, split: str, source: Source = "auto") -> Rows:
    """Rows of `dataset`/`split` from the hub or the pack (see the module docstring); logs which one."""
    if source not in ("auto", "hub", "pack"):
        raise ConfigError(f"source must be 'auto', 'hub' or 'pack', got {source!r}")
    _spec(dataset)
    if source == "pack" or (source == "auto" and not hub_reachable()):
        rows = _load_pack(dataset, split)
        why = "" if source == "pack" else " (Hugging Face hub not reachable)"
    else:
        try:
            rows = _load_hub(dataset, split)
            why = ""
        except Exception as exc:  # noqa: BLE001 - any hub/datasets failure may fall back to the pack
            if source == "hub" or split not in pack_splits(dataset):
                raise RuntimeError(
                    f"loading {dataset} split {split!r} from the Hugging Face hub failed "
                    f"({type(exc).__name__}: "
                    f"{exc}); offline splits in the pack: {', '.join(pack_splits(dataset)) or 'none'}"
                ) from exc
            rows = _load_pack(dataset, split)
            why = f" (hub load failed: {type(exc).__name__})"
    log.info("tasks: %s/%s: %d rows from %s%s", dataset, split, len(rows), rows.origin, why)
    return rows
