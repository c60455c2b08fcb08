"""Tests of the GPT model and its KV cache (nanochat/gpt.py, nanochat/kv_cache.py) on CPU.

Run: PYTHONPATH=. python -m pytest tests/test_gpt.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from nanochat.common import DistInfo
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from tests.helpers import random_gpt

VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(n_kv_head: int | None = None, sequence_len: int = 24) -> GPTConfig:
    cfg = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=sequence_len, head_dim=32)  # 4 heads
    if n_kv_head is not None:
        cfg.n_kv_head = n_kv_head
    return cfg


def new_cache(cfg: GPTConfig, batch_size: int, seq_len: int) -> KVCache:
    head_dim = cfg.n_embd // cfg.n_head
    return KVCache(batch_size, cfg.n_kv_head, seq_len, head_dim, cfg.n_layer)


@pytest.mark.parametrize("depth, expected", [(20, 560_988_160), (32, 1_879_048_192)])
def test_param_counts_of_seed_sizes(depth, expected):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size=65_536, sequence_len=2048))
    assert model.num_params() == expected
    cfg = model.config
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (64 * depth, depth // 2, depth // 2)


def test_from_depth_rejects_width_that_does_not_split_into_heads():
    with pytest.raises(ValueError, match="head_dim"):
        GPTConfig.from_depth(3, vocab_size=VOCAB, sequence_len=16)  # width 192, head_dim 128
    assert GPTConfig.from_depth(2, VOCAB, 16, head_dim=64).n_head == 2


def test_estimate_flops_follows_the_seed_formula():
    cfg = tiny_config()
    model = GPT(cfg)
    non_embedding = model.num_params() - VOCAB * cfg.n_embd
    attention = 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.sequence_len
    assert model.estimate_flops() == 6 * non_embedding + attention


def test_output_shapes_dtypes_and_loss_reductions():
    model = random_gpt(tiny_config())
    idx = torch.randint(0, VOCAB, (3, 10))
    targets = torch.randint(0, VOCAB, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft cap
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 10)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), reduction="none")
    torch.testing.assert_close(per_token.view(-1), expected)
    torch.testing.assert_close(model(idx, targets), per_token.mean())
    ignored = targets.clone()
    ignored[:, :5] = -1
    torch.testing.assert_close(model(idx, ignored), per_token[:, 5:].mean())
    assert (model(idx, ignored, loss_reduction="none")[:, :5] == 0).all()


def test_fresh_init_predicts_uniformly():
    model = GPT(tiny_config())
    model.init_weights()
    idx = torch.randint(0, VOCAB, (2, 8))
    assert model(idx, idx).item() == pytest.approx(math.log(VOCAB), rel=1e-6)  # zero lm_head
    assert all(
        (b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all() for b in model.transformer.h
    )


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_future_tokens_never_change_earlier_logits(n_kv_head):
    model = random_gpt(tiny_config(n_kv_head))
    idx = torch.randint(0, VOCAB, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # and the later ones do change


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cached_decode_matches_full_recompute(n_kv_head):
    cfg = tiny_config(n_kv_head)
    model = random_gpt(cfg)
    idx = torch.randint(0, VOCAB, (2, 14))
    full = model(idx)
    cache = new_cache(cfg, batch_size=2, seq_len=20)
    with torch.no_grad():
        steps = [model(idx[:, :6], kv_cache=cache)]  # prefill 6 tokens
        for t in range(6, 14):
            steps.append(model(idx[:, t : t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.pos.tolist() == [14, 14]


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cpu_prepack_path_matches_the_plain_path(n_kv_head):
    """The CPU inference path (prepacked weights, fused QKV) gives the plain path's logits, with
    and without a cache, and is not taken where gradients are needed."""
    cfg = tiny_config(n_kv_head)
    model = random_gpt(cfg)
    idx = torch.randint(0, VOCAB, (3, 14))
    with torch.no_grad():
        plain = model(idx)
        assert model.set_cpu_prepack(True)
        packed = model(idx)
        cache = new_cache(cfg, batch_size=3, seq_len=20)
        steps = [model(idx[:, :6], kv_cache=cache)]
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(6, 14)]
    assert model.lm_head.packed._packed is not None  # the path was taken
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1), plain, rtol=0, atol=1e-4)
    loss = model(idx, targets=idx)  # grad mode: F.linear, so training still gets gradients
    loss.backward()
    assert model.transformer.h[0].attn.c_q.weight.grad is not None


@needs_onednn
def test_cpu_prepack_follows_weight_changes_and_copies():
    """Packed copies are remade after in-place updates, load_state_dict and optimizer steps, and
    never travel with a deep copy (or pickle) of the model."""
    import copy

    cfg = tiny_config(2)
    model, other = random_gpt(cfg, seed=0), random_gpt(cfg, seed=1)
    model.set_cpu_prepack(True)
    optimizers = model.setup_optimizers(dist=DistInfo())
    idx = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        model(idx)
        model.load_state_dict(other.state_dict())  # a weight sync
        torch.testing.assert_close(model(idx), other(idx), rtol=0, atol=1e-4)
        model.transformer.h[1].attn.c_v.weight.mul_(2.0)  # an in-place update (optimizer step)
        other.transformer.h[1].attn.c_v.weight.mul_(2.0)
        torch.testing.assert_close(model(idx), other(idx), rtol=0, atol=1e-4)
        for _ in range(2):  # a training step on the same model (optimizers write through p.data)
            with torch.enable_grad():
                model.zero_grad()
                model(idx, targets=idx).backward()
            for opt in optimizers:
                opt.step()
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(idx), other(idx), rtol=0, atol=1e-4)
        clone = copy.deepcopy(model)
        assert clone.lm_head.packed._packed is None and clone.transformer.h[0].attn.qkv_packed._packed is None
        torch.testing.assert_close(clone(idx), other(idx), rtol=0, atol=1e-4)
        model.set_cpu_prepack(False)
        assert model.lm_head.packed._packed is None


def test_ragged_batch_equals_each_row_alone():
    cfg = tiny_config(2)
    model = random_gpt(cfg)
    lengths = [3, 7, 5]
    prompts = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    cache = new_cache(cfg, batch_size=3, seq_len=16)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):  # prefill each row with its own length
            cache.set_active([row])
            model(prompt, kv_cache=cache)
        cache.set_active(None)
        assert cache.get_pos().tolist() == lengths
        new_tokens = torch.randint(0, VOCAB, (3, 4))
        ragged = torch.cat([model(new_tokens[:, t : t + 1], kv_cache=cache) for t in range(4)], dim=1)
    for row, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, new_tokens[row : row + 1]], dim=1))[:, -4:]
        torch.testing.assert_close(ragged[row : row + 1], alone, rtol=0, atol=1e-5)
    assert cache.pos.tolist() == [n + 4 for n in lengths]


def test_decoding_a_subset_of_rows_leaves_the_others_untouched():
    cfg = tiny_config()
    model = random_gpt(cfg)
    prompt = torch.randint(0, VOCAB, (3, 5))
    cache = new_cache(cfg, batch_size=3, seq_len=12)
    with torch.no_grad():
        model(prompt, kv_cache=cache)
        k_row1 = cache.k[:, 1].clone()
        cache.set_active([2, 0])  # idx row 0 -> cache row 2, idx row 1 -> cache row 0
        step = torch.randint(0, VOCAB, (2, 1))
        out = model(step, kv_cache=cache)
    assert cache.pos.tolist() == [6, 5, 6]
    assert torch.equal(cache.k[:, 1], k_row1)
    for i, row in enumerate([2, 0]):
        alone = model(torch.cat([prompt[row : row + 1], step[i : i + 1]], dim=1))[:, -1:]
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=1e-5)


def test_copy_row_reset_rows_and_prefill_from():
    cfg = tiny_config()
    model = random_gpt(cfg)
    prompt = torch.randint(0, VOCAB, (1, 6))
    single = new_cache(cfg, batch_size=1, seq_len=10)
    with torch.no_grad():
        model(prompt, kv_cache=single)
        wide = new_cache(cfg, batch_size=4, seq_len=16)
        wide.prefill_from(single, src_row=0, dst_rows=[0, 1])
        wide.copy_row(1, [2])
        wide.reset_rows([3])
        assert wide.pos.tolist() == [6, 6, 6, 0]
        wide.set_active([0, 1, 2])
        nxt = torch.randint(0, VOCAB, (3, 1))
        out = model(nxt, kv_cache=wide)
    for i in range(3):
        alone = model(torch.cat([prompt, nxt[i : i + 1]], dim=1))[:, -1:]
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=1e-5)


def test_cache_errors_are_clear():
    cfg = tiny_config()
    model = random_gpt(cfg)
    cache = new_cache(cfg, batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.randint(0, VOCAB, (2, 5)), kv_cache=cache)
    cache.set_active([0])
    with pytest.raises(ValueError, match="set_active"):
        model(torch.randint(0, VOCAB, (2, 1)), kv_cache=cache)


def test_setup_optimizers_groups_and_lrs():
    cfg = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=16, head_dim=64)  # width 128
    model = GPT(cfg)
    adamw, muon = model.setup_optimizers(dist=DistInfo())
    scale = (128 / 768) ** -0.5
    assert [g["initial_lr"] for g in adamw.param_groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    assert adamw.param_groups[0]["params"][0] is model.lm_head.weight
    assert adamw.param_groups[1]["params"][0] is model.transformer.wte.weight
    assert muon.param_groups[0]["initial_lr"] == 0.02
    covered = {id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}
