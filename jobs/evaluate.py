"""Evaluate a trained stage: validation bits per byte, then CORE (base model) or the chat tasks (chat models).

    python -m jobs.evaluate --stage pretrain --preset micro --run r1
    python -m jobs.evaluate --stage sft --preset tiny --run demo
    RAY_AUTH_MODE=token ray job submit --working-dir . -- \\
        python -m jobs.evaluate --stage sft --preset tiny --run demo

Reads the exported model `{run}/<stage>/model/` with the tokenizer saved beside it (model/tokenizer/,
else `{run}/tokenizer/`) and the validation shard; writes `{run}/evaluate/<stage>.json` atomically,
last: the evaluation of a stage is complete when that file exists (a rerun skips it unless --force).
- pretrain: greedy samples of fixed prompts and CORE. CORE uses DCLM's eval bundle when it is on
  disk or can be downloaded, else the embedded pack's tasks (nanochat/evals/core_tasks.py), labelled
  "CORE-k (our config)";
- midtrain, sft, rl: the chat tasks of nanochat/evals/chat.py (ARC-Easy/Challenge and MMLU by a
  restricted argmax, GSM8K with the Python tool and HumanEval sampled and checked in the sandbox,
  pass@k) and ChatCORE, under `"chat": {"tasks": {...}, "chatcore": x}`;
- every stage: `chat.format_rate`, the share of fixed multiple-choice items that free greedy
  generation answers with exactly one valid letter and <|assistant_end|> (0 disables it).

On the cluster (numbered as the Ray calls happen):
  1. ray.init(): join the cluster this job was submitted to;
  2. EvalPool: evaluation actors sized to the cluster (a GPU each when there are GPUs), each loading
     the model once; for chat stages a SandboxPool too (GSM8K's tool, HumanEval's checks), its
     CPUs set aside before the evaluation actors are sized;
  3. one queue of all the work, the costliest jobs first, each to the next free actor: bpb on the
     validation shard (`eval_bpb`: its documents as one stream, in 2 parts per actor whose sums add
     up; not the training stages' `val_bpb`, which packs rows), the base samples, the CORE or chat
     items and the format items in chunks; results come back in item order and are summed;
  4. generated answers are checked in the driver and the sandbox pool.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from cluster.artifacts import find_model
from cluster.eval_pool import EvalPool, EvalPoolError, Jobs, load_from_storage, plan_pool
from cluster.sandbox_pool import SandboxPool, SandboxPoolError
from cluster.storage import RunStorage, git_commit, submitted_at, write_text_atomic
from jobs.config import StageConfig, load_stage_config, stage_argparser
from nanochat.data.dataset import get_source, list_shards, train_val_split
from nanochat.errors import entrypoint
from nanochat.evals import chat as chat_eval
from nanochat.evals.core import build_requests, core_results, score_requests
from nanochat.evals.core_tasks import CoreSelection, select_core_tasks
from nanochat.evals.harness import SAMPLE_PROMPTS, aggregate, combine_bpb, sample_completions, val_bpb
from nanochat.report import EVAL_BPB
from nanochat.tasks import Task, eval_tasks

EVALUATED_STAGES = ("pretrain", "midtrain", "sft", "rl")
CHAT_STAGES = ("midtrain", "sft", "rl")  # evaluated on the chat tasks instead of CORE


class EvaluateConfig(StageConfig):
    """The `evaluate:` section of a preset."""

    model_dir: str | None = Field(None, description="model directory or URI to evaluate; default "
                                                    "{run}/<stage>/model")
    data_dir: str | None = Field(None, description="shard directory or URI whose last shard is the "
                                                   "validation shard; default the embedded pack")
    eval_dir: str | None = Field(None,
                                 description="the pack's evaluation sets; default $NANOCHAT_HOME/data/eval")
    bpb_tokens: int = Field(1 << 20, ge=1, description="validation target tokens for bits per byte (at most)")
    device_batch_size: int = Field(8, ge=1, description="rows per forward pass for bits per byte")
    sample_tokens: int = Field(24, ge=1, description="greedy tokens generated per fixed sample prompt")
    core_source: Literal["auto", "bundle", "pack"] = Field(
        "auto", description="CORE tasks: DCLM's eval bundle, the pack's tasks (our config), or auto "
                            "(bundle when on disk or reachable, else pack)")
    core_tasks: list[str] | None = Field(None,
                                         description="CORE task labels to run; default all of the source's")
    max_per_task: int | None = Field(None, ge=1,
                                     description="items per CORE task (a seeded sample); default all")
    bundle_dir: str | None = Field(None, description="where the eval bundle is unpacked; default "
                                                     "$NANOCHAT_HOME/eval_bundle")
    bundle_timeout_s: float = Field(10.0, gt=0, description="seconds to wait for the bundle's server before "
                                                            "giving up (offline: fail fast)")
    chat_source: Literal["auto", "hub", "pack"] = Field(
        "auto", description="chat evaluation sets: the Hugging Face hub, the embedded pack "
                            "(GSM8K: its held-out half), or auto (hub when reachable)")
    chat_tasks: list[str] | None = Field(None, description="chat tasks to run (arc_easy, arc_challenge, "
                                                           "mmlu, gsm8k, humaneval); default all five "
                                                           "(ChatCORE)")
    chat_max_per_task: int | None = Field(None, ge=1, description="items per chat task (a seeded sample); "
                                                                  "default all")
    num_samples: int = Field(1, ge=1,
                             description="sampled answers per GSM8K/HumanEval item: pass@k with k = this")
    max_new_tokens: int = Field(256, ge=1, description="tokens generated at most per GSM8K/HumanEval answer")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of generative answers "
                                                      "(0 = greedy; needs > 0 when num_samples > 1)")
    top_k: int = Field(50, ge=0, description="sample from the top k tokens of generative answers (0 = all)")
    chat_seed: int = Field(0, description="seed of generative sampling (each item draws from its own stream)")
    format_items: int = Field(200, ge=0, description="fixed multiple-choice items for the format metric "
                                                     "(chat.format_rate); 0 skips it")
    sandbox_actors: int = Field(1, ge=1,
                                description="sandbox actors for GSM8K's Python tool and HumanEval checks")
    sandbox_cpus: float = Field(0.25, ge=0, description="Ray CPUs each sandbox actor reserves (set aside "
                                                        "before the evaluation actors are sized)")
    humaneval_timeout_s: float = Field(10.0, gt=0, description="wall-clock seconds per HumanEval check")
    num_actors: int = Field(2, ge=1, description="evaluation actors (with GPUs: at most one per GPU)")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs per actor; cut to fit the cluster, "
                                                         "fractions allowed; torch threads = whole CPUs "
                                                         "(>= 1)")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per actor; default 1 when the cluster "
                                                                 "has GPUs, else 0")


@dataclass
class Work:
    """Everything an evaluation runs, resolved in the driver before any actor starts."""

    core: CoreSelection | None  # pretrain only
    chat: dict[str, Task]  # chat stages only: {task name: Task}
    chat_requests: list[chat_eval.ChatRequest]
    format_requests: list[chat_eval.ChatRequest]
    sample: chat_eval.SampleSettings


def stage_inputs(storage: RunStorage, stage: str,
                 cfg: EvaluateConfig) -> tuple[str, str | None, dict[str, Any]]:
    """(model URI, tokenizer URI or None when it is exported beside the model, the stage's meta);
    errors name the stage to run first."""
    ref = find_model(storage, stage, cfg.model_dir)  # errors say which stage to run first
    # an explicit model_dir needs no stage
    meta = storage.read_meta(stage) if storage.is_complete(stage) else {}
    return ref.model, None if ref.tokenizer_beside else ref.tokenizer, meta


def validation_shards(cfg: EvaluateConfig) -> list[str]:
    """The validation shard: the last shard of the configured data (default the embedded pack)."""
    data = cfg.data_dir or str(get_source("embedded").directory)
    return train_val_split(list_shards(data))[1]


def plan_work(stage: str, cfg: EvaluateConfig) -> Work:
    """CORE tasks (pretrain) or chat requests (chat stages), and the format items; raises on bad names."""
    sample = chat_eval.SampleSettings(cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                      cfg.chat_seed)
    offline = {"auto": None, "hub": False, "pack": True}[cfg.chat_source]
    evals = eval_tasks(offline) if stage in CHAT_STAGES or cfg.format_items else {}
    chat = chat_eval.select_tasks(evals, cfg.chat_tasks) if stage in CHAT_STAGES else {}
    core = None
    if stage not in CHAT_STAGES:
        core = select_core_tasks(cfg.core_source, cfg.core_tasks, eval_dir=cfg.eval_dir,
                                 bundle_dir=cfg.bundle_dir, timeout_s=cfg.bundle_timeout_s)
    return Work(core, chat, chat_eval.chat_requests(chat, cfg.chat_max_per_task),
                chat_eval.format_requests(evals, cfg.format_items) if cfg.format_items else [], sample)


# Actor-seconds per unit of work, from the demo's `timings.actor_seconds` (tiny preset, one thread per
# actor, AMD EPYC, 2026-12-07 17:04 UTC: bpb 26 s for 131,072 tokens, CORE 52 s for 896 items, samples
# 0.14 s, chat multiple choice ~3.5 s for 144, generation ~14 s for 96, format 4-9 s for 200). Only the
# queue's order (costliest first) and its eta use them; a bigger model or a GPU scales them alike.
COST_PER_BPB_TOKEN = 0.2e-3
COST_PER_ITEM = {"CORE": 0.058, "multiple choice": 0.024, "generation": 0.15, "format": 0.03}
COST_SAMPLES = 0.15


@dataclass
class Planned:
    """The handles of one evaluation's jobs in its queue (cluster/eval_pool.py's Jobs)."""

    jobs: Jobs
    bpb: slice
    samples: slice | None = None
    core: slice | None = None
    categorical: list[chat_eval.ChatRequest] | None = None
    generative: list[chat_eval.ChatRequest] | None = None
    chat: tuple[slice, slice] | None = None
    format: slice | None = None


def plan_jobs(work: Work, cfg: EvaluateConfig, val: list[str], num_actors: int,
              tool: Any, core_requests: list[Any]) -> Planned:
    """Every unit of the evaluation's work as one queue: the bpb stream in 2 parts per actor, the
    samples, CORE in 8 chunks per actor, the chat items (generation in chunks of at most
    GENERATION_ROWS, which decode together), the format items."""
    jobs, parts = Jobs(), 2 * num_actors
    for k in range(parts):
        jobs.add("bpb", val_bpb, (val, cfg.bpb_tokens, cfg.device_batch_size, k, parts),
                 COST_PER_BPB_TOKEN * cfg.bpb_tokens / parts)
    plan = Planned(jobs, slice(0, parts))
    if work.core is not None:
        plan.samples = jobs.add("samples", sample_completions, (list(SAMPLE_PROMPTS), cfg.sample_tokens),
                                COST_SAMPLES)
        plan.core = jobs.add_chunks("CORE", score_requests, core_requests, 8 * num_actors,
                                    COST_PER_ITEM["CORE"])
    if work.chat:
        plan.categorical = [r for r in work.chat_requests if r.kind == "categorical"]
        plan.generative = [r for r in work.chat_requests if r.kind == "generative"]
        generation_chunks = max(2 * num_actors, -(-len(plan.generative) // chat_eval.GENERATION_ROWS))
        plan.chat = (
            jobs.add_chunks("multiple choice", chat_eval.score_choices, plan.categorical, 2 * num_actors,
                            COST_PER_ITEM["multiple choice"]),
            jobs.add_chunks("generation", chat_eval.SampleAnswers(work.sample, tool), plan.generative,
                            generation_chunks, COST_PER_ITEM["generation"]))
    if work.format_requests:
        plan.format = jobs.add_chunks("format", chat_eval.check_format, work.format_requests, 2 * num_actors,
                                      COST_PER_ITEM["format"])
    return plan


def chat_doc(plan: Planned, results: list[Any], sandbox: SandboxPool | None, work: Work,
             cfg: EvaluateConfig) -> dict[str, Any]:
    """The chat tasks' results: generated answers checked here and in the sandbox pool (HumanEval)."""
    assert plan.chat is not None and plan.categorical is not None and plan.generative is not None
    answers = Jobs.gather(results, plan.chat[0]) + Jobs.gather(results, plan.chat[1])
    ordered = plan.categorical + plan.generative

    def humaneval(problems: list[dict[str, str]]) -> list[bool]:
        return [c.passed for c in sandbox.check_humaneval(problems, timeout_s=cfg.humaneval_timeout_s)]

    checked = chat_eval.check_answers(ordered, answers, work.chat, humaneval if sandbox is not None else None)
    doc = chat_eval.chat_results(work.chat, aggregate(checked), answers, work.sample.num_samples)
    doc["examples"] = {name: [{"question": r.conversation["messages"][-2]["content"][:300],
                               "answers": list(a.texts)}
                              for r, a in zip(ordered, answers, strict=True) if r.task == name][:2]
                       for name in work.chat}
    return doc


def evaluate(storage: RunStorage, stage: str, cfg: EvaluateConfig, work: Work) -> dict[str, Any]:
    """Run bpb and CORE (pretrain) or the chat tasks, and the format metric, on an evaluation pool."""
    # checked again: cheap, and callable alone
    model_uri, tokenizer_uri, meta = stage_inputs(storage, stage, cfg)
    val = validation_shards(cfg)
    core_requests = ([r for task in work.core.tasks for r in build_requests(task, cfg.max_per_task)]
                     if work.core else [])
    import ray

    t0 = time.time()
    if not ray.is_initialized():
        ray.init()  # 1. the cluster this job runs on (or a local one by hand)
    resources = dict(ray.cluster_resources())
    need_sandbox = any(t.eval_type == "generative" for t in work.chat.values())
    if need_sandbox:  # the sandbox actors' CPUs first: evaluation actors take what is left
        resources["CPU"] = resources.get("CPU", 0.0) - cfg.sandbox_actors * cfg.sandbox_cpus
    spec = plan_pool(cfg.num_actors, cfg.cpus_per_actor, resources, cfg.gpus_per_actor)
    doc: dict[str, Any] = {}
    chat: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(EvalPool(functools.partial(load_from_storage, model_uri, tokenizer_uri),
                                            spec))  # 2.
        sandbox = (stack.enter_context(SandboxPool(cfg.sandbox_actors, cfg.sandbox_cpus))
                   if need_sandbox else None)
        actors = pool.ready()
        t1 = time.time()
        plan = plan_jobs(work, cfg, val, spec.num_actors, sandbox.tool() if sandbox is not None else None,
                         core_requests)
        results, actor_seconds = pool.run_jobs(plan.jobs.jobs)  # 3.
        bpb = combine_bpb(results[plan.bpb])
        if plan.core is not None and work.core is not None:
            core = core_results([t.meta for t in work.core.tasks], aggregate(Jobs.gather(results, plan.core)))
            doc["core"] = {"label": work.core.label, "source": work.core.source, "note": work.core.note,
                           "max_per_task": cfg.max_per_task, **core}
            doc["samples"] = results[plan.samples][0]
        if plan.chat is not None:
            chat = chat_doc(plan, results, sandbox, work, cfg)  # 4.
        if plan.format is not None:
            chat.update(chat_eval.format_summary(Jobs.gather(results, plan.format)))
        t_end = time.time()
        timings = {"load_s": round(t1 - t0, 3), "work_s": round(t_end - t1, 3),
                   "total_s": round(t_end - t0, 3), "actor_seconds": actor_seconds}
        if sandbox is not None:
            doc["sandbox"] = sandbox.ready()
    if chat:
        doc["chat"] = chat
    return {
        "stage": stage, "run": storage.run, "model": model_uri, "input_metrics": meta.get("metrics"),
        EVAL_BPB: bpb["bpb"], "eval_bpb_tokens": bpb["tokens"], "val_shards": val, **doc,
        "pool": {"spec": vars(spec), "actors": actors}, "timings": timings,
        "timeline": {"submitted_at": submitted_at(), "started_at": t0,
                     "spans": [{"name": "ray.init + pool + model load", "kind": "start-up", "start": t0,
                                "end": t1},
                               {"name": "evaluate", "kind": "work", "start": t1, "end": t_end}]},
        "config": cfg.model_dump(), "git_commit": git_commit(), "finished_at": time.time(),
    }


def print_summary(doc: dict[str, Any]) -> None:
    print(f"[evaluate] {doc['stage']}: evaluation bpb {doc[EVAL_BPB]:.4f} over "
          f"{doc['eval_bpb_tokens']} tokens (validation documents as one stream)")
    for s in doc.get("samples", []):
        print(f"[evaluate] sample: {s['prompt']!r} -> {s['completion']!r}")
    if "core" in doc:
        core = doc["core"]
        for label, t in core["tasks"].items():
            print(f"[evaluate] {label:20s} acc {t['accuracy']:.4f}  centred {t['centered']:+.4f}  "
                  f"({t['num_items']} items, {t['actor_seconds']:.1f} actor-s)")
        print(f"[evaluate] {core['label']}: {core['metric']:.4f}  [{core['note']}]")
    chat = doc.get("chat", {})
    for name, t in chat.get("tasks", {}).items():
        print(f"[evaluate] {name:20s} {t['metric']:9s} {t['accuracy']:.4f}  centred {t['centered']:+.4f}  "
              f"({t['num_items']} items, {t['prompts_truncated']} prompts cut, "
              f"{t['actor_seconds']:.1f} actor-s)")
    if "chatcore" in chat:
        print(f"[evaluate] {chat['label']}: {chat['chatcore']:.4f}")
    if "format_rate" in chat:
        f = chat["format"]
        print(f"[evaluate] format: {f['well_formed']}/{f['num_items']} free answers are one letter + "
              f"<|assistant_end|> ({chat['format_rate']:.3f}); e.g. {f['examples'][:3]}")
    sys.stdout.flush()


@entrypoint
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
            print(f"[evaluate] {storage.stage_uri('evaluate')}/{args.stage}.json is complete; "
                  "skipped (--force reruns)")
            return 0
        storage.check_writable()
        stage_inputs(storage, args.stage, cfg)  # a missing checkpoint fails here, before anything is loaded
        validation_shards(cfg)
        work = plan_work(args.stage, cfg)
        if work.core is not None:
            print(f"[evaluate] {work.core.label}: {work.core.note}", flush=True)
        for name, task in work.chat.items():
            print(f"[evaluate] chat task {name}: {task.describe()}", flush=True)
        doc = evaluate(storage, args.stage, cfg, work)
        storage.fs.create_dir(out_dir, recursive=True)
        # last: the completion marker
        write_text_atomic(storage.fs, out, json.dumps(doc, indent=2, default=str))
    except (EvalPoolError, SandboxPoolError) as e:  # the pool failed: say so without the actors' tracebacks
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
