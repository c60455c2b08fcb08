"""Tests of Muon and the sharded AdamW (nanochat/muon.py, nanochat/adamw.py, nanochat/sharding.py), including 2 gloo
ranks (torch.multiprocessing) against 1 rank and checkpoint re-sharding 1->2 and 2->1.

Run: PYTHONPATH=. python -m pytest tests/test_optim.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from nanochat.adamw import AdamW
from nanochat.common import DistInfo
from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import Muon, _balanced_owners, orthogonalize
from nanochat.sharding import load_optimizer_shards, optimizer_shard_state
from nanochat.train import LoopConfig, evaluate_bpb, train_loop
from tests.helpers import tiny_gpt

VOCAB = 75  # odd on purpose: the embedding rows do not split evenly over 2 ranks
SEQ = 16
STEPS = 4  # whole run; checkpoints are taken after HALF steps
HALF = 2
MODEL = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=SEQ, head_dim=64)
SEED = 1234


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_newton_schulz_output_is_nearly_orthogonal():
    torch.manual_seed(0)
    for shape, dtype in [((64, 128), torch.float32), ((128, 48), torch.float32), ((128, 48), torch.bfloat16)]:
        g = torch.randn(shape) @ torch.diag(torch.logspace(-2, 0, shape[1]))  # spread-out spectrum
        before = torch.linalg.svdvals(g)
        assert before.max() / before.min() > 30
        x = orthogonalize(g, dtype=dtype)
        assert x.shape == g.shape and x.dtype == dtype
        x = x.float()
        singular = torch.linalg.svdvals(x)
        assert singular.min() > 0.6 and singular.max() < 1.25, singular  # Muon's intended band
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh
        cosine = (x * polar).sum() / (x.norm() * polar.norm())
        assert cosine > 0.9


def test_a_stack_is_orthogonalised_as_each_matrix_alone():
    torch.manual_seed(0)
    stack = torch.randn(3, 48, 128)
    together = orthogonalize(stack)
    for g, x in zip(stack, together, strict=True):
        torch.testing.assert_close(x, orthogonalize(g), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="matrix or a stack"):
        orthogonalize(torch.zeros(4))


def test_muon_batches_same_shape_matrices_and_steps_each_as_alone():
    """Three matrices of two shapes (one tall) in two groups with their own lrs: the batched update
    equals three Muons of one matrix each; in bf16 too."""
    for dtype, tol in [(None, dict(rtol=1e-4, atol=1e-5)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))]:
        torch.manual_seed(0)
        shapes = [(16, 8), (8, 16), (16, 8)]
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = Muon([dict(params=params[:2], lr=0.1), dict(params=params[2:], lr=0.05)], momentum=0.9,
                   ns_dtype=dtype)
        singles = [Muon([q], lr=lr, momentum=0.9, ns_dtype=dtype)
                   for q, lr in zip(alone, [0.1, 0.1, 0.05], strict=True)]
        for _ in range(3):
            grads = [torch.randn(shape) for shape in shapes]
            for p, q, g in zip(params, alone, grads, strict=True):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            for single in singles:
                single.step()
        for p, q in zip(params, alone, strict=True):
            assert p.dtype == torch.float32
            torch.testing.assert_close(p.detach(), q.detach(), **tol)


def test_muon_step_is_nesterov_then_orthogonalised_and_scaled():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 8))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9)
    grads = [torch.randn(32, 8) for _ in range(2)]
    buf = torch.zeros(32, 8)
    expected = start.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        update = 0.1 * g + 0.9 * buf
        expected -= 0.1 * (32 / 8) ** 0.5 * orthogonalize(update)
    torch.testing.assert_close(p.detach(), expected)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(10, 6))
    ref = torch.nn.Parameter(ours.detach().clone())
    kwargs = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt = AdamW([ours], **kwargs)
    ref_opt = torch.optim.AdamW([ref], **kwargs)
    for _ in range(5):
        g = torch.randn(10, 6)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach())


def test_matrix_owners_balance_work():
    owners = _balanced_owners([4, 1, 1, 4, 2, 2], world_size=2)
    load = [sum(s for s, o in zip([4, 1, 1, 4, 2, 2], owners, strict=True) if o == r) for r in range(2)]
    assert load == [7, 7]
    assert _balanced_owners([3, 3], world_size=1) == [0, 0]


# ---- training equivalence across world sizes -------------------------------------------------


def make_data() -> list[torch.Tensor]:
    """One (4, SEQ + 1) token block per step; rank r of 2 takes rows 2r, 2r + 1."""
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(0, VOCAB, (4, SEQ + 1), generator=gen) for _ in range(STEPS)]


def train_steps(model: GPT, optimizers, data, dist: DistInfo, start: int, stop: int) -> None:
    rows = slice(2 * dist.rank, 2 * dist.rank + 2) if dist.is_distributed else slice(None)
    batches = iter([(d[rows, :-1], d[rows, 1:]) for d in data[start:stop]])
    cfg = LoopConfig(num_steps=STEPS, warmdown_ratio=0.5, grad_clip=0.5)  # 0.5 clips in this setup
    train_loop(model, optimizers, batches, cfg, dist, start_step=start, stop_step=stop)


def token_bytes() -> torch.Tensor:
    """(VOCAB,) bytes per token id; ids 0..4 act as special tokens (0 bytes, not counted)."""
    out = torch.arange(VOCAB) % 3 + 1
    out[:5] = 0
    return out


def bpb_batches(dist: DistInfo):
    """The same 4 evaluation rows as make_data's, split over ranks like the training batches."""
    rows = slice(2 * dist.rank, 2 * dist.rank + 2) if dist.is_distributed else slice(None)
    return iter([(d[rows, :-1], d[rows, 1:]) for d in make_data()[:2]])


def save_point(model: GPT, optimizers, dist: DistInfo) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optim": [optimizer_shard_state(opt, dist) for opt in optimizers],
    }


def restore(points: list[dict], dist: DistInfo):
    """New model + optimizers, loaded from the save points of every rank of a run."""
    model = tiny_gpt(MODEL, SEED)
    model.load_state_dict(points[0]["model"])
    optimizers = model.setup_optimizers(dist=dist)
    for i, opt in enumerate(optimizers):
        load_optimizer_shards(opt, [point["optim"][i] for point in points], dist)
    return model, optimizers


def _two_rank_worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        dist = DistInfo(rank=rank, world_size=2)
        data = make_data()
        results: dict[str, object] = {}
        model = tiny_gpt(MODEL, SEED)  # A: the whole run on 2 ranks
        train_steps(model, model.setup_optimizers(dist=dist), data, dist, 0, STEPS)
        results["full"] = model.state_dict()
        results["bpb"] = evaluate_bpb(model, bpb_batches(dist), token_bytes(), dist)
        model = tiny_gpt(MODEL, SEED)  # B: half the run, then save this rank's shard
        optimizers = model.setup_optimizers(dist=dist)
        train_steps(model, optimizers, data, dist, 0, HALF)
        results["half_point"] = save_point(model, optimizers, dist)
        one_rank_point = torch.load(f"{out_dir}/one_rank_half.pt")  # C: resume a 1-rank run on 2
        model, optimizers = restore([one_rank_point], dist)
        train_steps(model, optimizers, data, dist, HALF, STEPS)
        results["resumed_from_1"] = model.state_dict()
        model = tiny_gpt(MODEL, SEED)  # D: the fallback collectives (all_reduce + slice, list all_gather)
        optimizers = model.setup_optimizers(dist=dist)
        optimizers[0]._tensor_collectives = False
        train_steps(model, optimizers, data, dist, 0, STEPS)
        results["fallback"] = model.state_dict()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def assert_same_params(a: dict, b: dict, what: str) -> None:
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def test_two_gloo_ranks_match_one_rank_and_reshard_both_ways(tmp_path):
    data, single = make_data(), DistInfo()
    model = tiny_gpt(MODEL, SEED)
    optimizers = model.setup_optimizers(dist=single)
    train_steps(model, optimizers, data, single, 0, HALF)
    torch.save(save_point(model, optimizers, single), tmp_path / "one_rank_half.pt")
    train_steps(model, optimizers, data, single, HALF, STEPS)
    reference = model.state_dict()
    assert not torch.equal(reference["lm_head.weight"], tiny_gpt(MODEL, SEED).state_dict()["lm_head.weight"])

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, res in enumerate(ranks):
        assert_same_params(res["full"], reference, f"2 ranks vs 1 (rank {r})")
        assert_same_params(res["resumed_from_1"], reference, f"1->2 resume (rank {r})")
        assert_same_params(res["fallback"], reference, f"fallback collectives (rank {r})")
    single_bpb = evaluate_bpb(model, bpb_batches(single), token_bytes(), single)
    assert [res["bpb"] for res in ranks] == pytest.approx([single_bpb] * 2, rel=1e-4)
    shards = [res["half_point"]["optim"][0] for res in ranks]
    assert [s["params"][1]["rows"] for s in shards] == [[0, 38], [38, 75]]  # embedding rows split

    model, optimizers = restore([res["half_point"] for res in ranks], single)  # 2 -> 1
    train_steps(model, optimizers, data, single, HALF, STEPS)
    assert_same_params(model.state_dict(), reference, "2->1 resume")


def test_load_rejects_incomplete_or_mismatched_shards():
    model = tiny_gpt(MODEL, SEED)
    optimizers = model.setup_optimizers()
    data = make_data()
    train_steps(model, optimizers, data, DistInfo(), 0, 1)
    shard = optimizer_shard_state(optimizers[0], DistInfo())
    fresh = tiny_gpt(MODEL, SEED).setup_optimizers()
    with pytest.raises(ValueError, match="one shard per rank"):
        load_optimizer_shards(fresh[0], [shard, shard], DistInfo())
    with pytest.raises(ValueError, match="cannot load them into Muon"):
        load_optimizer_shards(fresh[1], [shard], DistInfo())
    half = dict(shard, world_size=2, params={i: dict(v, rows=[0, 10]) for i, v in shard["params"].items()})
    with pytest.raises(ValueError, match="do not cover rows"):
        load_optimizer_shards(fresh[0], [half, dict(half, rank=1)], DistInfo())
