"""Unit tests of CORE evaluation (nanochat/evals/core.py, core_tasks.py, evaluation.py) without Ray.

A byte tokenizer and mock models stand in for real ones: a model that knows the gold answers
(a prefix trie of the gold prompts) must score 1, a model with uniform logits exactly the random
baseline. Run: `python -m pytest tests/test_core_eval.py`.
"""

from __future__ import annotations

import json
import math
import random
import socket
import time
from types import SimpleNamespace

import pytest
import torch

from nanochat.data.dataset import SourceUnavailableError, write_shards
from nanochat.evals import core as core_eval
from nanochat.evals import core_tasks
from nanochat.evals import harness as evaluation
from nanochat.evals.core import CoreRequest, CoreTask, TaskMeta
from nanochat.evals.harness import ItemResult
from tests.helpers import ByteTokenizer

BOS = ByteTokenizer.BOS
VOCAB = 257


class UniformModel:
    """Zero logits everywhere: every continuation is equally likely."""

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, VOCAB)


class OracleModel:
    """Puts a large logit on the next token of any known text whose prefix the row matches."""

    def __init__(self, texts: list[list[int]]) -> None:
        self.next: dict[tuple[int, ...], int] = {}
        for t in texts:
            for p in range(1, len(t)):
                self.next[tuple(t[:p])] = t[p]

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, VOCAB)
        for b, row in enumerate(idx.tolist()):
            for p in range(len(row)):
                nxt = self.next.get(tuple(row[: p + 1]))
                if nxt is not None:
                    logits[b, p, nxt] = 20.0
        return logits


def oracle_for(requests: list[CoreRequest]) -> OracleModel:
    tok = ByteTokenizer()
    gold = [r.prompts[r.gold] if r.gold >= 0 else r.prompts[1] for r in requests]
    return OracleModel(tok.encode(gold, prepend=BOS))


def core_totals(model, requests: list[CoreRequest]) -> dict[str, evaluation.TaskTotals]:
    state = evaluation.EvalState(model, ByteTokenizer(), "cpu", None)
    return evaluation.aggregate(core_eval.score_requests(state, requests))


MC = TaskMeta("mc", "multiple_choice", 2, "\nAnswer: ", 0.25)
SCHEMA = TaskMeta("schema", "schema", 0, " ", 0.5)
LM = TaskMeta("lm", "language_modeling", 1, " ", 0.0)


def mc_items(n: int = 12) -> list[dict]:
    rng = random.Random(0)
    return [{"query": f"Question: what is {i} plus one?", "choices": [f"{i + d} apples" for d in (0, 1, 2, 3)],
             "gold": rng.randrange(4)} for i in range(n)]


def schema_items(n: int = 8) -> list[dict]:
    return [{"context_options": [f"Ann gave Bob {i} coins so Ann", f"Ann gave Bob {i} coins so Bob"],
             "continuation": "was poorer.", "gold": i % 2} for i in range(n)]


def lm_items(n: int = 6) -> list[dict]:
    return [{"context": f"The word after {w} is ", "continuation": f"{w}{w}"} for w in ("red", "blue", "gold", "tea",
                                                                                      "sun", "ink")[:n]]


# ----------------------------------------------------------------------------- rendering


def test_mc_prompts_put_fewshot_examples_with_their_gold_answer_first():
    items = mc_items(4)
    prompts = core_eval.render_prompts(items[0], MC, [items[1], items[2]])
    shots = (f"{items[1]['query']}\nAnswer: {items[1]['choices'][items[1]['gold']]}\n\n"
             f"{items[2]['query']}\nAnswer: {items[2]['choices'][items[2]['gold']]}\n\n")
    assert prompts == [f"{shots}Question: what is 0 plus one?\nAnswer: {c}" for c in items[0]["choices"]]


def test_schema_prompts_vary_the_context_and_share_the_continuation():
    item = schema_items(1)[0]
    assert core_eval.render_prompts(item, SCHEMA) == ["Ann gave Bob 0 coins so Ann was poorer.",
                                                      "Ann gave Bob 0 coins so Bob was poorer."]


def test_lm_prompt_without_the_continuation_is_a_stripped_prefix_of_the_one_with_it():
    items = lm_items(2)
    without, with_ = core_eval.render_prompts(items[0], LM, [items[1]])
    assert with_ == "The word after blue is blueblue\n\nThe word after red is redred"
    assert without == "The word after blue is blueblue\n\nThe word after red is"
    assert with_.startswith(without)


def test_fewshot_examples_are_seeded_distinct_and_never_the_item_itself():
    picks = core_eval.fewshot_indices(20, 7, 10)
    assert picks == core_eval.fewshot_indices(20, 7, 10)
    assert len(set(picks)) == 10 and 7 not in picks
    assert core_eval.fewshot_indices(20, 8, 10) != picks
    with pytest.raises(ValueError, match="at least 4 items"):
        core_eval.fewshot_indices(3, 0, 3)


def test_a_capped_task_evaluates_a_seeded_sample_and_fewshot_comes_from_the_whole_task():
    task = CoreTask(MC, mc_items(12))
    requests = core_eval.build_requests(task, max_items=3)
    assert [r.index for r in requests] == core_eval.select_items(12, 3) != [0, 1, 2]
    assert [r.index for r in core_eval.build_requests(task)] == list(range(12))
    assert all(r.prompts[0].count("\nAnswer: ") == 3 for r in requests)  # 2 shots + the item


# ----------------------------------------------------------------------------- scoring on mock models


@pytest.mark.parametrize("meta,items", [(MC, mc_items()), (SCHEMA, schema_items()), (LM, lm_items())])
def test_a_model_that_favours_the_gold_continuation_scores_one(meta, items):
    requests = core_eval.build_requests(CoreTask(meta, items))
    totals = core_totals(oracle_for(requests), requests)[meta.label]
    assert totals.count == len(items) and totals.accuracy == 1.0


@pytest.mark.parametrize("meta,items", [(MC, mc_items()), (SCHEMA, schema_items()), (LM, lm_items())])
def test_uniform_logits_score_exactly_the_random_baseline(meta, items):
    requests = core_eval.build_requests(CoreTask(meta, items))
    totals = core_totals(UniformModel(), requests)
    assert totals[meta.label].accuracy == pytest.approx(meta.random_baseline, abs=1e-12)
    result = core_eval.core_results([meta], totals)
    assert result["metric"] == pytest.approx(0.0, abs=1e-12)


def test_ties_give_fractional_credit_and_a_strict_minimum_full_credit():
    assert core_eval.option_credit([1.0, 1.0, 2.0, 1.0], gold=1) == pytest.approx(1 / 3)
    assert core_eval.option_credit([1.0, 1.0, 2.0, 1.0], gold=2) == 0.0
    assert core_eval.option_credit([0.5, 1.0], gold=0) == 1.0
    ulp_apart = [float(torch.full((n,), 6.238).mean()) for n in (3, 5, 7)]  # float32 means of one loss
    assert len(set(ulp_apart)) > 1 and core_eval.option_credit(ulp_apart, gold=0) == pytest.approx(1 / 3)


def test_spans_keep_at_least_one_token_when_one_choice_is_a_prefix_of_another():
    tokens = [[BOS, 1, 2, 3], [BOS, 1, 2, 3, 4, 5]]
    assert core_eval.continuation_spans(tokens, "multiple_choice") == [(3, 4), (3, 6)]
    assert core_eval.continuation_spans([[BOS, 7, 9], [BOS, 8, 9]], "schema") == [(2, 3), (2, 3)]
    assert core_eval.continuation_spans([[BOS, 5], [BOS, 5, 6, 7]], "language_modeling") == [(2, 4)]


def test_long_inputs_keep_their_last_tokens_and_still_score():
    tokens, spans = core_eval.crop_left([list(range(10)), list(range(4))], [(6, 10), (2, 4)], max_len=5)
    assert tokens == [list(range(5, 10)), list(range(4))] and spans == [(1, 5), (2, 4)]
    requests = core_eval.build_requests(CoreTask(MC, mc_items()))
    state = evaluation.EvalState(oracle_for(requests), ByteTokenizer(), "cpu", None)
    full = [r.score for r in core_eval.score_requests(state, requests)]
    state.max_seq_len = 48  # shorter than the prompts (~100 bytes): few-shot examples are cut
    assert max(len(p) for p in requests[0].prompts) > 48
    cropped = [r.score for r in core_eval.score_requests(state, requests)]
    assert len(cropped) == len(full) and all(0.0 <= s <= 1.0 for s in cropped)


# ----------------------------------------------------------------------------- centring and totals


def test_centring_maps_the_baseline_to_zero_and_perfect_to_one_and_core_is_their_mean():
    centred, metric = evaluation.centred_mean({"a": 0.25, "b": 1.0, "c": 0.6}, {"a": 0.25, "b": 0.5, "c": 0.2})
    assert centred == pytest.approx({"a": 0.0, "b": 1.0, "c": 0.5})
    assert metric == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no random baseline"):
        evaluation.centred_mean({"x": 0.5}, {})


def test_sharded_results_sum_to_exactly_the_unsharded_totals():
    rng = random.Random(3)
    results = [ItemResult(t, i, rng.choice([0.0, 1.0, 1 / 3, 0.5, 0.1]), 0.01) for t in ("a", "b") for i in range(57)]
    whole = evaluation.aggregate(results)
    for n in (2, 3, 7):
        shuffled = results[:]
        rng.shuffle(shuffled)
        shards = evaluation.shard_items(shuffled, n)
        assert [len(s) for s in shards] == sorted((len(s) for s in shards), reverse=True)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert sum(shards, []) == shuffled
        merged = evaluation.aggregate([r for shard in reversed(shards) for r in shard])
        assert {t: (v.score_sum, v.count) for t, v in merged.items()} == {
            t: (v.score_sum, v.count) for t, v in whole.items()}
    with pytest.raises(ValueError, match="evaluated twice"):
        evaluation.aggregate(results + results[:1])


# ----------------------------------------------------------------------------- task config and sources


def pack_rows() -> dict[str, list[dict]]:
    """Two rows per pack task in the datapack's field layout."""
    mc = [{"id": str(i), "question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": i} for i in range(2)]
    return {
        "hellaswag": [dict(r, activity_label="Cooking") for r in mc], "arc_easy": mc, "arc_challenge": mc,
        "commonsense_qa": mc, "openbookqa": mc, "piqa": [dict(r, choices=["x", "y"]) for r in mc],
        "copa": [dict(r, question="It rained.", choices=["We stayed in.", "Grass grew."], relation=rel)
                 for r, rel in zip(mc, ("effect", "cause"), strict=True)],
        "boolq": [dict(r, context="Some passage.", choices=["no", "yes"], answer=i % 2) for i, r in enumerate(mc)],
        "winogrande": [{"id": str(i), "question": "Tom hugged Sam because _ was sad.", "choices": ["Tom", "Sam"],
                        "answer": 1} for i in range(2)],
        "lambada": [{"id": str(i), "context": "He opened the", "answer_text": "door"} for i in range(2)],
        "jeopardy": [{"id": str(i), "category": "SCIENCE", "question": "It is H2O", "answer_text": "water"}
                     for i in range(2)],
        "squad": [{"id": str(i), "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
                   "answer_text": "France", "answers": ["France"]} for i in range(2)],
        "coqa": [{"id": str(i), "context": "A story.", "history": [{"question": "Who?", "answer": "Ann"}],
                  "question": "Where?", "answer_text": "home", "answers": ["home"]} for i in range(2)],
    }


@pytest.fixture
def fake_pack(tmp_path):
    root = tmp_path / "eval"
    for task, rows in pack_rows().items():
        for spec in core_tasks.PACK_TASKS.values():
            if spec.pack_task == task:
                (root / task).mkdir(parents=True, exist_ok=True)
                (root / task / f"{spec.split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_every_pack_task_renders_its_rows_into_scorable_items(fake_pack):
    tasks = core_tasks.pack_core_tasks(eval_dir=fake_pack)
    assert [t.meta.label for t in tasks] == list(core_tasks.PACK_TASKS) and len(tasks) == 14
    assert core_tasks.core_label(len(tasks)) == "CORE-14 (our config)"
    by_label = {t.meta.label: t for t in tasks}
    assert by_label["copa"].items[0]["query"] == "It rained therefore"
    assert by_label["copa"].items[1]["query"] == "It rained because"
    assert by_label["copa"].items[0]["choices"] == ["we stayed in.", "grass grew."]
    assert by_label["winogrande"].items[0] == {"context_options": ["Tom hugged Sam because Tom",
                                                                   "Tom hugged Sam because Sam"],
                                               "continuation": "was sad.", "gold": 1}
    assert by_label["boolq"].items[0]["query"] == "Passage: Some passage.\nQuestion: q0?"
    for task in tasks:  # few-shot needs more rows than the fake has: score zero-shot
        meta = TaskMeta(task.meta.label, task.meta.task_type, 0, task.meta.continuation_delimiter,
                        task.meta.random_baseline)
        requests = core_eval.build_requests(CoreTask(meta, task.items))
        assert core_totals(UniformModel(), requests)[meta.label].count == 2


def test_unknown_task_names_and_missing_sets_are_clear_errors(fake_pack, tmp_path):
    with pytest.raises(ValueError, match=r"unknown CORE task\(s\) \['nope'\].*hellaswag_zeroshot"):
        core_tasks.pack_core_tasks(["arc_easy", "nope"], eval_dir=fake_pack)
    with pytest.raises(ValueError, match="unknown evaluation task 'mmlu'"):
        evaluation.load_pack_items("mmlu", "test", fake_pack)
    with pytest.raises(ValueError, match="no split 'validation'.*'test'"):
        evaluation.load_pack_items("arc_easy", "validation", fake_pack)
    with pytest.raises(FileNotFoundError, match="jobs.data"):
        evaluation.load_pack_items("arc_easy", "test", tmp_path / "empty")


def write_bundle(root, label="tiny_mc"):
    (root / "eval_data" / "x").mkdir(parents=True)
    (root / "core.yaml").write_text(
        f"icl_tasks:\n- label: {label}\n  dataset_uri: x/{label}.jsonl\n  num_fewshot: [1]\n"
        "  icl_task_type: multiple_choice\n  continuation_delimiter: \"\\nAnswer: \"\n")
    (root / "eval_meta_data.csv").write_text(f"Eval Task,Task Category,Random baseline\n{label},x,25\n")
    (root / "eval_data" / "x" / f"{label}.jsonl").write_text(
        "".join(json.dumps(item) + "\n" for item in mc_items(5)))


def test_an_unpacked_bundle_loads_with_baselines_as_fractions(tmp_path):
    write_bundle(tmp_path / "b")
    (task,) = core_eval.load_bundle_tasks(tmp_path / "b")
    assert task.meta == TaskMeta("tiny_mc", "multiple_choice", 1, "\nAnswer: ", 0.25)
    assert len(task.items) == 5
    with pytest.raises(ValueError, match="unknown CORE task"):
        core_eval.load_bundle_tasks(tmp_path / "b", ["squad"])
    sel = core_tasks.select_core_tasks("auto", bundle_dir=tmp_path / "b")
    assert (sel.source, sel.label) == ("bundle", "CORE")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/eval_bundle.zip"  # nothing listens: refused at once


def test_the_bundle_download_fails_fast_offline_and_auto_falls_back_to_the_pack(tmp_path, fake_pack):
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="core_source=pack"):
        core_eval.ensure_bundle(tmp_path / "none", url=closed_port_url(), timeout_s=2.0)
    assert time.monotonic() - t0 < 30  # generous: the point is that it does not hang
    offline = {"bundle_dir": tmp_path / "none", "url": closed_port_url(), "timeout_s": 2.0}
    sel = core_tasks.select_core_tasks("auto", ["copa", "squad"], eval_dir=fake_pack, **offline)
    assert (sel.source, sel.label) == ("pack", "CORE-2 (our config)") and "unreachable" in sel.note
    with pytest.raises(SourceUnavailableError):
        core_tasks.select_core_tasks("bundle", **offline)


# ----------------------------------------------------------------------------- bpb batches


def test_validation_batches_cover_the_token_stream_once_and_pad_the_tail():
    tok = ByteTokenizer()
    docs = ["hello world", "a second document", "x" * 40]
    stream = [t for d in docs for t in tok.encode(d, prepend=BOS)]
    batches = list(evaluation.val_batches(docs, tok, batch_size=2, seq_len=8, encode_group=2))
    targets = [t for _, y in batches for t in y.reshape(-1).tolist() if t >= 0]
    assert targets == stream[1:]
    x0, y0 = batches[0]
    assert x0.shape == (2, 8) and x0.reshape(-1)[0] == BOS and torch.equal(x0.reshape(-1)[1:], y0.reshape(-1)[:-1])
    assert (batches[-1][1] == -1).any()
    capped = list(evaluation.val_batches(docs, tok, batch_size=2, seq_len=8, max_tokens=16))
    assert len(capped) == 1


def test_val_bpb_of_a_uniform_model_is_log2_of_the_vocabulary(tmp_path):
    class Uniform(torch.nn.Module):
        config = SimpleNamespace(sequence_len=16)

        def forward(self, idx, targets, loss_reduction="mean"):
            logits = torch.zeros(*idx.shape, VOCAB)
            return torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1), ignore_index=-1,
                                                     reduction=loss_reduction).view(targets.shape)

    shards = write_shards(["training text"], ["some text to score"] * 5, tmp_path / "data")
    state = evaluation.EvalState(Uniform(), ByteTokenizer(), "cpu", 16)
    out = evaluation.val_bpb(state, [str(shards[-1])], max_tokens=1000, batch_size=2)
    assert out["tokens"] == 5 * len("some text to score") + 4  # every byte, and the BOS of documents 2..5
    assert out["bpb"] == pytest.approx(math.log2(VOCAB))  # BOS targets have no bytes and are left out
