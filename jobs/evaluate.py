"""Evaluate a trained stage: validation bits per byte, greedy samples of fixed prompts, and CORE.

    python -m jobs.evaluate --stage pretrain --preset micro --run r1
    RAY_AUTH_MODE=token ray job submit --working-dir . -- \\
        python -m jobs.evaluate --stage pretrain --preset tiny --run demo

Reads the exported model `{run}/<stage>/model/` with the tokenizer saved beside it (model/tokenizer/,
else `{run}/tokenizer/`) and the validation shard; writes `{run}/evaluate/<stage>.json` atomically,
last: the evaluation of a stage is complete when that file exists (a rerun skips it unless --force).
CORE uses DCLM's eval bundle when it is on disk or can be downloaded, else the embedded pack's tasks
(nanochat/core_tasks.py), labelled "CORE-k (our config)".

On the cluster (numbered as the Ray calls happen):
  1. ray.init(): join the cluster this job was submitted to;
  2. EvalPool: evaluation actors sized to the cluster (a GPU each when there are GPUs), each loading
     the model once;
  3. bpb on the validation shard and the samples run as single actor calls, while
  4. the CORE items are sharded over all actors; results come back in item order and are summed.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any, Literal

from pydantic import Field

from cluster.eval_pool import EvalPool, EvalPoolError, load_from_storage, plan_pool
from cluster.storage import RunStorage, StorageError, git_commit, write_text_atomic
from jobs.config import ConfigError, StageConfig, load_stage_config, stage_argparser
from nanochat.core_eval import build_requests, core_results, score_requests
from nanochat.core_tasks import CoreSelection, select_core_tasks
from nanochat.dataset import DownloadError, SourceUnavailableError, get_source, list_shards, train_val_split
from nanochat.evaluation import SAMPLE_PROMPTS, aggregate, sample_completions, val_bpb

EVALUATED_STAGES = ("pretrain",)  # the chat stages (midtrain, sft, rl) join with the chat evaluations


class EvaluateConfig(StageConfig):
    """The `evaluate:` section of a preset."""

    model_dir: str | None = Field(None, description="model directory or URI to evaluate; default {run}/<stage>/model")
    data_dir: str | None = Field(None, description="shard directory or URI whose last shard is the validation "
                                                   "shard; default the embedded pack")
    eval_dir: str | None = Field(None, description="the pack's evaluation sets; default $NANOCHAT_HOME/data/eval")
    bpb_tokens: int = Field(1 << 20, ge=1, description="validation target tokens for bits per byte (at most)")
    device_batch_size: int = Field(8, ge=1, description="rows per forward pass for bits per byte")
    sample_tokens: int = Field(24, ge=1, description="greedy tokens generated per fixed sample prompt")
    core_source: Literal["auto", "bundle", "pack"] = Field(
        "auto", description="CORE tasks: DCLM's eval bundle, the pack's tasks (our config), or auto (bundle when "
                            "on disk or reachable, else pack)")
    core_tasks: list[str] | None = Field(None, description="CORE task labels to run; default all of the source's")
    max_per_task: int | None = Field(None, ge=1, description="items per CORE task (a seeded sample); default all")
    bundle_dir: str | None = Field(None, description="where the eval bundle is unpacked; default "
                                                     "$NANOCHAT_HOME/eval_bundle")
    bundle_timeout_s: float = Field(10.0, gt=0, description="seconds to wait for the bundle's server before "
                                                            "giving up (offline: fail fast)")
    num_actors: int = Field(2, ge=1, description="evaluation actors (with GPUs: at most one per GPU)")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs per actor; cut to fit the cluster, "
                                                         "fractions allowed; torch threads = whole CPUs (>= 1)")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per actor; default 1 when the cluster "
                                                                 "has GPUs, else 0")


def stage_inputs(storage: RunStorage, stage: str, cfg: EvaluateConfig) -> tuple[str, str | None, dict[str, Any]]:
    """(model URI, tokenizer URI or None when it is exported beside the model, the stage's meta);
    errors name the stage to run first."""
    meta = storage.read_meta(stage)  # StorageError "... (run the pretrain stage first)" when incomplete
    if cfg.model_dir is not None:
        return cfg.model_dir, None, meta
    model_path = f"{storage.stage_path(stage)}/model"
    model_uri = f"{storage.stage_uri(stage)}/model"
    if not storage.exists(f"{model_path}/config.json"):
        raise StorageError(f"stage {stage!r} of run {storage.run!r} has no exported model at {model_uri}; "
                           f"rerun the {stage} stage (with --force) to export its final model")
    if storage.exists(f"{model_path}/tokenizer"):
        return model_uri, None, meta
    if not storage.is_complete("tokenizer"):
        raise StorageError(f"run {storage.run!r} has no complete tokenizer; run the tokenizer stage first")
    return model_uri, storage.stage_uri("tokenizer"), meta


def validation_shards(cfg: EvaluateConfig) -> list[str]:
    """The validation shard: the last shard of the configured data (default the embedded pack)."""
    data = cfg.data_dir or str(get_source("embedded").directory)
    return train_val_split(list_shards(data))[1]


def evaluate(storage: RunStorage, stage: str, cfg: EvaluateConfig, selection: CoreSelection) -> dict[str, Any]:
    """Run bpb, samples and CORE on an evaluation pool; returns the result document."""
    model_uri, tokenizer_uri, meta = stage_inputs(storage, stage, cfg)  # checked again: cheap, and callable alone
    val = validation_shards(cfg)
    requests = [r for task in selection.tasks for r in build_requests(task, cfg.max_per_task)]
    import ray

    t0 = time.time()
    if not ray.is_initialized():
        ray.init()  # 1. the cluster this job runs on (or a local one by hand)
    spec = plan_pool(cfg.num_actors, cfg.cpus_per_actor, ray.cluster_resources(), cfg.gpus_per_actor)
    timings: dict[str, float] = {}
    with EvalPool(functools.partial(load_from_storage, model_uri, tokenizer_uri), spec) as pool:  # 2.
        actors = pool.ready()
        timings["load_s"] = round(time.time() - t0, 3)
        t1 = time.time()
        bpb_ref = pool.submit(0, val_bpb, val, cfg.bpb_tokens, cfg.device_batch_size)  # 3.
        samples_ref = pool.submit(1, sample_completions, list(SAMPLE_PROMPTS), cfg.sample_tokens)
        results = pool.map(score_requests, requests)  # 4.
        timings["core_s"] = round(time.time() - t1, 3)
        bpb, samples = pool.get([bpb_ref, samples_ref], "computing bpb and samples")
        timings["total_s"] = round(time.time() - t0, 3)
    core = core_results([t.meta for t in selection.tasks], aggregate(results))
    return {
        "stage": stage, "run": storage.run, "model": model_uri, "input_metrics": meta.get("metrics"),
        "val_bpb": bpb["bpb"], "val_tokens": bpb["tokens"], "val_shards": val, "samples": samples,
        "core": {"label": selection.label, "source": selection.source, "note": selection.note,
                 "max_per_task": cfg.max_per_task, **core},
        "pool": {"spec": vars(spec), "actors": actors}, "timings": timings,
        "config": cfg.model_dump(), "git_commit": git_commit(), "finished_at": time.time(),
    }


def print_summary(doc: dict[str, Any]) -> None:
    core = doc["core"]
    print(f"[evaluate] {doc['stage']}: val bpb {doc['val_bpb']:.4f} over {doc['val_tokens']} tokens")
    for s in doc["samples"]:
        print(f"[evaluate] sample: {s['prompt']!r} -> {s['completion']!r}")
    for label, t in core["tasks"].items():
        print(f"[evaluate] {label:20s} acc {t['accuracy']:.4f}  centred {t['centered']:+.4f}  "
              f"({t['num_items']} items, {t['actor_seconds']:.1f} actor-s)")
    print(f"[evaluate] {core['label']}: {core['metric']:.4f}  [{core['note']}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = stage_argparser("evaluate", __doc__.splitlines()[0])
    p.add_argument("--stage", required=True, choices=EVALUATED_STAGES, help="which stage's model to evaluate")
    args = p.parse_args(argv)
    try:
        cfg = load_stage_config(EvaluateConfig, "evaluate", args.preset, args.overrides)
        storage = RunStorage(args.run, args.storage)
        out_dir = storage.stage_path("evaluate")
        out = f"{out_dir}/{args.stage}.json"
        if storage.exists(out) and not args.force:
            print(f"[evaluate] {storage.stage_uri('evaluate')}/{args.stage}.json is complete; skipped (--force reruns)")
            return 0
        storage.check_writable()
        stage_inputs(storage, args.stage, cfg)  # a missing checkpoint fails here, before anything is loaded
        validation_shards(cfg)
        selection = select_core_tasks(cfg.core_source, cfg.core_tasks, eval_dir=cfg.eval_dir,
                                      bundle_dir=cfg.bundle_dir, timeout_s=cfg.bundle_timeout_s)
        print(f"[evaluate] {selection.label}: {selection.note}", flush=True)
        doc = evaluate(storage, args.stage, cfg, selection)
        storage.fs.create_dir(out_dir, recursive=True)
        write_text_atomic(storage.fs, out, json.dumps(doc, indent=2, default=str))  # last: the completion marker
    except (ConfigError, StorageError, EvalPoolError, SourceUnavailableError, DownloadError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
