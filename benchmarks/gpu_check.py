"""GPU check of the training core alone (no Ray, no network): short d12 and d20 pretraining runs on
random tokens (vocab 65,536, sequence 2,048, bf16 autocast, torch.compile), plus a KV-cache
correctness check on the GPU. Prints a table of tokens/s and MFU, where MFU is the ratio to the
named reference, the H100 dense bf16 peak of 989 TFLOP/s; writes results to --out.

Run on a GPU machine (under 5 minutes):  bash benchmarks/gpu_check.sh
Run here on CPU in seconds (depth 2):    PYTHONPATH=. python benchmarks/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from nanochat.common import DistInfo, autodetect_device
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.train import LoopConfig, train_loop

H100_BF16_PEAK = 989e12  # FLOP/s, dense bf16, H100 SXM datasheet (the seed's MFU reference)
VOCAB = 65_536


def random_batches(
    batch: int, seq_len: int, device: str, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches of uniform random tokens made on the device (no data wait)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    while True:
        tokens = torch.randint(0, VOCAB, (batch, seq_len + 1), device=device, generator=gen)
        yield tokens[:, :-1], tokens[:, 1:]


def build_model(config: GPTConfig, device: str) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def run_one(depth: int, batch: int, args: argparse.Namespace, device: str) -> dict:
    """Train `args.steps` steps of a depth-`depth` model; summarise the steps after warmup."""
    head_dim = 64 if depth < 4 else 128
    config = GPTConfig.from_depth(depth, vocab_size=VOCAB, sequence_len=args.seq_len, head_dim=head_dim)
    model = build_model(config, device)
    dist = DistInfo(device=device)
    optimizers = model.setup_optimizers(dist=dist)
    peak = H100_BF16_PEAK if device.startswith("cuda") else None
    cfg = LoopConfig(
        num_steps=args.steps, peak_flops=peak, compile=device.startswith("cuda") and not args.eager
    )
    steps: list[dict] = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_loop(
        model,
        optimizers,
        random_batches(batch, args.seq_len, device, depth),
        cfg,
        dist,
        on_metrics=steps.append,
    )
    wall = time.perf_counter() - start
    timed = steps[args.warmup_steps :] or steps[-1:]  # the first steps include compilation
    tokens_per_sec = sum(m["tokens_per_sec"] * m["step_time_s"] for m in timed) / sum(
        m["step_time_s"] for m in timed
    )
    mfu = None if peak is None else 100.0 * model.estimate_flops() * tokens_per_sec / peak
    return {
        "depth": depth,
        "params": model.num_params(),
        "device_batch": batch,
        "seq_len": args.seq_len,
        "steps": len(steps),
        "timed_steps": len(timed),
        "tokens_per_sec": tokens_per_sec,
        "mfu_percent": mfu,
        "step_ms": 1000 * sum(m["step_time_s"] for m in timed) / len(timed),
        "first_step_s": steps[0]["step_time_s"],
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "wall_s": wall,
    }


def run_with_fallback(depth: int, batch: int, args: argparse.Namespace, device: str) -> dict:
    """run_one, halving the device batch on CUDA out-of-memory (down to 1)."""
    while True:
        try:
            return run_one(depth, batch, args, device)
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            if batch == 1:
                raise
            print(f"d{depth}: out of memory at device batch {batch}, retrying with {batch // 2}", flush=True)
            batch //= 2


@torch.no_grad()
def check_kv_cache(device: str) -> float:
    """Max |cached decode - full recompute| of a random depth-2 model in float32 on `device`."""
    torch.manual_seed(0)
    config = GPTConfig.from_depth(2, vocab_size=512, sequence_len=64, head_dim=64)
    model = build_model(config, device)
    for p in model.parameters():
        p.normal_(0.0, 0.2)
    idx = torch.randint(0, 512, (3, 20), device=device)
    full = model(idx)
    cache = KVCache(3, config.n_kv_head, 32, 64, config.n_layer, device=device)
    outs = [model(idx[:, :8], kv_cache=cache)]
    outs += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(8, 20)]
    return float((torch.cat(outs, dim=1) - full).abs().max())


def print_table(rows: list[dict]) -> str:
    header = (f"{'depth':>5} {'params':>13} {'batch':>5} {'tok/s':>12} {'MFU % of 989T':>13} "
              f"{'step ms':>9} {'mem GiB':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        mfu = "n/a" if r["mfu_percent"] is None else f"{r['mfu_percent']:.1f}"
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(
            f"{r['depth']:>5} {r['params']:>13,} {r['device_batch']:>5} {r['tokens_per_sec']:>12,.0f} "
            f"{mfu:>13} {r['step_ms']:>9.1f} {mem:>8}"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, depth 2, sequence 64, 4 steps")
    parser.add_argument("--depths", default="12,20", help="comma-separated depths to run")
    parser.add_argument("--batches", default="32,16", help="device batch per depth (halved on OOM)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per depth")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds; skip depths after it")
    parser.add_argument("--out", default=os.environ.get("OUT", "./gpu_out"))
    args = parser.parse_args()
    if args.smoke:
        device, args.depths, args.batches, args.seq_len, args.steps, args.warmup_steps = (
            "cpu",
            "2",
            "2",
            64,
            4,
            1,
        )
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        device = autodetect_device()
        if device != "cuda":
            raise SystemExit("no CUDA device visible: run with --smoke on CPU, or on a GPU machine")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(env), flush=True)
    kv_error = check_kv_cache(device)  # before TF32 is allowed: a strict float32 comparison
    print(f"kv cache decode vs recompute, max abs diff (float32): {kv_error:.2e}", flush=True)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 leftovers, as the seed does
    rows, start = [], time.perf_counter()
    depths = [int(d) for d in args.depths.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for i, depth in enumerate(depths):
        batch = batches[min(i, len(batches) - 1)]
        if time.perf_counter() - start > args.time_budget:
            print(f"d{depth}: skipped, time budget of {args.time_budget:.0f}s used", flush=True)
            continue
        rows.append(run_with_fallback(depth, batch, args, device))
        print(json.dumps(rows[-1]), flush=True)
    table = print_table(rows)
    (out / "gpu_check.json").write_text(
        json.dumps({"env": env, "kv_cache_max_abs_diff": kv_error, "runs": rows}, indent=2)
    )
    (out / "gpu_check.txt").write_text(table + "\n")
    if kv_error > 1e-3:
        raise SystemExit(f"KV cache decode differs from recompute by {kv_error:.2e} on {device}")


if __name__ == "__main__":
    main()
