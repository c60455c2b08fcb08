"""Tests for the chat evaluation (nanochat/evals/chat.py) and the chat side of the evaluate job.

Run: `PYTHONPATH=. python -m pytest tests/test_chat_eval.py` (add `-m "not cluster"` for the quick ones).
Without Ray: a scripted mock model (its next token is a function of the sequence so far, read back
from the real KV cache as tests/test_engine.py does) on a bytes-only tokenizer answers hand-made
ARC/GSM8K/HumanEval items: restricted argmax with tie credit, GSM8K through the Python tool, pass@k,
the format metric, ChatCORE, and bad input (an unknown task, a missing checkpoint). On the
session's local Ray cluster: a tiny random GPT evaluated over 1 and 2 actors gives identical answers
and totals, and the job evaluates an SFT stage end to end on the micro preset.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from jobs import evaluate as job
from nanochat.evals import chat as chat_eval
from nanochat.evals.chat import ChatAnswer, SampleAnswers, SampleSettings
from nanochat.evals.harness import EvalState, TaskTotals, aggregate
from nanochat.kv_cache import dense_mask
from nanochat.tasks import GSM8K, HumanEval, Identity, MultipleChoiceTask, eval_tasks
from nanochat.tokenizer import Tokenizer
from tests.helpers import random_gpt, tiny_gpt

ROWS = [  # hand-made multiple-choice rows: gold letters A, B, B, C, A, B, D, B
    {"question": f"Question {i}?", "choices": [f"w{i}", f"x{i}", f"y{i}", f"z{i}"], "answer": a}
    for i, a in enumerate([0, 1, 1, 2, 0, 1, 3, 1])
]
GSM_ROWS = [{"question": "Tom has 6 boxes of 3 apples. How many apples?", "solution": "6*3=<<6*3=18>>18\n#### 18"},
            {"question": "Ann has 2 cats and 5 dogs. How many pets?", "solution": "2+5=<<2+5=7>>7\n#### 7"}]

# the chat tasks read their offline rows (ARC, MMLU, GSM8K, word list) from the embedded pack
pytestmark = pytest.mark.usefixtures("embedded_pack", "one_torch_thread")


class ScriptedModel:
    """forward(idx, kv_cache=None) -> logits (B, T, V): `next_token(prefix)` gets a logit of 50, the
    rest 0 (None: all 0, i.e. uniform). With a cache, the prefix is read back from it (the ids are
    stored as keys/values: 1 layer, 1 head of dim 1)."""

    def __init__(self, next_token: Callable[[list[int]], int | None], vocab: int, seq_len: int = 256) -> None:
        self.next_token = next_token
        self.vocab = vocab
        self.config = SimpleNamespace(n_layer=1, n_head=1, n_kv_head=1, n_embd=1, sequence_len=seq_len,
                                      vocab_size=vocab)

    def _logits(self, prefixes: list[list[list[int]]]) -> torch.Tensor:
        logits = torch.zeros(len(prefixes), len(prefixes[0]), self.vocab)
        for b, row in enumerate(prefixes):
            for t, prefix in enumerate(row):
                nxt = self.next_token(prefix)
                if nxt is not None:
                    logits[b, t, nxt] = 50.0
        return logits

    def __call__(self, idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
        if kv_cache is None:
            ids = idx.tolist()
            return self._logits([[row[: t + 1] for t in range(len(row))] for row in ids])
        x = idx.to(torch.float32)[:, None, :, None]  # (B, 1, T, 1)
        _, v_all, mask = kv_cache.insert_kv(0, x, x)  # v_all (B, 1, T_keys, 1), mask (B, 1, T, T_keys)
        mask = dense_mask(mask, v_all, idx.size(1))  # None = every key visible
        return self._logits([[v_all[b, 0, mask[b, 0, t], 0].long().tolist() for t in range(idx.size(1))]
                             for b in range(idx.size(0))])


def answering(tok: Tokenizer, script: list[int]) -> Callable[[list[int]], int | None]:
    """next_token that writes `script` after the last <|assistant_start|>, then ends the turn."""
    start, end = tok.encode_special("<|assistant_start|>"), tok.encode_special("<|assistant_end|>")

    def next_token(prefix: list[int]) -> int | None:
        if start not in prefix:
            return None
        written = len(prefix) - 1 - max(i for i, t in enumerate(prefix) if t == start)
        return script[written] if written < len(script) else end

    return next_token


def state_of(model: ScriptedModel, tok: Tokenizer) -> EvalState:
    return EvalState(model, tok, "cpu", model.config.sequence_len)


def arc(rows: list[dict] = ROWS) -> MultipleChoiceTask:
    return MultipleChoiceTask(rows, "arc_easy/test")


# ----------------------------------------------------------------------------- categorical


def test_categorical_is_the_argmax_over_the_letters_and_ties_share_the_credit(byte_tok):
    tasks = {"arc_easy": arc()}
    requests = chat_eval.chat_requests(tasks)
    b = byte_tok.encode("B")[0]
    always_b = ScriptedModel(lambda p: b, byte_tok.vocab_size)
    answers = chat_eval.score_choices(state_of(always_b, byte_tok), requests)
    assert [a.texts for a in answers] == [("B",)] * len(ROWS)
    totals = aggregate(chat_eval.check_answers(requests, answers, tasks))
    assert totals["arc_easy"].accuracy == 4 / 8  # four of the gold letters are B

    # a token outside the letters is ignored: the restricted argmax still picks among A-D
    z = byte_tok.encode("Z")[0]
    state = state_of(ScriptedModel(lambda p: z, byte_tok.vocab_size), byte_tok)
    answers = chat_eval.score_choices(state, requests)
    assert [a.score for a in answers] == [0.25] * len(ROWS)  # A-D tie exactly: 1/4 credit each
    doc = chat_eval.chat_results(tasks, aggregate(chat_eval.check_answers(requests, answers, tasks)), answers, 1)
    assert doc["tasks"]["arc_easy"]["accuracy"] == 0.25 and doc["chatcore"] == 0.0


def test_a_long_prompt_keeps_its_last_tokens_and_is_counted(byte_tok):
    long_row = {**ROWS[0], "question": "word " * 400}
    tasks = {"arc_easy": arc([long_row, ROWS[1]])}
    requests = chat_eval.chat_requests(tasks)
    model = ScriptedModel(lambda p: byte_tok.encode("A")[0], byte_tok.vocab_size, seq_len=128)
    answers = chat_eval.score_choices(state_of(model, byte_tok), requests)
    assert [a.truncated for a in answers] == [True, False] and [a.score for a in answers] == [1.0, 0.0]
    doc = chat_eval.chat_results(tasks, aggregate(chat_eval.check_answers(requests, answers, tasks)), answers, 1)
    assert doc["tasks"]["arc_easy"]["prompts_truncated"] == 1


# ----------------------------------------------------------------------------- generative


def test_gsm8k_is_answered_with_the_python_tool_and_checked_by_the_task(byte_tok):
    sp = byte_tok.encode_special
    calls = []

    def tool(code: str) -> str:
        calls.append(code)
        return str(eval(code, {}))  # the test's own arithmetic, standing in for the sandbox

    script = [sp("<|python_start|>"), *byte_tok.encode("6*3"), sp("<|python_end|>"),
              sp("<|output_start|>"), *byte_tok.encode("18"), sp("<|output_end|>"),
              *byte_tok.encode(" so #### 18")]
    tasks = {"gsm8k": GSM8K("test", rows=GSM_ROWS)}
    requests = chat_eval.chat_requests(tasks)
    model = ScriptedModel(answering(byte_tok, script), byte_tok.vocab_size)
    answers = SampleAnswers(SampleSettings(max_new_tokens=40), tool)(state_of(model, byte_tok), requests)
    assert calls == ["6*3", "6*3"]  # one tool call per item, decoded from the sampled block
    assert answers[0].texts[0] == "<|python_start|>6*3<|python_end|><|output_start|>18<|output_end|> so #### 18"
    results = chat_eval.check_answers(requests, answers, tasks)
    assert [r.score for r in results] == [1.0, 0.0]  # 18 is right for the first item only


def test_pass_at_k_counts_an_item_when_any_sample_is_right():
    tasks = {"gsm8k": GSM8K("test", rows=GSM_ROWS)}
    requests = chat_eval.chat_requests(tasks)
    answers = [ChatAnswer("gsm8k", 0, ("#### 3", "#### 18", "no"), None, False, 0.0),
               ChatAnswer("gsm8k", 1, ("#### 8", "#### 6", "#### 70"), None, False, 0.0)]
    assert [r.score for r in chat_eval.check_answers(requests, answers, tasks)] == [1.0, 0.0]


def test_humaneval_answers_go_to_the_checker_as_extracted_code():
    rows = [{"prompt": "def f(x):\n", "canonical_solution": "    return x\n", "test": "def check(c): assert c(1) == 1",
             "entry_point": "f"}]
    tasks = {"humaneval": HumanEval("test", rows=rows)}
    requests = chat_eval.chat_requests(tasks)
    seen = []

    def checker(problems):
        seen.extend(problems)
        return [p["completion"].strip() == "return x" for p in problems]

    answers = [ChatAnswer("humaneval", 0, ("Sure:\n```python\n    return 2\n```", "```python\n    return x\n```"),
                          None, False, 0.0)]
    results = chat_eval.check_answers(requests, answers, tasks, checker)
    assert [p["completion"] for p in seen] == ["    return 2\n", "    return x\n"]
    assert seen[0]["entry_point"] == "f" and seen[0]["test"] == rows[0]["test"]
    assert results[0].score == 1.0


def test_sampling_is_seeded_per_item_whatever_the_chunk(byte_tok):
    """Temperature 1 over uniform logits: item i draws the same samples alone or after other items."""
    tasks = {"gsm8k": GSM8K("test", rows=GSM_ROWS)}
    requests = chat_eval.chat_requests(tasks)
    model = ScriptedModel(lambda p: None, byte_tok.vocab_size)
    sampler = SampleAnswers(SampleSettings(num_samples=3, max_new_tokens=6, temperature=1.0, seed=7))
    together = sampler(state_of(model, byte_tok), requests)
    alone = sampler(state_of(model, byte_tok), requests[1:])
    assert together[1].texts == alone[0].texts and len(set(together[1].texts)) == 3


def test_a_real_model_answers_each_item_in_a_batch_as_it_would_alone(byte_tok, monkeypatch):
    """Items decode together (GENERATION_ROWS rows, admitted as rows free up): a random GPT gives
    every item the same samples and format text as when it runs on its own, at temperature 1 and
    greedy, with fewer rows than samples in flight (admission as rows free up)."""
    from nanochat.gpt import GPTConfig

    model = random_gpt(GPTConfig.from_depth(2, byte_tok.vocab_size, 256, head_dim=64), seed=5)
    state = EvalState(model, byte_tok, "cpu", 256)
    evals = eval_tasks(offline=True)
    requests = chat_eval.chat_requests({"gsm8k": evals["gsm8k"]}, max_per_task=5)
    formats = chat_eval.format_requests(evals, 7)
    monkeypatch.setattr(chat_eval, "GENERATION_ROWS", 4)  # 5 items x 2 samples > 4 rows: queued
    for settings in (SampleSettings(num_samples=2, max_new_tokens=10, temperature=1.0, seed=3),
                     SampleSettings(num_samples=1, max_new_tokens=10, temperature=0.0)):
        sampler = SampleAnswers(settings)
        together = [a.texts for a in sampler(state, requests)]
        alone = [sampler(state, [r])[0].texts for r in requests]
        assert together == alone and len(set(together)) > 1
    together = [(a.texts, a.score) for a in chat_eval.check_format(state, formats)]
    assert together == [(a.texts, a.score) for r in formats for a in chat_eval.check_format(state, [r])]


def test_bad_sample_settings_are_refused():
    with pytest.raises(ValueError, match="would all be the same greedy answer"):
        SampleSettings(num_samples=4, temperature=0.0)


# ----------------------------------------------------------------------------- format metric


def test_format_counts_exactly_one_letter_then_the_end_of_the_turn(byte_tok):
    tasks = {"arc_easy": arc(), "mmlu": arc(ROWS[::-1]), "gsm8k": GSM8K("test", rows=GSM_ROWS)}
    requests = chat_eval.format_requests(tasks, 6)
    assert [r.index for r in requests] == list(range(6)) and {r.kind for r in requests} == {"format"}
    assert requests == chat_eval.format_requests(tasks, 6)  # fixed items
    cases = {"C": 1.0, "C.": 0.0, " C": 0.0, "Z": 0.0, "": 0.0}
    for text, expected in cases.items():
        model = ScriptedModel(answering(byte_tok, byte_tok.encode(text)), byte_tok.vocab_size)
        answers = chat_eval.check_format(state_of(model, byte_tok), requests)
        assert {a.score for a in answers} == {expected}, text
    summary = chat_eval.format_summary(answers)
    assert summary["format_rate"] == 0.0 and summary["format"]["num_items"] == 6
    uniform = chat_eval.check_format(state_of(ScriptedModel(lambda p: None, byte_tok.vocab_size), byte_tok),
                                     requests)
    assert {a.score for a in uniform} == {0.0}


def test_format_items_are_shared_over_the_multiple_choice_tasks():
    evals = eval_tasks(offline=True)
    requests = chat_eval.format_requests(evals, 200)
    assert len(requests) == 200 and all(r.conversation["letters"] for r in requests)
    owner = {}
    for name in ("arc_challenge", "arc_easy", "mmlu"):  # name order: shares 67, 67, 66
        owner.update({evals[name].get(i)["messages"][0]["content"]: name for i in range(len(evals[name]))})
    shares = {}
    for r in requests:
        name = owner[r.conversation["messages"][0]["content"]]
        shares[name] = shares.get(name, 0) + 1
    assert shares == {"arc_challenge": 67, "arc_easy": 67, "mmlu": 66}
    with pytest.raises(ValueError, match="needs a multiple-choice task"):
        chat_eval.format_requests({"gsm8k": evals["gsm8k"]}, 10)


# ----------------------------------------------------------------------------- selection and totals


def test_selection_is_seeded_sorted_and_unknown_names_are_refused():
    evals = eval_tasks(offline=True)
    assert list(chat_eval.select_tasks(evals, None)) == list(chat_eval.CHAT_TASKS)
    with pytest.raises(ValueError, match=r"unknown chat task\(s\) \['mmlu_pro'\]: the chat evaluation tasks are"):
        chat_eval.select_tasks(evals, ["arc_easy", "mmlu_pro"])
    picked = chat_eval.select_indices(14042, 50)
    assert picked == sorted(picked) and picked == chat_eval.select_indices(14042, 50) and len(set(picked)) == 50
    assert chat_eval.select_indices(5, 50) == list(range(5))
    with pytest.raises(ValueError, match="training-only"):
        chat_eval.chat_requests({"identity": Identity(3)})


def test_chatcore_centres_each_task_by_its_baseline():
    evals = eval_tasks(offline=True)
    accuracies = {"arc_easy": 0.5, "arc_challenge": 0.25, "mmlu": 0.4, "gsm8k": 0.1, "humaneval": 0.05}
    totals = {n: TaskTotals(n, a * 100, 100, 1.0) for n, a in accuracies.items()}
    doc = chat_eval.chat_results(evals, totals, [], 1)
    expected = [(0.5 - 0.25) / 0.75, 0.0, (0.4 - 0.25) / 0.75, 0.1, 0.05]
    assert doc["chatcore"] == pytest.approx(sum(expected) / 5) and doc["label"] == "ChatCORE"
    assert doc["tasks"]["gsm8k"]["metric"] == "pass@1" and doc["tasks"]["mmlu"]["metric"] == "accuracy"
    with pytest.raises(ValueError, match="no results for chat task"):
        chat_eval.chat_results(evals, {"arc_easy": totals["arc_easy"]}, [], 1)


# ----------------------------------------------------------------------------- the job, without Ray


def test_a_chat_stage_without_its_checkpoint_names_the_stage_to_run(tmp_path, capsys):
    rc = job.main(["--stage", "sft", "--preset", "micro", "--run", "r", "--storage", str(tmp_path)])
    assert rc == 2 and "run the sft stage first" in capsys.readouterr().err


def test_an_unknown_chat_task_is_refused_before_any_work(tmp_path, byte_tok, capsys):
    from cluster.storage import RunStorage
    from nanochat.checkpoint import save_model
    from nanochat.gpt import GPT, GPTConfig

    storage = RunStorage("r", str(tmp_path))
    with storage.writer("sft", {}) as w:
        save_model(w.path / "model", GPT(GPTConfig.from_depth(1, byte_tok.vocab_size, 32, head_dim=64)), {"step": 0})
        byte_tok.save(w.path / "model" / "tokenizer")
        w.commit()
    rc = job.main(["--stage", "sft", "--preset", "micro", "--run", "r", "--storage", str(tmp_path),
                   "--set", "chat_tasks=[arc_easy,gsm8k_hard]"])
    assert rc == 2 and "unknown chat task(s) ['gsm8k_hard']" in capsys.readouterr().err
    assert not (tmp_path / "r" / "evaluate").exists()


# ----------------------------------------------------------------------------- on the cluster


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory, byte_tok):
    """A depth-2 GPT with random weights (it answers something different to every prompt) and its tokenizer."""
    from nanochat.checkpoint import save_model
    from nanochat.gpt import GPTConfig

    model = tiny_gpt(GPTConfig.from_depth(2, byte_tok.vocab_size, 256, head_dim=64), init=False)
    dest = tmp_path_factory.mktemp("chatmodel") / "model"
    save_model(dest, model, {"step": 0})
    byte_tok.save(dest / "tokenizer")
    return dest


@pytest.mark.cluster
def test_two_actors_give_the_answers_and_totals_of_one(ray_cluster, random_model_dir):
    from cluster.eval_pool import EvalPool, PoolSpec, load_from_storage

    evals = eval_tasks(offline=True)
    tasks = {n: evals[n] for n in ("arc_easy", "mmlu", "gsm8k")}
    requests = chat_eval.chat_requests(tasks, max_per_task=6)
    categorical = [r for r in requests if r.kind == "categorical"]
    generative = [r for r in requests if r.kind == "generative"]
    formats = chat_eval.format_requests(evals, 9)
    sampler = SampleAnswers(SampleSettings(num_samples=2, max_new_tokens=12, temperature=1.0, seed=3))
    loader = functools.partial(load_from_storage, str(random_model_dir), None)
    runs = {}
    for n in (1, 2):
        with EvalPool(loader, PoolSpec(n, 1.0, 0.0, 1)) as pool:
            assert len({a["pid"] for a in pool.ready()}) == n
            answers = pool.map(chat_eval.score_choices, categorical, chunks_per_actor=2)
            answers += pool.map(sampler, generative, chunks_per_actor=2)
            fmt = pool.map(chat_eval.check_format, formats, chunks_per_actor=2)
        results = chat_eval.check_answers(categorical + generative, answers, tasks)
        totals = {t: (v.score_sum, v.count) for t, v in aggregate(results).items()}
        runs[n] = ([a.texts for a in answers + fmt], totals, [a.score for a in fmt])
    assert runs[1] == runs[2]
    texts, totals, _ = runs[2]
    assert {c for _, c in totals.values()} == {6}
    assert len({t for item in texts[12:] for t in item}) > 1  # sampled answers differ


@pytest.mark.cluster
def test_the_job_evaluates_a_chat_stage_end_to_end(ray_cluster, random_model_dir, tmp_path, capsys):
    import shutil

    from cluster.storage import RunStorage

    storage = RunStorage("r", str(tmp_path))
    with storage.writer("sft", {"depth": 2}) as w:
        shutil.copytree(random_model_dir, w.path / "model")
        w.metrics["loss"] = 1.0
        w.commit()
    argv = ["--stage", "sft", "--preset", "micro", "--run", "r", "--storage", str(tmp_path)]
    assert job.main(argv) == 0
    doc = json.loads((tmp_path / "r" / "evaluate" / "sft.json").read_text())
    chat = doc["chat"]
    assert list(chat["tasks"]) == list(chat_eval.CHAT_TASKS) and chat["label"] == "ChatCORE"
    for name, t in chat["tasks"].items():
        assert 0.0 <= t["accuracy"] <= 1.0 and t["num_items"] == 4, name
    assert chat["tasks"]["arc_easy"]["random_baseline"] == 0.25 and chat["tasks"]["gsm8k"]["random_baseline"] == 0
    assert isinstance(chat["chatcore"], float) and 0.0 <= chat["format_rate"] <= 1.0
    assert chat["format"]["num_items"] == 12 and doc["eval_bpb"] > 0 and "core" not in doc
    assert doc["sandbox"] and doc["input_metrics"] == {"loss": 1.0}
    out = capsys.readouterr().out
    assert "ChatCORE:" in out and "format:" in out
