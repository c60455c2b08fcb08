"""Tests of the core training loop, schedules and bits-per-byte (nanochat/train.py,
nanochat/schedule.py) on CPU with a tiny model.

Run: PYTHONPATH=. python -m pytest tests/test_train_loop.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nanochat.common import DistInfo, training_dtype
from nanochat.gpt import GPT, GPTConfig
from nanochat.schedule import grad_accum_steps, lr_multiplier, muon_momentum, num_steps_from
from nanochat.sharding import load_optimizer_shards, optimizer_shard_state
from nanochat.train import (
    CPU_COMPILE_COLD_S,
    CPU_COMPILE_SAVED_FRAC,
    CPU_COMPILE_WARM_S,
    CPU_EAGER_FLOPS,
    LoopConfig,
    clip_grad_norm,
    compile_pays_back,
    evaluate_bpb,
    train_loop,
)
from tests.helpers import tiny_gpt

VOCAB, SEQ = 64, 16
MODEL = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=SEQ, head_dim=64)
SINGLE = DistInfo()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blocks(n: int, rows: int, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, SEQ + 1), generator=gen) for _ in range(n)]


def as_batches(data: list[torch.Tensor]):
    return iter([(d[:, :-1], d[:, 1:]) for d in data])


# ---- schedules and horizon --------------------------------------------------------------------


def test_lr_multiplier_warmup_constant_warmdown():
    values = [
        lr_multiplier(s, 10, warmup_ratio=0.2, warmdown_ratio=0.4, final_lr_frac=0.1) for s in range(10)
    ]
    assert values[:2] == [0.5, 1.0]
    assert values[2:7] == [1.0] * 5
    assert values[7:] == pytest.approx([0.1 + 0.9 * 3 / 4, 0.1 + 0.9 * 2 / 4, 0.1 + 0.9 * 1 / 4])
    assert lr_multiplier(99, 100) == pytest.approx(1 / 20)  # seed default: last 20% decay to 0


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(5000) == pytest.approx(0.95)


def test_horizon_and_accumulation_arithmetic():
    # d20 speedrun: 20 tokens per parameter with a 524,288-token batch
    assert num_steps_from(total_batch_tokens=524_288, num_params=560_988_160, flops_per_token=1) == 21_400
    assert num_steps_from(total_batch_tokens=1000, num_params=1, flops_per_token=10, flops_budget=1e6) == 100
    assert num_steps_from(total_batch_tokens=1000, num_params=1, flops_per_token=1, num_iterations=7) == 7
    assert grad_accum_steps(524_288, device_batch_size=32, seq_len=2048, world_size=8) == 1
    assert grad_accum_steps(524_288, device_batch_size=16, seq_len=2048, world_size=2) == 8
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accum_steps(524_288, device_batch_size=3, seq_len=2048, world_size=1)


# ---- when to compile ---------------------------------------------------------------------------


def test_compile_pays_back_on_cpu_only_over_enough_steps():
    step_flops = 2 * CPU_EAGER_FLOPS  # a step of 2 s eager: it saves 2 x saved_frac s once compiled
    break_even = CPU_COMPILE_COLD_S / (2 * CPU_COMPILE_SAVED_FRAC)
    assert not compile_pays_back("cpu", int(break_even) - 1, step_flops)
    assert compile_pays_back("cpu", int(break_even) + 2, step_flops)
    assert compile_pays_back("cpu", 100, 1e9, compile_s=1.0, saved_frac=0.5, eager_flops=1e9)  # 50 s saved > 1 s
    assert not compile_pays_back("cpu", 100, 1e9, compile_s=60.0, saved_frac=0.5, eager_flops=1e9)
    assert compile_pays_back("cuda", 1, 1.0)  # GPUs: always, as the seed
    assert not compile_pays_back("mps", 10**6, 1e15) and not compile_pays_back("cpu", 0, 1e15)
    # the tiny preset's pretraining (200 steps of 2,048 tokens) compiles; its 60-step SFT and the
    # micro preset's 30 steps of 512 tokens do not
    tiny = GPT(GPTConfig.from_depth(4, vocab_size=4096, sequence_len=256, head_dim=64)).estimate_flops() * 2048
    micro = GPT(GPTConfig.from_depth(2, vocab_size=512, sequence_len=64, head_dim=64)).estimate_flops() * 512
    assert compile_pays_back("cpu", 200, tiny) and not compile_pays_back("cpu", 60, tiny)
    assert not compile_pays_back("cpu", 30, micro)


def test_the_loop_reports_whether_it_compiled():
    model = tiny_gpt(MODEL)
    final = train_loop(model, model.setup_optimizers(), as_batches(blocks(2, 2)), LoopConfig(2), SINGLE)
    assert final["compiled"] is False  # 2 tiny steps on CPU: the rule says no


def test_a_warm_inductor_cache_makes_compiling_pay_back_sooner(tmp_path, monkeypatch):
    """The ledger in inductor's cache directory: a graph compiled once is known warm next time, and the
    rule then uses the warm cost: the tiny preset's 80-step midtraining and 60-step SFT (micro-batches
    of the pretraining shape) compile after its pretraining has, not on a fresh machine."""
    from nanochat import compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    tiny_model = GPT(GPTConfig.from_depth(4, vocab_size=4096, sequence_len=256, head_dim=64))
    batch = torch.zeros(8, 256, dtype=torch.long)
    sig = compile_cache.signature(tiny_model, batch)
    assert sig != compile_cache.signature(tiny_model, torch.zeros(4, 256, dtype=torch.long))
    assert not compile_cache.was_compiled(sig)
    compile_cache.record_compiled(sig)
    compile_cache.record_compiled(sig)  # once is enough
    assert compile_cache.was_compiled(sig) and json.loads(compile_cache.ledger_path().read_text()) == [sig]
    assert compile_cache.ledger_path().parent == tmp_path / "inductor"
    compile_cache.ledger_path().write_text("{not json")  # a damaged ledger: nothing is known warm
    assert not compile_cache.was_compiled(sig)
    step = tiny_model.estimate_flops() * 2048
    for steps in (80, 120):  # midtraining's 80 steps of 2,048 tokens, SFT's 60 of 4,096
        assert compile_pays_back("cpu", steps, step, compile_s=CPU_COMPILE_WARM_S)
        assert not compile_pays_back("cpu", steps, step, compile_s=CPU_COMPILE_COLD_S)


def test_the_loop_compiles_on_a_warm_cache_and_notes_what_it_compiled(tmp_path, monkeypatch):
    """A run the cold rule leaves eager compiles when the ledger knows its graph; a run that compiles
    (cfg.compile) notes its graph. torch.compile is replaced by a recorder: what is tested is the
    decision and the ledger, not inductor."""
    from nanochat import compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    model = tiny_gpt(MODEL)
    data = blocks(2, 2)
    sig = compile_cache.signature(model, data[0][:, :-1])
    final = train_loop(model, model.setup_optimizers(), as_batches(data), LoopConfig(2, compile=True), SINGLE)
    assert final["compiled"] and not final["compile_cache_warm"] and compile_cache.was_compiled(sig)
    monkeypatch.setattr("nanochat.train.CPU_COMPILE_WARM_S", 0.0)  # any saving beats a free compile
    final = train_loop(model, model.setup_optimizers(), as_batches(data), LoopConfig(2), SINGLE)
    assert final["compiled"] and final["compile_cache_warm"] and len(compiled) == 2


# ---- precision ---------------------------------------------------------------------------------


def test_precision_resolves_per_device(monkeypatch):
    from nanochat import common

    assert training_dtype(None, "cpu") == torch.float32 and training_dtype(None, "cuda") == torch.bfloat16
    assert training_dtype("float32", "cuda") == torch.float32
    assert training_dtype("bfloat16", "cpu") == torch.bfloat16
    for native, expected in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(common, "cpu_has_native_bf16", lambda native=native: native)
        assert training_dtype("auto", "cpu") == expected
    # a GPU: bf16 when its matmuls are native (Ampere on), float32 where bf16 is only emulated (V100, T4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert training_dtype("auto", "cuda") == expected
    with pytest.raises(ValueError, match="'fp16' is not one of auto, float32, bfloat16"):
        training_dtype("fp16", "cpu")


def _precision_rank(rank: int, store_path: str, out_dir: str, natives: list[bool]) -> None:
    import torch.distributed as torch_dist

    from nanochat import common

    common.cpu_has_native_bf16 = lambda: natives[rank]  # this rank's CPU kind
    torch_dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        agreed = [common.agreed_precision(p, "cpu", 2) for p in ("auto", "float32", "bfloat16")]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(agreed))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("natives, auto", [([True, False], "float32"), ([True, True], "bfloat16")])
def test_auto_precision_is_agreed_by_every_rank(tmp_path, natives, auto):
    """Two gloo ranks on CPUs of different kinds (one multiplies bf16 natively, one does not) both
    train "auto" in float32; two native ones in bfloat16; named precisions pass through."""
    import torch.multiprocessing as mp

    from nanochat.common import agreed_precision

    out = tmp_path / natives.__repr__().replace(" ", "")
    out.mkdir()
    mp.spawn(_precision_rank, args=(str(out / "store"), str(out), natives), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((out / f"rank{rank}.json").read_text()) == [auto, "float32", "bfloat16"]
    with pytest.raises(ValueError, match="'fp8' is not one of"):
        agreed_precision("fp8", "cpu", 1)


def test_a_bfloat16_loop_trains_under_autocast_and_says_so():
    """bfloat16 on CPU: the forward runs under bf16 autocast (the model sees bf16 activations), the
    metrics say so, the loss falls as in float32 and the weights stay float32."""
    seen_dtypes = []
    data = blocks(1, rows=4) * 12
    finals = {}
    for precision in ("float32", "bfloat16"):
        model = tiny_gpt(MODEL)
        hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen_dtypes.append(o.dtype))
        final = train_loop(model, model.setup_optimizers(ns_dtype=training_dtype(precision, "cpu")),
                           as_batches(data), LoopConfig(12, precision=precision), SINGLE)
        hook.remove()
        assert final["dtype"] == precision and all(p.dtype == torch.float32 for p in model.parameters())
        finals[precision] = final["loss"]
    assert set(seen_dtypes[:12]) == {torch.float32} and set(seen_dtypes[12:]) == {torch.bfloat16}
    assert finals["bfloat16"] < 0.5 * math.log(VOCAB)
    assert finals["bfloat16"] == pytest.approx(finals["float32"], rel=0.1)
    assert finals["bfloat16"] != finals["float32"]


# ---- the loop ---------------------------------------------------------------------------------


def test_loss_goes_down_on_a_tiny_batch_and_metrics_are_reported():
    model = tiny_gpt(MODEL)
    optimizers = model.setup_optimizers()
    data = blocks(1, rows=4) * 25
    seen = []
    final = train_loop(
        model, optimizers, as_batches(data), LoopConfig(num_steps=25), SINGLE, on_metrics=seen.append
    )
    assert seen[0]["loss"] == pytest.approx(math.log(VOCAB), rel=1e-3)  # zero-init lm_head
    assert final["loss"] < 0.5 * seen[0]["loss"]
    assert [m["step"] for m in seen] == list(range(1, 26))
    assert final["tokens_per_sec"] > 0 and 0 <= final["data_wait_frac"] < 1
    assert final["mfu_percent"] is None  # no peak FLOP/s given


def test_mfu_uses_the_flops_estimate():
    model = tiny_gpt(MODEL)
    final = train_loop(
        model, model.setup_optimizers(), as_batches(blocks(1, 2)), LoopConfig(1, peak_flops=1e9), SINGLE
    )
    expected = 100 * model.estimate_flops() * final["tokens_per_sec"] / 1e9
    assert final["mfu_percent"] == pytest.approx(expected)


def test_gradient_accumulation_equals_one_big_batch():
    data = blocks(3, rows=4)
    big = tiny_gpt(MODEL)
    train_loop(big, big.setup_optimizers(), as_batches(data), LoopConfig(num_steps=3), SINGLE)
    small = tiny_gpt(MODEL)
    halves = [half for d in data for half in (d[:2], d[2:])]
    train_loop(small, small.setup_optimizers(), as_batches(halves), LoopConfig(3, grad_accum_steps=2), SINGLE)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_resume_equals_uninterrupted_training():
    data = blocks(6, rows=2)
    cfg = LoopConfig(num_steps=6, warmdown_ratio=0.5, grad_clip=0.5)
    straight = tiny_gpt(MODEL)
    train_loop(straight, straight.setup_optimizers(), as_batches(data), cfg, SINGLE)

    first = tiny_gpt(MODEL)
    optimizers = first.setup_optimizers()
    checkpoints = []
    train_loop(
        first, optimizers, as_batches(data[:3]), cfg, SINGLE, stop_step=3, on_checkpoint=checkpoints.append
    )
    assert checkpoints == [3]
    saved_model = {k: v.clone() for k, v in first.state_dict().items()}
    saved_optim = [optimizer_shard_state(opt, SINGLE) for opt in optimizers]
    del first, optimizers

    resumed = tiny_gpt(MODEL, seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    optimizers = resumed.setup_optimizers()
    for opt, shard in zip(optimizers, saved_optim, strict=True):
        load_optimizer_shards(opt, [shard], SINGLE)
    train_loop(resumed, optimizers, as_batches(data[3:]), cfg, SINGLE, start_step=3)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6)


def test_evaluate_and_checkpoint_hooks_fire_on_schedule():
    model = tiny_gpt(MODEL)
    evaluated, checkpoints, logged = [], [], []
    cfg = LoopConfig(num_steps=7, eval_every=3, checkpoint_every=2, log_every=4)
    train_loop(
        model,
        model.setup_optimizers(),
        as_batches(blocks(7, 2)),
        cfg,
        SINGLE,
        evaluate=lambda step: evaluated.append(step) or {"val_bpb": float(step)},
        on_metrics=logged.append,
        on_checkpoint=checkpoints.append,
    )
    assert evaluated == [0, 3, 6, 7]
    assert checkpoints == [2, 4, 6, 7]
    assert [(m["step"], "loss" in m, m.get("val_bpb")) for m in logged] == [
        (0, False, 0.0),
        (3, False, 3.0),
        (4, True, None),
        (6, False, 6.0),
        (7, True, 7.0),
    ]


def test_running_out_of_batches_names_the_step():
    model = tiny_gpt(MODEL)
    with pytest.raises(RuntimeError, match="ran out at step 1, micro-batch 1"):
        train_loop(
            model,
            model.setup_optimizers(),
            as_batches(blocks(3, 2)),
            LoopConfig(3, grad_accum_steps=2),
            SINGLE,
        )


def test_clipping_bounds_the_global_norm():
    model = tiny_gpt(MODEL)
    optimizers = model.setup_optimizers()
    x = blocks(1, 4)[0]
    model(x[:, :-1], x[:, 1:]).backward()
    full_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    before = clip_grad_norm(optimizers, max_norm=0.1, dist=SINGLE)
    torch.testing.assert_close(before, full_norm)
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert after == pytest.approx(0.1, rel=1e-4)


def test_evaluate_bpb_counts_only_real_bytes():
    model = tiny_gpt(MODEL)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    token_bytes = torch.randint(1, 4, (VOCAB,))
    token_bytes[:3] = 0  # special tokens: not counted
    x = blocks(1, 2)[0]
    inputs, targets = x[:, :-1], x[:, 1:].clone()
    targets[0, :4] = -1  # ignored positions
    targets[1, :2] = 1  # a special token as target
    tracked = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: tracked.append(o.requires_grad))
    bpb = evaluate_bpb(model, iter([(inputs, targets)] * 2), token_bytes, SINGLE)
    hook.remove()
    assert tracked == [False, False]  # no autograd graph is built (a training model, grads enabled)
    with torch.no_grad():
        nats = model(inputs, targets, loss_reduction="none")
    counted = (targets >= 0) & (token_bytes[targets.clamp(min=0)] > 0)
    expected = nats[counted].sum() / (math.log(2) * token_bytes[targets[counted]].sum())
    assert bpb == pytest.approx(float(expected), rel=1e-5)
    assert evaluate_bpb(model, iter([(inputs, targets)] * 5), token_bytes, SINGLE, steps=1) == pytest.approx(
        bpb
    )
    assert evaluate_bpb(model, iter([]), token_bytes, SINGLE) == math.inf
