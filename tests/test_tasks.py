"""Tests for nanochat/tasks: rendering, masks, mixtures, the train/eval split, answers and bad input.

Run: `PYTHONPATH=. python -m pytest tests/test_tasks.py`. No Ray, no network (the hub is never
probed: sources are "pack" or given rows). Tests on real data need the embedded pack
(`python -m jobs.data --source embedded`) and skip without it; two run the real sandbox.
"""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from nanochat.data.dataset import nanochat_home
from nanochat.sandbox import Sandbox, format_tool_output
from nanochat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    Arithmetic,
    HumanEval,
    Identity,
    LetterCount,
    SciQ,
    SmolTalk,
    SocialIQA,
    Spelling,
    Task,
    TaskMixture,
    TaskSequence,
    WithoutItems,
    check_disjoint,
    eval_tasks,
    find_overlap,
    get_task,
    sources,
    training_mixture,
)
from nanochat.tasks.base import MultipleChoiceTask, assistant_text
from nanochat.tasks.gsm8k import (
    answers_match,
    evaluate_arithmetic,
    extract_answer,
    in_demo_part,
    solution_parts,
)
from nanochat.tasks.humaneval import extract_code
from nanochat.tasks.spelling import is_test_word, word_list

HAVE_PACK = (nanochat_home() / "data" / "eval" / "index.json").is_file()
needs_pack = pytest.mark.skipif(not HAVE_PACK, reason="embedded pack missing: python -m jobs.data --source embedded")
WORDS = ["apple", "banana", "strawberry", "letter", "python", "cluster", "token", "model", "chat", "ray",
         "spelling", "mixture", "evaluate", "sandbox", "gradient", "tokenizer", "engine", "stage", "window",
         "garden", "number", "yellow", "bottle", "coffee", "mission", "balloon", "committee", "parallel"]
SMOLTALK_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
MC_ROWS = [{"id": str(i), "question": f"Question {i}?", "choices": [f"c{i}a", f"c{i}b", f"c{i}c", f"c{i}d"],
            "answer": i % 4} for i in range(12)]


class Numbers(Task):
    """A tiny task whose conversations say their own number (for mixture tests)."""

    def __init__(self, name: str, n: int, **slicing):
        super().__init__(**slicing)
        self.name, self.n = name, n

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"{self.name} {index}"},
                             {"role": "assistant", "content": str(index)}]}


def small_tasks() -> dict[str, Task]:
    """One small instance of every task type (real pack rows where the type has them)."""
    tasks: dict[str, Task] = {
        "smoltalk": SmolTalk(rows=SMOLTALK_ROWS),
        "identity": Identity(20),
        "spelling": Spelling(10, words=WORDS),
        "letter_count": LetterCount(10, words=WORDS),
        "arithmetic": Arithmetic(16),
        "multiple_choice": MultipleChoiceTask(MC_ROWS, "given"),
    }
    if HAVE_PACK:
        tasks.update({
            "arc_easy": ARC("easy", "validation", source="pack", stop=5),
            "arc_challenge": ARC("challenge", "test", source="pack", stop=5),
            "mmlu": MMLU("dev", source="pack", stop=5),
            "sciq": SciQ(source="pack", stop=5),
            "social_iqa": SocialIQA(source="pack", stop=5),
            "gsm8k": GSM8K("test", source="pack", stop=5),
            "humaneval": HumanEval(source="pack", stop=3),
        })
    return tasks


def check_shape(conversation: dict) -> None:
    messages = conversation["messages"]
    if messages[0]["role"] == "system":
        messages = messages[1:]
    assert messages and len(messages) % 2 == 0
    for i, m in enumerate(messages):
        assert m["role"] == ("user" if i % 2 == 0 else "assistant")
        if m["role"] == "user":
            assert isinstance(m["content"], str) and m["content"].strip()
            continue
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        assert parts
        for j, part in enumerate(parts):
            assert part["type"] in ("text", "python", "python_output") and isinstance(part["text"], str)
            if part["type"] == "python":
                assert parts[j + 1]["type"] == "python_output"


# ----------------------------------------------------------------------------- rendering and masks


@pytest.mark.parametrize("name", sorted(small_tasks()))
def test_every_task_type_renders_conversations(name):
    task = small_tasks()[name]
    assert len(task) > 0
    for conversation in task:
        check_shape(conversation)
        if task.eval_type == "categorical":
            letters, user = conversation["letters"], conversation["messages"][0]["content"]
            assert conversation["messages"][-1]["content"] in letters
            assert all(f"\n{letter}. " in user for letter in letters)
            assert f"\n{chr(ord(letters[-1]) + 1)}. " not in user


@needs_pack
def test_multiple_choice_rendering_details():
    sciq = SciQ(source="pack")
    with_passage = next(c for i, c in enumerate(sciq) if sciq.rows[i]["context"])
    assert with_passage["messages"][0]["content"].startswith("Passage: ")
    social = SocialIQA(source="pack").get(0)
    assert social["letters"] == ["A", "B", "C"] and social["messages"][0]["content"].startswith("Situation: ")
    mmlu = MMLU("dev", source="pack").get(0)["messages"][0]["content"]
    assert mmlu.startswith("A multiple choice question about abstract algebra.")
    row = ARC("easy", "validation", source="pack").rows[0]
    arc = ARC("easy", "validation", source="pack").get(0)
    assert arc["messages"][1]["content"] == "ABCDE"[row["answer"]]
    assert f"A. {row['choices'][0]}" in arc["messages"][0]["content"]


def test_masks_are_one_exactly_on_assistant_tokens():
    tokenizer = pytest.importorskip("nanochat.tokenizer")
    conversations = [c for task in small_tasks().values() for c in list(task)[:4]]
    texts = [str(c["messages"]) for c in conversations]
    tok = tokenizer.Tokenizer.train_from_iterator(texts, 512)
    for conversation in conversations:
        ids, mask = tok.render_conversation(conversation, max_tokens=100_000)
        assert len(ids) == len(mask) and mask[0] == 0
        expected = ""
        for m in conversation["messages"]:
            if m["role"] != "assistant":
                continue
            parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            for part in parts:
                if part["type"] == "text":
                    expected += part["text"]
                elif part["type"] == "python":
                    expected += f"<|python_start|>{part['text']}<|python_end|>"
            expected += "<|assistant_end|>"
        assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == expected
        unmasked = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        assert conversation["messages"][-2]["content"] in unmasked  # the last user turn is context, not target


# ----------------------------------------------------------------------------- mixtures and slicing


def test_slicing_follows_python_slice_semantics():
    task = Numbers("n", 10, start=1, stop=8, step=3)
    assert len(task) == 3 and [c["messages"][1]["content"] for c in task] == ["1", "4", "7"]
    assert len(Numbers("n", 5, stop=100)) == 5 and len(Numbers("n", 5, start=7)) == 0
    with pytest.raises(IndexError, match="out of range"):
        task.get(3)
    with pytest.raises(ValueError, match="step >= 1"):
        Numbers("n", 5, step=0)


def test_mixture_is_a_deterministic_shuffle_of_every_item():
    tasks = [Numbers("a", 30), Numbers("b", 20)]
    order = [c["messages"][0]["content"] for c in TaskMixture(tasks, seed=7)]
    assert order == [c["messages"][0]["content"] for c in TaskMixture(tasks, seed=7)]
    assert order != [c["messages"][0]["content"] for c in TaskMixture(tasks, seed=8)]
    assert sorted(order) == sorted([f"a {i}" for i in range(30)] + [f"b {i}" for i in range(20)])
    assert order != [f"a {i}" for i in range(30)] + [f"b {i}" for i in range(20)]  # really shuffled


def test_listing_a_task_twice_oversamples_it():
    a, b = Numbers("a", 10), Numbers("b", 10)
    mixture = TaskMixture([a, a, b], seed=1)
    assert mixture.counts() == {"a": 20, "b": 10}
    seen = [c["messages"][0]["content"] for c in mixture]
    assert all(seen.count(f"a {i}") == 2 and seen.count(f"b {i}") == 1 for i in range(10))
    assert mixture.task_of(0) in (a, b) and len(TaskMixture([a, a, b], seed=1, stop=5)) == 5


def test_sequence_keeps_task_order():
    seq = TaskSequence([Numbers("a", 2), Numbers("b", 3)])
    assert [c["messages"][0]["content"] for c in seq] == ["a 0", "a 1", "b 0", "b 1", "b 2"]


def test_mixture_with_zero_examples_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one task"):
        TaskMixture([])
    with pytest.raises(ValueError, match=r"zero examples: b\[0:0\]"):
        TaskMixture([Numbers("a", 3), Numbers("b", 5, stop=0)])
    with pytest.raises(ValueError, match="zero examples"):
        TaskSequence([Identity(0)])


# ----------------------------------------------------------------------------- the train/eval split


def test_overlap_check_finds_shared_items_and_without_items_removes_them():
    train = MultipleChoiceTask(MC_ROWS, "train")
    # the same question with its choices reordered and re-spaced is the same item
    leaked = {**MC_ROWS[3], "choices": [f"  {c.upper()}" for c in reversed(MC_ROWS[3]["choices"])], "answer": 0}
    evals = [MultipleChoiceTask([leaked, {**MC_ROWS[5], "choices": ["other", "x", "y", "z"]}], "eval")]
    assert [(name, i) for name, _, i in find_overlap(train, evals)] == [("eval", 3)]
    with pytest.raises(ValueError, match="shares items with the evaluation sets.*train item 3 is in eval"):
        check_disjoint(train, evals)
    keys = {t.item_key(i) for t in evals for i in range(len(t))}
    clean = WithoutItems(train, keys)
    assert len(clean) == len(train) - 1 and clean.dropped == 1
    check_disjoint(clean, evals)
    check_disjoint(TaskMixture([clean, Identity(5)]), evals)


@needs_pack
def test_real_mmlu_splits_overlap_and_the_mixtures_exclude_it():
    evals = eval_tasks(offline=True)
    with pytest.raises(ValueError, match="mmlu/test"):
        check_disjoint(MMLU("dev", source="pack"), [evals["mmlu"]])  # 5 dev questions are also test questions
    for stage in ("midtrain", "rl"):  # midtrain holds every dataset the sft mixture draws from
        check_disjoint(training_mixture(stage, offline=True, evals=evals), evals.values())


@needs_pack
def test_gsm8k_test_split_into_contaminated_demo_and_heldout_halves():
    demo, heldout = GSM8K("test", "demo", source="pack"), GSM8K("test", "heldout", source="pack")
    everything = GSM8K("test", source="pack")
    assert len(demo) + len(heldout) == len(everything) and 0.4 < len(demo) / len(everything) < 0.6
    assert demo.contaminated and "contaminated-demo" in demo.name and not heldout.contaminated
    check_disjoint(demo, [heldout])
    assert all(in_demo_part(r["question"]) for r in demo.rows)
    assert training_mixture("rl", offline=True).name == demo.name
    assert eval_tasks(offline=True)["gsm8k"].name == heldout.name


# ----------------------------------------------------------------------------- GSM8K and tool output


def test_gsm8k_annotations_become_tool_parts():
    solution = ("Half is 48/2 = <<48/2=24>>24 cups. A third: 10/3=<<10/3=3.33>>3.33.\n"
                "Total 80,000*1.5=<<80,000*1.5=120000>>120,000. Bad: <<5*3=16>>16. Sum <<0.1+0.2=0.3>>0.3\n#### 24")
    parts = solution_parts(solution)
    tool = [(p["text"], q["text"]) for p, q in pairwise(parts) if p["type"] == "python"]
    assert tool == [("48/2", "24"), ("10/3", "3.333333333"), ("0.1+0.2", "0.3")]  # "80,000*1.5" is a tuple
    assert all(a["type"] != b["type"] for a, b in pairwise(parts))  # adjacent texts were merged
    assert "".join(p["text"] for p in parts if p["type"] == "text") == (
        "Half is 48/2 = 24 cups. A third: 10/3=3.33.\nTotal 80,000*1.5=120,000. Bad: 16. Sum 0.3\n#### 24")
    assert evaluate_arithmetic("2**1000") is None and evaluate_arithmetic("1/0") is None
    assert evaluate_arithmetic("__import__('os')") is None and evaluate_arithmetic("(-8)**(1/3)") is None


def test_tool_outputs_are_what_the_sandbox_prints():
    codes = [(p["text"], q["text"]) for c in [*Arithmetic(12), *LetterCount(3, words=WORDS)]
             for p, q in pairwise(c["messages"][1]["content"]) if p["type"] == "python"]
    codes += [("48/2", "24"), ("10/3", "3.333333333"), ("0.1+0.2", "0.3")]
    picked = random.Random(0).sample(codes[:-3], 5) + codes[-3:]
    sandbox = Sandbox()
    assert [format_tool_output(sandbox.run(code)) for code, _ in picked] == [out for _, out in picked]


def test_answer_extraction():
    assert extract_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_answer("#### 5 then #### -2.5") == "-2.5"  # the last one counts
    assert extract_answer("#### $18") == "18" and extract_answer("the answer is 7") is None
    assert answers_match("#### 18.0", "#### 18") and not answers_match("#### 17", "#### 18")
    assert not answers_match("18", "#### 18")


# ----------------------------------------------------------------------------- evaluate and reward


def test_categorical_evaluate_and_reward():
    task = MultipleChoiceTask(MC_ROWS, "given")
    conversation = task.get(2)  # answer index 2 -> "C"
    assert task.evaluate(conversation, "C") and task.evaluate(conversation, " C\n")
    assert not task.evaluate(conversation, "B") and not task.evaluate(conversation, "C.")
    assert task.reward(conversation, "C") == 1.0 and task.reward(conversation, "A") == 0.0
    assert task.eval_type == "categorical" and task.random_baseline == 0.25


@pytest.mark.parametrize("task", [Arithmetic(5), LetterCount(5, words=WORDS), Spelling(5, words=WORDS)],
                         ids=lambda t: t.name)
def test_generative_evaluate_accepts_the_reference_and_rejects_a_wrong_answer(task):
    for conversation in task:
        reference = assistant_text(conversation["messages"][-1])
        assert task.evaluate(conversation, reference) and task.reward(conversation, reference) == 1.0
        assert not task.evaluate(conversation, "I don't know")
    conversation = task.get(0)
    if task.name.startswith("spelling"):
        assert not task.evaluate(conversation, "x-y-z")
    else:
        n = int(extract_answer(assistant_text(conversation["messages"][-1])))
        assert not task.evaluate(conversation, f"#### {n + 1}")


@needs_pack
def test_gsm8k_evaluate():
    task = GSM8K("test", source="pack", stop=3)
    conversation = task.get(0)  # Janet's ducks: 18
    assert task.evaluate(conversation, "She makes 9 * 2 = 18 dollars.\n#### 18")
    assert not task.evaluate(conversation, "#### 19") and not task.evaluate(conversation, "18")
    assert task.reward(conversation, "#### 18.00") == 1.0


@needs_pack
def test_humaneval_evaluate_runs_the_tests_in_the_sandbox():
    task = HumanEval(source="pack", stop=1, sandbox=Sandbox())
    conversation = task.get(0)
    full = conversation["messages"][1]["content"]
    body = full[len(conversation["prompt"]):]
    assert task.evaluate(conversation, body)  # a body continues the prompt's function
    assert task.evaluate(conversation, f"Here it is:\n```python\n{full}```\n")  # a fenced full function
    assert not task.evaluate(conversation, "    return False\n")
    assert extract_code("no fence") == "no fence"


def test_training_only_tasks_have_nothing_to_evaluate():
    with pytest.raises(TypeError, match="training-only"):
        Identity(3).evaluate(Identity(3).get(0), "hi")
    with pytest.raises(TypeError, match="training-only"):
        SmolTalk(rows=SMOLTALK_ROWS).reward(SmolTalk(rows=SMOLTALK_ROWS).get(0), "hi")


# ----------------------------------------------------------------------------- synthetic tasks


def test_synthetic_tasks_are_deterministic_and_split_by_content():
    assert [Identity(10, seed=3).get(i) for i in range(10)] == [Identity(10, seed=3).get(i) for i in range(10)]
    assert [Identity(10, seed=3).get(i) for i in range(10)] != [Identity(10, seed=4).get(i) for i in range(10)]
    check_disjoint(Arithmetic(300, "train"), [Arithmetic(100, "test")])
    train_words = {c["messages"][1]["content"].split()[0] for c in Spelling(200, "train", words=WORDS)}
    test_words = {c["messages"][1]["content"].split()[0] for c in Spelling(50, "test", words=WORDS)}
    assert train_words and test_words and not train_words & test_words
    assert all(is_test_word(w) for w in test_words)


def test_word_list_from_a_dictionary_file(tmp_path):
    words = tmp_path / "words"
    words.write_text("Apple\napple\nab\nbanana\ncafé\nbanana's\nzebra\n")
    assert word_list(words) == ["apple", "banana", "zebra"]


# ----------------------------------------------------------------------------- sources and bad input


def test_unknown_task_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'arc'.*arc_easy.*spelling"):
        get_task("arc")
    with pytest.raises(TypeError, match="does not take.*accepts"):
        get_task("identity", split="train")
    assert len(get_task("identity", size=4)) == 4
    with pytest.raises(ValueError, match="unknown stage"):
        training_mixture("pretrain", offline=True)
    with pytest.raises(ValueError, match="subset"):
        GSM8K("test", subset="train", rows=[])


def test_offline_loading_says_what_is_missing(home):
    with pytest.raises(FileNotFoundError, match="embedded pack is missing.*jobs.data"):
        sources.load_rows("arc_easy", "test", "pack")
    with pytest.raises(FileNotFoundError, match="smoltalk.*no copy"):
        sources.load_rows("smoltalk", "train", "pack")
    with pytest.raises(ValueError, match="unknown dataset"):
        sources.load_rows("arc", "test", "pack")


@needs_pack
def test_pack_rows_name_their_origin_and_missing_splits():
    rows = sources.load_rows("arc_easy", "validation", "pack")
    assert "offline pack copy" in rows.origin and len(rows) == len(ARC("easy", "validation", source="pack"))
    with pytest.raises(FileNotFoundError, match="only has split.*test, validation"):
        sources.load_rows("arc_easy", "train", "pack")


def test_hub_probe_respects_offline_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources.hub_reachable.cache_clear()
    try:
        assert sources.hub_reachable() is False
    finally:
        sources.hub_reachable.cache_clear()


def test_hub_rows_convert_to_the_pack_schema():
    arc = sources._arc({"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
                        "answerKey": "2"}, 0)
    assert arc == {"id": "x", "question": "Q?", "choices": ["a", "b", "c"], "answer": 1}
    sciq = sources._sciq({"question": "Q?", "distractor1": "d1", "distractor2": "d2", "distractor3": "d3",
                          "correct_answer": "ok", "support": "S"}, 4)
    assert sciq["choices"][sciq["answer"]] == "ok" and sciq["context"] == "S" and sciq["id"] == "4"
    social = sources._social_iqa({"context": "C", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c",
                                  "label": "3"}, 0)
    assert social["answer"] == 2 and social["choices"] == ["a", "b", "c"]
    gsm = sources._gsm8k({"question": "Q?", "answer": "3+4=<<3+4=7>>7\n#### 1,007"}, 9)
    assert gsm["answer_text"] == "1007" and gsm["solution"].endswith("1,007")
    nested = sources._mmlu({"train": {"question": "Q?", "choices": ["a", "b"], "answer": 1, "subject": ""}}, 2)
    assert nested["answer"] == 1 and nested["question"] == "Q?"
