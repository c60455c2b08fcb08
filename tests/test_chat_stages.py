"""Tests for the chat stages' rows (nanochat/data/chat_data.py).

Run: `PYTHONPATH=. python -m pytest tests/test_chat_stages.py`.
Rendering and masks (targets only on what the assistant writes), packing (BOS-led rows of whole
conversations, nothing lost or invented), SFT padding, the per-rank order and exact resume from a
position, mixture determinism, the train/eval split check and bad input (unknown task, empty mixture).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest
import torch

from nanochat.data.chat_data import (
    ChatBatcher,
    ChatData,
    build_rows,
    conversations,
    pad_rows,
    parse_task_spec,
    targets,
)
from nanochat.data.dataloader import DataPosition
from nanochat.data.positions import leftovers, resume_positions, start_positions
from nanochat.tasks import Task
from nanochat.tokenizer import Tokenizer

# the chat tasks read their offline rows (ARC, MMLU, GSM8K, word list) from the embedded pack
pytestmark = pytest.mark.usefixtures("embedded_pack")


class Chats(Task):
    """Conversations i = 0..n-1: user "q<i>" and an assistant answer of i % 7 + 1 letters, so lengths vary."""

    name = "chats"

    def __init__(self, n: int, **slicing: int | None) -> None:
        super().__init__(**slicing)
        self.n = n

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"q{index}"},
                             {"role": "assistant", "content": "abcdefg"[: index % 7 + 1]}]}


def chat_data(layout: str, n: int = 40, val: int = 0) -> ChatData:
    data = ChatData("midtrain", layout, val_conversations=val)
    data._mixture = Chats(n)  # a mixture of known conversations
    return data


def rendered(tok: Tokenizer, i: int) -> tuple[list[int], list[int]]:
    return tok.render_conversation(Chats(1000).get(i))


# ----------------------------------------------------------------------------- rendering and masks


def test_targets_are_only_the_assistant_tokens_and_padding_is_ignored(byte_tok):
    ids, mask = rendered(byte_tok, 3)  # <bos><user_start>q3<user_end><assistant_start>abcd<assistant_end>
    y = targets(ids, mask)
    learned = [t for t in y if t >= 0]
    assert learned == [*byte_tok.encode("abcd"), byte_tok.encode_special("<|assistant_end|>")]
    x, yy = pad_rows([(ids, mask)], len(ids) + 4, byte_tok.get_bos_token_id())
    assert x.shape == yy.shape == (1, len(ids) + 4)
    assert x[0, 0] == byte_tok.get_bos_token_id() and x[0, : len(ids) - 1].tolist() == ids[:-1]
    assert yy[0, : len(ids) - 1].tolist() == y and (yy[0, len(ids) - 1:] == -1).all()
    assert (x[0, len(ids) - 1:] == byte_tok.get_bos_token_id()).all()


def test_packed_rows_start_with_bos_and_hold_whole_conversations_in_order(byte_tok):
    data = chat_data("pack", n=30)
    row_len = 40
    rows = data._rows(list(range(30)), byte_tok, row_len)
    bos = byte_tok.get_bos_token_id()
    joined = []
    for ids, mask in rows:
        assert ids[0] == bos and len(ids) <= row_len and len(ids) == len(mask)
        joined += ids
    expected = [t for i in range(30) for t in rendered(byte_tok, i)[0]]
    assert joined == expected  # nothing lost, invented or reordered
    for (row, _), (following, _) in itertools.pairwise(rows):  # filled greedily: the next row's first
        first = next((j for j in range(1, len(following)) if following[j] == bos), len(following))
        assert len(row) + first > row_len  # conversation would not have fitted
    x, y = next(data.batcher(byte_tok, row_len, 3, DataPosition(0), 1))
    assert x.shape == y.shape == (3, row_len - 1) and (x[:, 0] == bos).all()


def test_a_long_conversation_is_cropped_and_one_without_targets_is_skipped(byte_tok):
    class Long(Chats):
        def get_example(self, index: int) -> dict:
            text = "x" * (5 if index != 1 else 80)
            return {"messages": [{"role": "user", "content": text if index != 2 else "y" * 80},
                                 {"role": "assistant", "content": "ok"}]}

    data = ChatData("sft", "pad")
    data._mixture = Long(4)
    batcher = data.batcher(byte_tok, 40, 2, DataPosition(0), 1)
    x, y = next(batcher)
    # item 1: a user message of 80 bytes is cut before the answer: no target, skipped; item 2 likewise
    assert batcher.stats.cropped == 2 and batcher.stats.skipped == 2 and batcher.position == DataPosition(4)
    assert (y >= 0).sum(dim=1).tolist() == [3, 3]  # "ok" + <|assistant_end|> of items 0 and 3


def test_sft_rows_hold_one_conversation_padded_to_the_longest(byte_tok):
    data = chat_data("pad")
    x, y = next(data.batcher(byte_tok, 64, 4, DataPosition(0), 1))
    lengths = [len(rendered(byte_tok, i)[0]) for i in range(4)]
    assert x.shape == (4, max(lengths) - 1)
    for b in range(4):
        ids, mask = rendered(byte_tok, b)
        assert x[b, : lengths[b] - 1].tolist() == ids[:-1]
        assert y[b, : lengths[b] - 1].tolist() == targets(ids, mask)
        assert (y[b, lengths[b] - 1:] == -1).all()


# ----------------------------------------------------------------------------- order and resume


@pytest.mark.parametrize("layout", ["pack", "pad"])
def test_ranks_read_disjoint_conversations_and_resume_exactly(byte_tok, layout):
    data = chat_data(layout, n=50)
    world = 2
    seen = {}
    for rank in range(world):
        stream = conversations(data.mixture(), list(range(50)), byte_tok, 64, DataPosition(rank), world,
                               stop=50)
        seen[rank] = [g for g, _, _ in stream]
    assert seen[0] == list(range(0, 50, 2)) and seen[1] == list(range(1, 50, 2))

    for rank in range(world):
        full = data.batcher(byte_tok, 64, 2, DataPosition(rank), world)
        first = [next(full) for _ in range(3)]
        position = full.position
        after = [next(full) for _ in range(4)]  # crosses the end of the epoch (50 conversations)
        resumed = data.batcher(byte_tok, 64, 2, position, world)
        again = [next(resumed) for _ in range(4)]
        assert position.item % world == rank and position.item > rank
        for (x1, y1), (x2, y2) in zip(after, again, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert not torch.equal(first[0][0][:, :5], after[0][0][:, :5])


def test_the_position_is_the_first_conversation_not_handed_out(byte_tok):
    stream = iter([(g, [0] * 10, [0] + [1] * 9) for g in range(0, 20, 2)])  # 10-token conversations
    rows = build_rows(stream, "pack", 25, 2)
    ids, _, next_g = next(rows)
    assert len(ids) == 20 and next_g == 4  # g 0 and 2 fit, g 4 was read ahead and is next
    batcher = ChatBatcher(iter([(g, [0] * 10, [0] + [1] * 9) for g in range(0, 20, 2)]), "pack", 2, 25, 0,
                          DataPosition(0), 2)
    next(batcher)
    assert batcher.position == DataPosition(8)


@pytest.mark.parametrize("layout", ["pack", "pad"])
def test_a_run_resized_2_1_3_2_reads_every_conversation_once(byte_tok, layout):
    data = chat_data(layout, n=1000)  # conversation g says "q<g>" (one epoch here)
    seen, saved = Counter(), None
    for world, steps in [(2, 4), (1, 5), (3, 3), (2, 2)]:
        positions = start_positions(world) if saved is None else resume_positions(saved, world)
        batchers = [data.batcher(byte_tok, 64, 6 // world, p, world) for p in positions]  # 6 rows a step
        for _ in range(steps):
            for b in batchers:
                x, _ = next(b)
                seen.update(int(g) for row in x.tolist() for g in re.findall(r"q(\d+)", byte_tok.decode(row)))
        saved = [DataPosition.from_dict(b.position.as_dict()) for b in batchers]  # the checkpoint
        left, frontier = leftovers(saved)
        assert max(seen.values()) == 1  # no conversation twice
        assert not set(seen) & {g for g, _ in left} and set(seen) | {g for g, _ in left} == set(range(frontier))
        assert all(row == 0 for _, row in left)  # rows end on conversations: a leftover is unread


# ----------------------------------------------------------------------------- mixtures and bad input


def test_the_mixture_and_the_validation_split_are_deterministic():
    a, b = ChatData("sft", "pad", offline=True, val_conversations=50), ChatData("sft", "pad", offline=True,
                                                                              val_conversations=50)
    keys = [a.mixture().item_key(i) for i in range(200)]
    assert keys == [b.mixture().item_key(i) for i in range(200)]
    other = ChatData("sft", "pad", offline=True, seed=7)
    assert keys != [other.mixture().item_key(i) for i in range(200)]
    train, val = a.split()
    assert len(val) == 50 and not set(train) & set(val) and len(train) + 50 == len(a.mixture())


def test_the_stage_mixtures_hold_no_evaluation_item_and_one_that_does_is_refused():
    info = ChatData("sft", "pad", offline=True, val_conversations=10).check()
    assert info["train"] > 1000 and "arc_easy/validation" in info["tasks"]
    leaky = ChatData("sft", "pad", offline=True, tasks=["sciq:validation,stop=50", "arc_easy:test,stop=20"])
    with pytest.raises(ValueError, match=r"shares items with the evaluation sets .* train item"):
        leaky.check()


def test_bad_mixtures_name_the_problem(byte_tok):
    with pytest.raises(ValueError, match="unknown task 'smoltalkk'"):
        ChatData("sft", "pad", tasks=["smoltalkk"]).check()
    with pytest.raises(ValueError, match="lists no tasks"):
        ChatData("sft", "pad", tasks=[]).check()
    with pytest.raises(ValueError, match=r"zero examples: identity\[0:\] \(0 examples\)"):
        ChatData("midtrain", "pack", tasks=["identity,size=0"]).mixture()
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        chat_data("pack", n=5, val=5).split()
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_task_spec("spelling,300")
    with pytest.raises(TypeError, match="does not take colour"):
        parse_task_spec("spelling,colour=red")
    assert len(parse_task_spec("spelling,size=30")) == 30


def test_rows_per_epoch_counts_the_rows_of_one_pass(byte_tok):
    data = chat_data("pack", n=40, val=4)
    assert data.rows_per_epoch(byte_tok, 40) == len(data._rows(list(range(36)), byte_tok, 40))
    assert chat_data("pad", n=40).rows_per_epoch(byte_tok, 40) == 40
    estimate = chat_data("pad", n=40).rows_per_epoch(byte_tok, 40, sample=10)
    assert estimate == 40
    val = data.validation_batches(byte_tok, 40, 2, 0, 1)
    assert sum(x.size(0) for x, _ in val) == len(data._rows([36, 37, 38, 39], byte_tok, 40))
    assert list(itertools.chain.from_iterable(x[:, 0].tolist() for x, _ in val)) == [byte_tok.get_bos_token_id()] * sum(
        x.size(0) for x, _ in val)


# ----------------------------------------------------------------------------- the stages' bad input


def _exported(tmp_path, tok: Tokenizer) -> str:
    """A depth-1 model (width 64) exported with its tokenizer, as a stage's `init_from`."""
    from nanochat.checkpoint import save_model
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=32, head_dim=32))
    model.init_weights()
    dest = tmp_path / "init"
    save_model(dest, model, {"step": 0})
    tok.save(dest / "tokenizer")
    return str(dest)


def test_a_chat_stage_without_its_input_model_names_the_stage_to_run(tmp_path, capsys):
    from jobs import midtrain, sft

    base = ["--preset", "micro", "--run", "r", "--storage", str(tmp_path)]
    assert midtrain.main(base) == 2
    assert "run the pretrain stage first" in capsys.readouterr().err
    assert sft.main(base) == 2
    assert "run the midtrain stage first" in capsys.readouterr().err
    assert sft.main(base + ["--set", f"init_from={tmp_path}/nowhere"]) == 2
    assert f"no exported model at {tmp_path}/nowhere: its config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "nothing may be written for a stage that cannot start"


def test_bad_chat_stage_settings_are_refused_before_any_worker(tmp_path, byte_tok, capsys):
    from jobs import midtrain

    base = ["--preset", "micro", "--run", "r", "--storage", str(tmp_path),
            "--set", f"init_from={_exported(tmp_path, byte_tok)}"]
    assert midtrain.main(base + ["--set", "tasks=[nosuchtask]"]) == 2
    assert "unknown task 'nosuchtask'" in capsys.readouterr().err
    assert midtrain.main(base + ["--set", 'tasks=["identity,size=0"]']) == 2
    assert "zero examples" in capsys.readouterr().err
    assert midtrain.main(base + ["--set", "rows_per_step=6"]) == 2  # micro: 4 rows per micro-batch
    assert "rows_per_step 6 is not a multiple of device_batch_size 4" in capsys.readouterr().err
    assert midtrain.main(base + ["--set", "colour=red"]) == 2
    assert "colour" in capsys.readouterr().err
    assert not (tmp_path / "r" / "midtrain").exists()


def test_the_chat_spec_takes_the_model_shape_and_scales_the_lrs():
    from cluster.chat_train import chat_train_spec
    from jobs.config import load_stage_config
    from jobs.sft import SftConfig

    settings = load_stage_config(SftConfig, "sft", "micro", ["rows_per_step=32", "device_batch_size=4"]).to_spec()
    spec = chat_train_spec(settings, {"n_layer": 4, "n_embd": 256, "n_head": 4, "sequence_len": 256}, 120)
    assert (spec.depth, spec.head_dim, spec.sequence_len, spec.num_iterations) == (4, 64, 256, 120)
    assert spec.total_batch_tokens == 32 * 256
    assert spec.lrs.matrix_lr == pytest.approx(0.02 * 0.02) and spec.lrs.embedding_lr == pytest.approx(0.2 * 0.02)
    with pytest.raises(ValueError, match="not the depth-derived shape"):
        chat_train_spec(settings, {"n_layer": 4, "n_embd": 200, "n_head": 4, "sequence_len": 256}, 1)
