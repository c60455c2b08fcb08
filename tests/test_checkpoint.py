"""Tests of training checkpoints and exported models (nanochat/checkpoint.py) on CPU. No Ray.

Run: PYTHONPATH=. python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.common import DistInfo
from nanochat.gpt import GPT, GPTConfig
from nanochat.sharding import load_optimizer_shards, optimizer_shard_state
from nanochat.train import LoopConfig, train_loop
from tests.helpers import tiny_gpt

VOCAB, SEQ = 64, 16
ONE = DistInfo()
CONFIG = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=SEQ, head_dim=64)
LOOP = LoopConfig(num_steps=6, grad_accum_steps=1, muon_momentum_warmup_steps=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fresh(seed: int = 0) -> tuple[GPT, list]:
    model = tiny_gpt(CONFIG, seed)
    return model, model.setup_optimizers()


def batches(start: int = 0):
    gen = torch.Generator().manual_seed(7)
    data = [torch.randint(0, VOCAB, (4, SEQ + 1), generator=gen) for _ in range(LOOP.num_steps)]
    return iter([(d[:, :-1], d[:, 1:]) for d in data[start:]])


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    model, opts = fresh()
    train_loop(model, opts, batches(), LOOP, ONE)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opts = fresh()
    train_loop(model, opts, batches(), LOOP, ONE, stop_step=3)
    ckpt.save_training_checkpoint(tmp_path / "c", model, opts, ONE, step=3, data={"item": 4, "row": 2},
                                  loop={"train_time_s": 1.5})
    assert ckpt.is_complete(tmp_path / "c")

    model, opts = fresh(seed=1)  # other weights: everything must come from the checkpoint
    state = ckpt.load_training_checkpoint(tmp_path / "c", model, opts, ONE)
    assert (state.step, state.world_size, state.loop) == (3, 1, {"train_time_s": 1.5})
    assert state.data == [{"rank": 0, "world_size": 1, "item": 4, "row": 2}]
    train_loop(model, opts, batches(3), LOOP, ONE, start_step=3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0, msg=k)


def test_checkpoint_of_two_ranks_loads_on_one(tmp_path):
    model, opts = fresh()
    train_loop(model, opts, batches(), LOOP, ONE, stop_step=2)
    saved = [optimizer_shard_state(o, ONE) for o in opts]
    for rank in range(2):  # write the files two ranks would write: their shards of the same state
        dist = DistInfo(rank, 2)
        rank_opts = model.setup_optimizers(dist=dist)
        for opt, shard in zip(rank_opts, saved, strict=True):
            load_optimizer_shards(opt, [shard], dist)
        ckpt.save_training_checkpoint(tmp_path / "c", model, rank_opts, dist, step=2, data={"item": rank, "row": 5})
    assert ckpt.is_complete(tmp_path / "c")
    other, other_opts = fresh(seed=1)
    state = ckpt.load_training_checkpoint(tmp_path / "c", other, other_opts, ONE)
    assert state.world_size == 2 and [d["item"] for d in state.data] == [0, 1]
    for a, b in zip(opts, other_opts, strict=True):
        for (_, _, p), (_, _, q) in zip(a.indexed_params(), b.indexed_params(), strict=True):
            for name, value in a.state[p].items():
                torch.testing.assert_close(b.state[q][name], value, msg=name)


def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path):
    model, opts = fresh()
    ckpt.save_training_checkpoint(tmp_path / "c", model, opts, DistInfo(0, 2), step=1, data={"item": 0, "row": 0})
    assert not ckpt.is_complete(tmp_path / "c")  # rank 1's files are missing
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_training_checkpoint(tmp_path / "c", model, opts, ONE)
    assert not ckpt.is_complete(tmp_path / "nothing")

    ckpt.save_training_checkpoint(tmp_path / "d", model, opts, ONE, step=1, data={"item": 0, "row": 0})
    bigger_vocab = replace(CONFIG, vocab_size=VOCAB * 2)
    with pytest.raises(ckpt.CheckpointError, match="vocab_size: saved 64, now 128.*tokenizer differs"):
        ckpt.check_model_config(ckpt.read_state(tmp_path / "d")["model_config"], bigger_vocab, "here")
    torch.manual_seed(0)
    other = GPT(bigger_vocab)
    with pytest.raises(ckpt.CheckpointError, match="another model"):
        ckpt.load_training_checkpoint(tmp_path / "d", other, other.setup_optimizers(), ONE)


def test_exported_model_loads_with_its_config_and_tokenizer(tmp_path):
    model, _ = fresh()
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # non-zero logits to compare
    ckpt.save_model(tmp_path / "m", model, {"step": 5, "val_bpb": 2.5})
    (tmp_path / "m" / ckpt.TOKENIZER_DIR).mkdir()
    loaded, meta = ckpt.load_model(tmp_path / "m", "cpu")
    assert meta["step"] == 5 and meta["model_config"]["n_embd"] == CONFIG.n_embd
    assert meta["tokenizer_dir"] == str(tmp_path / "m" / ckpt.TOKENIZER_DIR)
    x = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training
    with pytest.raises(FileNotFoundError, match="run the pretrain stage"):
        ckpt.load_model(tmp_path / "missing", "cpu")
