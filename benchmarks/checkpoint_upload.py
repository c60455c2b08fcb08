"""Checkpoint upload, synchronous vs in the background: the step-time spike at a checkpoint.

    python benchmarks/checkpoint_upload.py [--steps 60] [--every 10] [--storage DIR] [--preset tiny]

Runs the same pretraining twice in one Ray session (a local cluster started here), once with
`async_checkpoints=false` (the reference) and once with `true`, on the same data, and prints for each
the median step time, the median time of the steps that end with a checkpoint (the step plus the
save and upload that follow it, measured from one metrics record to the next), and the spike (their
ratio). Point `--storage` at a slow mount (e.g. the host harness's shared mount limited by `tbf`, or
an NFS path) to see what background upload buys; on a local disk the upload is short either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import ray

from cluster.pretrain import run_pretrain
from cluster.storage import RunStorage
from jobs.config import load_stage_config
from jobs.pretrain import PretrainConfig
from nanochat.data.dataset import get_source, iter_row_groups, list_shards, train_val_split
from nanochat.tokenizer import Tokenizer


def step_times(records: list[dict], every: int) -> tuple[list[float], list[float]]:
    """(wall time between consecutive records of ordinary steps, of steps ending in a checkpoint)."""
    rows = [r for r in records if r.get("step_time_s") is not None]
    plain, saved = [], []
    for prev, cur in zip(rows, rows[1:], strict=False):
        gap = cur["time"] - prev["time"]  # includes what happened after prev's step: a checkpoint, if due
        (saved if prev["step"] % every == 0 else plain).append(gap)
    return plain, saved


def checkpoint_bytes(storage: RunStorage) -> int:
    """Bytes of the run's newest pretraining checkpoint in storage (every rank's files)."""
    files = storage.fs.get_file_info(pafs.FileSelector(storage.stage_path("pretrain"), recursive=True))
    per_dir: dict[str, int] = {}
    for f in files:
        parts = f.path.split("/")
        if f.type == pafs.FileType.File and len(parts) > 1 and parts[-2].startswith("checkpoint_"):
            per_dir[parts[-2]] = per_dir.get(parts[-2], 0) + f.size
    return per_dir[max(per_dir)] if per_dir else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--storage", default=None, help="run storage (default: a temporary directory)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir="/tmp"))
    root = args.storage or str(tmp / "runs")
    ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), _temp_dir=str(tmp / "ray"),
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    try:
        data = str(get_source("embedded").directory)
        texts = next(iter_row_groups(train_val_split(list_shards(data))[0])).texts[:400]
        tok_dir = tmp / "tokenizer"
        Tokenizer.train_from_iterator(texts, 1024).save(tok_dir)
        rows, size = {}, 0
        for mode in ("false", "true"):
            storage = RunStorage(f"bench-async-{mode}", root)
            with storage.writer("tokenizer", {}) as w:
                Tokenizer.load(str(tok_dir)).save(w.path)
                w.commit()
            overrides = [f"num_iterations={args.steps}", f"checkpoint_every={args.every}", "eval_every=0",
                         "max_failures=0", f"async_checkpoints={mode}", f"data={data}"]
            spec = load_stage_config(PretrainConfig, "pretrain", args.preset, overrides).to_spec(args.preset)
            run_pretrain(spec, storage, config={}, force=True)
            rows[mode] = step_times(storage.read_metrics("pretrain"), args.every)
            size = checkpoint_bytes(storage)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\npretraining ({args.preset} preset), {args.steps} steps, a checkpoint every {args.every}, "
          f"storage {root}, {size / 1e6:.1f} MB per checkpoint")
    print("| upload | median step s | median step + checkpoint s | spike | spike vs sync |")
    print("|---|---|---|---|---|")
    spikes = {}
    for mode, label in (("false", "synchronous (reference)"), ("true", "background")):
        plain, saved = rows[mode]
        step, with_ckpt = statistics.median(plain), statistics.median(saved)
        spikes[mode] = with_ckpt / step
        ratio = spikes[mode] / spikes["false"]
        print(f"| {label} | {step:.3f} | {with_ckpt:.3f} | {spikes[mode]:.2f}x | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
