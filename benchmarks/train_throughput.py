"""Training tokens/s through Ray Train + Ray Data (1 worker) vs a plain single-process PyTorch loop.

Same model (the `tiny` preset: depth 4, sequence 256, 8 x 256 = 2,048-token steps), same tokenizer,
same data, same torch threads (2), same core loop (nanochat.train.train_loop). Both sides do the
same data work: read the same row groups, tokenize and pack them (the plain loop inline in its
process, the cluster path in a Ray Data actor). Rows, in one run on one machine:

  plain, no Ray            the reference: this process, nothing else running
  plain, Ray idle          the same loop while an idle local Ray cluster runs (its own processes)
  Train worker, local data the plain loop inside a 1-worker TorchTrainer (worker set-up, Train's
                           threads), data read and packed inline as in the plain loop
  Train + Ray Data         the stage itself: cluster.train.run_pretrain, 1 worker with 2 CPUs

tokens/s is the median over steps after `--skip` warm-up steps of the loop's own per-step figure
(the same statistic on every row); start-up (cluster, worker group, pipeline) is reported apart.
Each repeat runs every row once, in the order above, with a fresh local Ray started after the
reference row and stopped at the end, and each row's ratio is taken against its own repeat's
reference: this machine's speed drifts by 10-20% over minutes (shared host), so ratios across
repeats would measure the drift.

Where the gap comes from (measured, see the README): every Ray Python process (Train V2's
controller and helper actors, Ray Data's stats/autoscaling actors, idle workers, ~10 of them in
the stage) wakes its main loop every 10 ms to check signals, which Ray does not let one configure;
with 2 torch threads on 2 cores each wake-up stalls the other thread at the next OpenMP barrier.

Run: PYTHONPATH=. python benchmarks/train_throughput.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch

from cluster.storage import RunStorage
from cluster.train import TrainSpec, build_model, build_optimizers, make_plan, resolve_shards, run_pretrain
from nanochat.common import DistInfo
from nanochat.dataloader import DataPosition, RowBatcher, local_row_chunks, plan_row_groups
from nanochat.dataset import get_source, iter_row_groups
from nanochat.tokenizer import Tokenizer
from nanochat.train import train_loop

THREADS = 2


def spec_for(steps: int) -> TrainSpec:
    return TrainSpec(depth=4, head_dim=64, sequence_len=256, device_batch_size=8, total_batch_tokens=2048,
                     num_iterations=steps, eval_every=0, eval_tokens=2048, checkpoint_every=0,
                     num_workers=1, cpus_per_worker=THREADS, max_failures=0)


def plain_loop(spec: TrainSpec, tokenizer_dir: str, data: str) -> list[dict[str, Any]]:
    """The single-process loop: per-step metrics dicts (no evaluation, no checkpoints)."""
    torch.set_num_threads(THREADS)
    tok = Tokenizer.load(tokenizer_dir)
    train, _ = resolve_shards(data)
    plan = make_plan(spec, tok.vocab_size, 1)
    model = build_model(plan.model, "cpu", spec.seed)
    optimizers = build_optimizers(model, spec, DistInfo())
    start = DataPosition(0)
    batches = RowBatcher(local_row_chunks(plan_row_groups(train), tok, spec.sequence_len + 1, start, 1),
                         spec.device_batch_size, start)
    batches.prime()
    steps: list[dict[str, Any]] = []
    train_loop(model, optimizers, batches, plan.loop, DistInfo(), on_metrics=steps.append)
    return steps


def _plain_in_worker(cfg: dict[str, Any]) -> None:
    """TorchTrainer per-worker function: the plain loop; its step metrics go to a JSON file
    (one machine: the driver reads it)."""
    steps = plain_loop(TrainSpec(**cfg["spec"]), cfg["tokenizer"], cfg["data"])
    Path(cfg["out"]).write_text(json.dumps(steps))


def train_worker_local_data(spec: TrainSpec, tokenizer_dir: str, data: str, tmp: str) -> list[dict[str, Any]]:
    from dataclasses import asdict

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    Path(tmp).mkdir(parents=True, exist_ok=True)
    out = f"{tmp}/steps.json"
    trainer = TorchTrainer(
        _plain_in_worker,
        train_loop_config={"spec": asdict(spec), "tokenizer": tokenizer_dir, "data": data, "out": out},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": THREADS}),
        run_config=RunConfig(name="plain", storage_path=tmp))
    trainer.fit()
    return json.loads(Path(out).read_text())


def stage_path(spec: TrainSpec, tokenizer_dir: str, data: str, tmp: str, run: str) -> tuple[list[dict], float]:
    """run_pretrain on a fresh run: (per-step metrics from metrics.jsonl, seconds of the whole call)."""
    storage = RunStorage(run, tmp)
    with storage.writer("tokenizer", {}) as w:
        Tokenizer.load(tokenizer_dir).save(w.path)
        w.commit()
    t0 = time.perf_counter()
    run_pretrain(spec, storage, data=data, tokenizer=None, config={})
    took = time.perf_counter() - t0
    return [r for r in storage.read_metrics("pretrain") if r.get("tokens_per_sec")], took


def summary(steps: list[dict[str, Any]], skip: int) -> tuple[float, float]:
    """(median tokens/s, mean data-wait share) over the steps after the warm-up."""
    kept = [s for s in steps if s["step"] > skip and s.get("tokens_per_sec")]
    return statistics.median(s["tokens_per_sec"] for s in kept), statistics.mean(s["data_wait_frac"] for s in kept)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the median")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    spec = spec_for(args.steps)
    data = str(get_source("embedded").directory)
    tmp = tempfile.mkdtemp(prefix="nc-bench-", dir="/tmp")
    tokenizer_dir = f"{tmp}/tokenizer"
    texts = next(iter(iter_row_groups(resolve_shards(data)[0]))).texts
    Tokenizer.train_from_iterator(texts, args.vocab_size).save(tokenizer_dir)

    results: dict[str, list[tuple[float, float]]] = {}
    timings: dict[str, list[float]] = {}

    def add(name: str, steps: list[dict], seconds: float | None = None) -> None:
        results.setdefault(name, []).append(summary(steps, args.skip))
        if seconds is not None:
            timings.setdefault(name, []).append(seconds)

    starts: list[float] = []
    for i in range(args.repeats):
        add("plain, no Ray", plain_loop(spec, tokenizer_dir, data))
        t0 = time.perf_counter()
        # a fresh local instance with its dashboard and metrics agent, as `python -m cluster.local start`
        # runs (2 logical CPUs per core), never a cluster that may already run on this machine
        ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), include_dashboard=True,
                 _temp_dir=f"{tmp}/ray{i}", runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}},
                 log_to_driver=False)
        starts.append(time.perf_counter() - t0)
        try:
            add("plain, Ray idle", plain_loop(spec, tokenizer_dir, data))
            t0 = time.perf_counter()
            add("Train worker, local data", train_worker_local_data(spec, tokenizer_dir, data, f"{tmp}/t{i}"),
                time.perf_counter() - t0)
            steps, took = stage_path(replace(spec), tokenizer_dir, data, f"{tmp}/runs", f"bench{i}")
            add("Train + Ray Data", steps, took)
        finally:
            ray.shutdown()

    refs = [r[0] for r in results["plain, no Ray"]]
    print(f"\ntiny model (depth 4, seq 256, 2,048-token steps), {THREADS} torch threads, {args.steps} steps, "
          f"median tokens/s over steps > {args.skip}, {args.repeats} repeats; cluster start "
          f"{statistics.median(starts):.0f} s")
    print("| path | tokens/s (each repeat) | ratio vs plain (each repeat) | median ratio | data-wait share "
          "| wall s per run |")
    print("|---|---|---|---:|---:|---:|")
    for name, runs in results.items():
        ratios = [r[0] / ref for r, ref in zip(runs, refs, strict=True)]
        each = ", ".join(f"{r[0]:,.0f}" for r in runs)
        each_ratio = ", ".join(f"{x:.3f}" for x in ratios)
        wait = statistics.mean(r[1] for r in runs)
        wall = ", ".join(f"{t:.0f}" for t in timings.get(name, [])) or "-"
        print(f"| {name} | {each} | {each_ratio} | {statistics.median(ratios):.3f}x | {100 * wait:.2f}% | {wall} |")


if __name__ == "__main__":
    main()
