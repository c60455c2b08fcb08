"""Pretraining tokens/s: the stage (Ray Train + Ray Data, 1 worker) vs a compiled plain PyTorch loop.

Same model (the issue's parity config: depth 4, sequence 256, 8 x 256 = 2,048-token steps, vocab
8,192), same tokenizer, same data, same torch threads (2), same core loop (nanochat.train.train_loop).
Both sides do the same data work: read the same row groups, tokenize and pack them (the plain loop
inline in its process, the cluster path in a Ray Data actor). Rows, in one run on one machine:

  plain, compiled          the reference: this process, torch.compile on, nothing else running
  plain, compiled, float32 (--compare-float32) the reference in float32, when --precision (default
                           auto: bfloat16 on a CPU with native bf16) is not float32: speed and final bpb
  plain, eager             the same loop without compile (the stage's CPU default before issue 21)
  plain, compiled, Ray idle   (--diagnose) the reference while an idle local Ray cluster runs
  Train + Ray Data         the stage itself: cluster.pretrain.run_pretrain, 1 worker with 2 CPUs, compile
                           as the stage decides it (nanochat.train.compile_pays_back; --stage-compile)

External reference (not run here): nanochat's own code, unmodified, on this machine kind with the
same config reached ~4,000 tokens/s compiled on CPU (issue 21); its model differs (value
embeddings and more), so it is a reference, not a spec.

tokens/s is the median over steps after `--skip` warm-up steps of the loop's own per-step figure
(the same statistic on every row); start-up (cluster, worker group, pipeline) is reported apart.
Each repeat runs every row once, in the order above, with a fresh local Ray started after the
plain rows and stopped at the end, and each row's ratio is taken against its own repeat's
reference: this machine's speed drifts by 10-20% over minutes (shared host), so ratios across
repeats would measure the drift.

`--compile-cost` measures instead what compiling costs and saves (the constants of
nanochat.train.compile_pays_back): an eager and a compiled copy of the model trained side by side
in one fresh process, their steps alternating (robust to a machine whose load drifts), first with
an empty inductor cache (TORCHINDUCTOR_CACHE_DIR set to a fresh directory), then with that cache
warm; the compile is the first compiled step's time beyond a median compiled step.

Every row trains at `--precision` (the stage's setting, default auto: nanochat.common.training_dtype).

Run: PYTHONPATH=. python benchmarks/train_throughput.py [--steps 300] [--repeats 3] [--compare-float32]
     PYTHONPATH=. python benchmarks/train_throughput.py --compile-cost [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from cluster.pretrain import resolve_shards, run_pretrain
from cluster.specs import PretrainSpec
from cluster.storage import RunStorage
from cluster.train import build_model, make_plan
from jobs.config import load_stage_config
from jobs.pretrain import PretrainConfig
from nanochat.common import PRECISIONS, DistInfo, training_dtype
from nanochat.data.dataloader import (
    DataPosition,
    RowBatcher,
    local_row_chunks,
    plan_row_groups,
    rank_batches,
    validation_rows,
)
from nanochat.data.dataset import get_source, iter_row_groups
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from nanochat.train import evaluate_bpb, train_loop

THREADS = 2


def spec_for(steps: int, compile: bool | None, data: str | None = None,
             precision: str = "auto") -> PretrainSpec:
    """The tiny preset's pretraining (depth 4, 8 x 256-token rows per step, 2 CPUs), as a user would set it:
    the preset plus overrides for the horizon, no intermediate evaluations or checkpoints, no retries."""
    overrides = [f"num_iterations={steps}", "eval_every=0", "checkpoint_every=0", "max_failures=0",
                 f"cpus_per_worker={THREADS}", f"precision={precision}",
                 f"compile={'null' if compile is None else str(compile).lower()}"]
    return load_stage_config(PretrainConfig, "pretrain", "tiny",
                             overrides + ([f"data={data}"] if data else [])).to_spec("tiny")


def plain_loop(pretrain: PretrainSpec, tokenizer_dir: str, data: str) -> list[dict[str, Any]]:
    """The single-process loop: per-step metrics dicts (final validation bpb in the last one)."""
    spec = pretrain.train
    torch.set_num_threads(THREADS)
    tok = Tokenizer.load(tokenizer_dir)
    train, val = resolve_shards(data)
    plan = make_plan(spec, tok.vocab_size, 1)
    model = build_model(plan.model, "cpu", spec.seed)
    optimizers = model.setup_optimizers(spec.lrs, DistInfo(),
                                        ns_dtype=training_dtype(plan.loop.precision, "cpu"))
    start = DataPosition(0)
    batches = RowBatcher(local_row_chunks(plan_row_groups(train), tok, spec.sequence_len + 1, start, 1),
                         spec.device_batch_size, start)
    batches.prime()
    val_rows = validation_rows(val, tok, spec.sequence_len + 1,
                               max(1, pretrain.reading.eval_tokens // spec.sequence_len))
    val_batches = rank_batches(val_rows, spec.device_batch_size, 0, 1)
    token_bytes = tok.token_bytes()

    def evaluate(step: int) -> dict[str, float]:
        return {"val_bpb": evaluate_bpb(model, iter(val_batches), token_bytes, DistInfo())} if step else {}

    steps: list[dict[str, Any]] = []
    train_loop(model, optimizers, batches, plan.loop, DistInfo(), on_metrics=steps.append, evaluate=evaluate)
    return [s for s in steps if s["step"] > 0]


def stage_path(spec: PretrainSpec, tokenizer_dir: str, tmp: str, run: str) -> tuple[list[dict], float]:
    """run_pretrain on a fresh run: (per-step metrics from metrics.jsonl, seconds of the whole call)."""
    storage = RunStorage(run, tmp)
    with storage.writer("tokenizer", {}) as w:
        Tokenizer.load(tokenizer_dir).save(w.path)
        w.commit()
    t0 = time.perf_counter()
    run_pretrain(spec, storage, config={})
    took = time.perf_counter() - t0
    return [r for r in storage.read_metrics("pretrain") if r.get("tokens_per_sec")], took


def summary(steps: list[dict[str, Any]], skip: int) -> tuple[float, float, float | None]:
    """(median tokens/s, mean data-wait share) over the steps after the warm-up, final val bpb."""
    kept = [s for s in steps if s["step"] > skip and s.get("tokens_per_sec")]
    final = next((s["val_bpb"] for s in reversed(steps) if s.get("val_bpb") is not None), None)
    return (statistics.median(s["tokens_per_sec"] for s in kept),
            statistics.mean(s["data_wait_frac"] for s in kept), final)


def paired_steps(steps: int, tokenizer_dir: str, data: str) -> dict[str, list[float]]:
    """Seconds per step of two identical models trained side by side in this process, one eager and
    one compiled, their steps alternating (so both see the same machine load at the same time)."""
    from nanochat.train import _micro_batches, _set_hyperparams, clip_grad_norm

    torch.set_num_threads(THREADS)
    spec = spec_for(steps, None, precision="float32").train  # what compiling saves in float32
    tok = Tokenizer.load(tokenizer_dir)
    plan = make_plan(spec, tok.vocab_size, 1)
    items = plan_row_groups(resolve_shards(data)[0])
    sides = {}
    for name in ("eager", "compiled"):
        model = build_model(plan.model, "cpu", spec.seed)
        start = DataPosition(0)
        batches = RowBatcher(local_row_chunks(items, tok, spec.sequence_len + 1, start, 1),
                             spec.device_batch_size, start)
        batches.prime()
        forward = torch.compile(model, dynamic=False) if name == "compiled" else model
        sides[name] = (model, forward, model.setup_optimizers(spec.lrs, DistInfo()), batches)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for step in range(steps):
        for name, (model, forward, optimizers, batches) in sides.items():
            t0 = time.perf_counter()
            _set_hyperparams(optimizers, step, plan.loop)
            _micro_batches(forward, batches, plan.loop, DistInfo(), step)
            clip_grad_norm(optimizers, plan.loop.grad_clip, DistInfo())
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    return times


def compile_cost(args: argparse.Namespace, tokenizer_dir: str, data: str, tmp: str) -> None:
    """Paired eager/compiled steps twice, each in a fresh process: with an empty inductor cache, then
    with the cache the first run filled."""
    import subprocess
    import sys

    cache = f"{tmp}/inductor-cache"
    print(f"\ncompile cost and gain, plain loop, {args.steps} paired steps (eager and compiled alternating "
          f"in one process), vocab {args.vocab_size}, {THREADS} threads; medians over steps > {args.skip}")
    print("| inductor cache | compile: first compiled step beyond its median s | median eager step s | "
          "median compiled/eager (paired) | time saved per step |")
    print("|---|---:|---:|---:|---:|")
    for label in ("cold (empty dir)", "warm (filled by the cold run)"):
        out = f"{tmp}/paired-{len(label)}.json"
        code = ("import json; from benchmarks.train_throughput import paired_steps; "
                f"json.dump(paired_steps({args.steps}, {tokenizer_dir!r}, {data!r}), open({out!r}, 'w'))")
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": os.getcwd()}
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        t = json.loads(Path(out).read_text())
        eager, compiled = t["eager"][args.skip:], t["compiled"][args.skip:]
        ratio = statistics.median(c / e for c, e in zip(compiled, eager, strict=True))
        compile_s = t["compiled"][0] - statistics.median(compiled)
        print(f"| {label} | {compile_s:.1f} | {statistics.median(eager):.3f} | {ratio:.3f} "
              f"| {1 - ratio:.1%} |")
    flops = GPT(make_plan(spec_for(1, None).train, args.vocab_size, 1).model).estimate_flops() * 2048
    print(f"training FLOPs per step: {flops:.3e}; eager FLOP/s = FLOPs / median eager step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the median")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--stage-compile", choices=("auto", "on", "off"), default="auto",
                   help="the stage's compile setting (auto: the stage's own rule for this many steps)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="every row's precision setting (auto: the stage's default, bfloat16 where native)")
    p.add_argument("--compare-float32", action="store_true",
                   help="also the reference in float32 (the project's CPU numerics before issue 21's bf16)")
    p.add_argument("--diagnose", action="store_true", help="also the reference beside an idle Ray cluster")
    p.add_argument("--compile-cost", action="store_true",
                   help="measure compile time (cold/warm cache) instead")
    args = p.parse_args()
    data = str(get_source("embedded").directory)
    tmp = tempfile.mkdtemp(prefix="nc-bench-", dir="/tmp")
    tokenizer_dir = f"{tmp}/tokenizer"
    texts = next(iter(iter_row_groups(resolve_shards(data)[0]))).texts
    Tokenizer.train_from_iterator(texts, args.vocab_size).save(tokenizer_dir)
    if args.compile_cost:
        compile_cost(args, tokenizer_dir, data, tmp)
        return
    stage_compile = {"auto": None, "on": True, "off": False}[args.stage_compile]
    prec = args.precision

    results: dict[str, list[tuple[float, float, float | None]]] = {}
    timings: dict[str, list[float]] = {}

    def add(name: str, steps: list[dict], seconds: float | None = None) -> None:
        results.setdefault(name, []).append(summary(steps, args.skip))
        if seconds is not None:
            timings.setdefault(name, []).append(seconds)

    starts: list[float] = []
    compiled_stage: list[bool] = []
    for i in range(args.repeats):
        add("plain, compiled", plain_loop(spec_for(args.steps, True, data, prec), tokenizer_dir, data))
        if args.compare_float32:
            add("plain, compiled, float32",
                plain_loop(spec_for(args.steps, True, data, "float32"), tokenizer_dir, data))
        add("plain, eager", plain_loop(spec_for(args.steps, False, data, prec), tokenizer_dir, data))
        t0 = time.perf_counter()
        # a fresh local instance with its dashboard and metrics agent, as `python -m cluster.local start`
        # runs (2 logical CPUs per core), never a cluster that may already run on this machine
        ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), include_dashboard=True,
                 _temp_dir=f"{tmp}/ray{i}", runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}},
                 log_to_driver=False)
        starts.append(time.perf_counter() - t0)
        try:
            if args.diagnose:
                add("plain, compiled, Ray idle",
                    plain_loop(spec_for(args.steps, True, data, prec), tokenizer_dir, data))
            steps, took = stage_path(spec_for(args.steps, stage_compile, data, prec), tokenizer_dir,
                                     f"{tmp}/runs", f"bench{i}")
            compiled_stage.append(bool(steps and steps[-1].get("compiled")))
            add("Train + Ray Data (the stage)", steps, took)
        finally:
            ray.shutdown()

    refs = [r[0] for r in results["plain, compiled"]]
    print(f"\nparity config (depth 4, seq 256, 2,048-token steps, vocab {args.vocab_size}), "
          f"{THREADS} torch threads, {args.steps} steps, median tokens/s over steps > {args.skip}, "
          f"{args.repeats} repeats; precision {prec} (here: {training_dtype(prec, 'cpu')}); "
          f"cluster start {statistics.median(starts):.0f} s; "
          f"the stage compiled: {compiled_stage}")
    print("| path | tokens/s (each repeat) | ratio vs plain compiled (each repeat) | median ratio "
          "| data-wait share | final val bpb | wall s per run |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        ratios = [r[0] / ref for r, ref in zip(runs, refs, strict=True)]
        each = ", ".join(f"{r[0]:,.0f}" for r in runs)
        each_ratio = ", ".join(f"{x:.3f}" for x in ratios)
        wait = statistics.mean(r[1] for r in runs)
        bpb = ", ".join(f"{r[2]:.4f}" if r[2] is not None else "-" for r in runs)
        wall = ", ".join(f"{t:.0f}" for t in timings.get(name, [])) or "-"
        print(f"| {name} | {each} | {each_ratio} | {statistics.median(ratios):.3f}x | {100 * wait:.2f}% "
              f"| {bpb} | {wall} |")
    print("| nanochat (its own code, compiled on CPU; issue 21, not run here) | ~4,000 | - | - | - "
          "| 1.8093 | - |")


if __name__ == "__main__":
    main()
