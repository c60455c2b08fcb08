"""Training on Ray Train, for any training stage: the TorchTrainer builder, the per-worker function,
and the driver.

    meta = train_and_export(spec, storage, prepared, config)

The machinery is shared by the three training stages; what differs is a `Prepared`: the stage
name (its directory, the Ray Train run name), the batch source (cluster/pretrain.py's `ShardSource`:
Ray Data over the parquet shards; cluster/chat_train.py's `ChatSource`: rendered conversations for
midtrain and SFT) and the initial weights (fresh from the seed, or an exported model). Each stage's
module builds its `Prepared` (cluster/pretrain.py's `preflight`, cluster/chat_train.py's
`preflight_chat`) and calls `train_and_export`.

The driver checks everything it can before any worker starts (model shape, batch arithmetic,
tokenizer, shards, storage, an existing checkpoint's model), then runs a TorchTrainer:
- ScalingConfig from the spec (workers, CPUs per worker, a GPU each when use_gpu);
- RunConfig(storage_path={storage}/{run}, name=<stage>): Ray Train's checkpoints and its run
  snapshot live in {run}/<stage>/, so relaunching the same run resumes from the last one;
- FailureConfig(max_failures): after a worker or node failure the group restarts from the last
  checkpoint; CheckpointConfig(num_to_keep) is the retention.
Each worker (train_worker): build the model from one seed (or load the initial model), restore
the latest checkpoint (weights, its optimizer shard re-sharded from any saved world size, data
position), take its batches from the source, run nanochat.train.train_loop, and every
checkpoint_every steps write its files and call ray.train.report. Rank 0 appends metrics.jsonl
(each record carries `start_step`, the step this attempt resumed from, so restarts are visible),
sets the Ray metrics (cluster/metrics.py) and prints a progress line with an ETA.
At the end the driver exports {run}/<stage>/model/ (weights, config.json, tokenizer/) for
`nanochat.checkpoint.load_model` and writes meta.json last.

A multi-node cluster needs shared storage (s3://, gs://, or a local path on NFS declared with
storage_is_shared): a plain local path is refused there, since each node would see its own disk.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from cluster import artifacts
from cluster.artifacts import load_tokenizer, localize
from cluster.metrics import training_metrics
from cluster.shared_storage import verify_shared_storage
from cluster.specs import Schedule, TrainSpec
from cluster.storage import RunStorage, StorageError, write_text_atomic
from nanochat import checkpoint as ckpt
from nanochat.common import DistInfo, agreed_precision, peak_bf16_flops, set_seed, training_dtype
from nanochat.data.positions import DataPosition, leftovers, resume_positions, start_positions
from nanochat.errors import ConfigError
from nanochat.gpt import GPT, GPTConfig
from nanochat.schedule import grad_accum_steps, num_steps_from
from nanochat.tokenizer import HF_TOKENIZER_FILE, MERGES_FILE
from nanochat.train import Batch, LoopConfig, evaluate_bpb, train_loop


@dataclass(frozen=True)
class Plan:
    """What a spec means for a given vocabulary and world size."""

    model: GPTConfig
    loop: LoopConfig
    world_size: int
    num_params: int
    flops_per_token: int


def make_plan(spec: TrainSpec, vocab_size: int, world_size: int) -> Plan:
    """Model dims from depth, grad accumulation from the total batch, horizon from the rules;
    raises ValueError naming the setting when they do not fit."""
    model = GPTConfig.from_depth(spec.depth, vocab_size, spec.sequence_len, head_dim=spec.head_dim)
    model = replace(model, norm_eps=spec.norm_eps)
    with torch.device("meta"):
        shape = GPT(model)
    num_params, flops = shape.num_params(), shape.estimate_flops()
    accum = grad_accum_steps(spec.total_batch_tokens, spec.device_batch_size, spec.sequence_len, world_size)
    steps = num_steps_from(total_batch_tokens=spec.total_batch_tokens, num_params=num_params,
                           flops_per_token=flops, num_iterations=spec.num_iterations,
                           flops_budget=spec.flops_budget,
                           target_param_data_ratio=spec.target_param_data_ratio)
    return Plan(model, loop_config(spec.schedule, steps, accum), world_size, num_params, flops)


def plan_every_size(spec: TrainSpec, vocab_size: int) -> Plan:
    """The plan at num_workers, after checking that every size of an elastic range (min_workers ..
    num_workers) keeps the same global batch (the gradient accumulation makes up the difference);
    ConfigError naming the size at which it does not."""
    g = spec.group
    for size in range(g.min_workers or g.num_workers, g.num_workers):
        try:
            make_plan(spec, vocab_size, size)
        except ValueError as e:
            raise ConfigError(f"the elastic range of {g.min_workers} to {g.num_workers} workers cannot keep "
                              f"the global batch at {size} workers: {e}") from None
    return make_plan(spec, vocab_size, g.num_workers)


def loop_config(schedule: Schedule, num_steps: int, grad_accum_steps: int) -> LoopConfig:
    """The core's LoopConfig for a run of `num_steps` optimizer steps."""
    s = schedule
    return LoopConfig(num_steps=num_steps, grad_accum_steps=grad_accum_steps, warmup_ratio=s.warmup_ratio,
                      warmdown_ratio=s.warmdown_ratio, final_lr_frac=s.final_lr_frac, grad_clip=s.grad_clip,
                      eval_every=s.eval_every, checkpoint_every=s.checkpoint_every, log_every=s.log_every,
                      compile=s.compile, precision=s.precision)


def build_model(config: GPTConfig, device: str | torch.device, seed: int) -> GPT:
    """The initial model: identical on every rank for the same seed (no broadcast needed)."""
    set_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


# ----------------------------------------------------------------------------- batch sources


class Batcher(Protocol):
    """A rank's training micro-batches; `position` is what a checkpoint saves to resume exactly."""

    position: DataPosition

    def __next__(self) -> Batch: ...

    def prime(self) -> None: ...  # start any background pipeline before the first step's clock

    def close(self) -> None: ...


class BatchSource(Protocol):
    """Where a stage's batches come from; picklable (it travels to every worker in the config)."""

    def train_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer_uri: str, tokenizer: Any,
                      start: DataPosition) -> Batcher: ...

    def val_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer: Any, plan: Plan) -> list[Batch] | None:
        """This rank's validation micro-batches (None: the stage has no validation set)."""


# ----------------------------------------------------------------------------- the worker


def _say(line: str) -> None:
    """One line to the worker's stdout. Not print(): Ray Train patches print in its workers to
    both log and echo it, which shows every progress line twice in the job's log."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Reporter:
    """on_metrics / on_checkpoint of one worker: metrics.jsonl, Ray metrics, progress, checkpoints."""

    def __init__(self, cfg: dict[str, Any], spec: TrainSpec, plan: Plan, dist: DistInfo, model: GPT,
                 optimizers: list, batches: Batcher, start_step: int, train_time: float) -> None:
        self.spec, self.plan, self.dist, self.model, self.optimizers = spec, plan, dist, model, optimizers
        self.batches, self.start_step, self.train_time = batches, start_step, train_time
        self.last: dict[str, Any] = {}
        self.ema_step_s: float | None = None
        self.log = self.gauges = None
        self.saved_step: int | None = None  # the step of the last checkpoint this attempt saved
        self.loop_started_at: float | None = time.time()  # constructed just before the loop starts
        if dist.is_main:
            self.log = RunStorage(cfg["run"], cfg["storage"]).metrics(cfg["stage"])
            self.gauges = training_metrics(cfg["run"], cfg["stage"])

    def on_metrics(self, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        dt = metrics.get("step_time_s")
        if dt is not None:
            self.train_time += dt * self.spec.schedule.log_every
            self.ema_step_s = dt if self.ema_step_s is None else 0.9 * self.ema_step_s + 0.1 * dt
        record = {**metrics, "tokens": step * self.spec.total_batch_tokens, "train_time_s": self.train_time,
                  "world_size": self.dist.world_size, "start_step": self.start_step, "time": time.time()}
        if self.loop_started_at is not None:
            # the first record of this attempt: where the timeline's work starts
            record["loop_started_at"], self.loop_started_at = self.loop_started_at, None
        self.last = {k: v for k, v in {**self.last, **record}.items()
                     if isinstance(v, (int, float, type(None)))}
        if not self.dist.is_main:
            return
        self.log.append(record)
        trained = self.spec.total_batch_tokens * self.spec.schedule.log_every if dt else 0
        self.gauges.record(record, count=trained)
        _say(self._progress(record))

    def _progress(self, m: dict[str, Any]) -> str:
        total = self.plan.loop.num_steps
        parts = [f"step {m['step']:>6}/{total} ({100 * m['step'] / total:5.1f}%)"]
        if m.get("loss") is not None:
            parts += [f"loss {m['loss']:.4f}", f"lrm {m['lr_multiplier']:.2f}",
                      f"{m['tokens_per_sec']:,.0f} tok/s", f"data-wait {100 * m['data_wait_frac']:.1f}%"]
        if m.get("mfu_percent") is not None:
            parts.append(f"mfu {m['mfu_percent']:.1f}%")
        if m.get("val_bpb") is not None:
            parts.append(f"val bpb {m['val_bpb']:.4f}")
        if self.ema_step_s is not None:
            eta = int(self.ema_step_s * (total - m["step"]))
            parts.append(f"eta {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s")
        return " | ".join(parts)

    def on_checkpoint(self, step: int, *, sync: bool = False) -> None:
        """Save this rank's part of the checkpoint of `step` and report it. Regular checkpoints upload in
        the background when the spec says so (the directory then outlives this call: Ray Train deletes
        it once uploaded); the last one, and one asked for with `sync`, are in storage when this returns."""
        background = self.spec.group.async_checkpoints and not sync and step < self.plan.loop.num_steps
        if self.saved_step == step:
            # already saved: a preemption notice right at a regular checkpoint's step does not save it again
            # (if that one uploads in the background and the node goes first, the restart takes the one
            # before)
            return
        self.saved_step = step
        tmp = tempfile.mkdtemp(prefix="nanochat-ckpt-")
        try:
            ckpt.save_training_checkpoint(tmp, self.model, self.optimizers, self.dist, step=step,
                                          data=self.batches.position.as_dict(),
                                          loop={"train_time_s": self.train_time})
            metrics = {**self.last, "step": step}
            mode = CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=artifacts.checkpoint_name(step), checkpoint_upload_mode=mode,
                             delete_local_checkpoint_after_upload=background)
        finally:
            if not background:
                shutil.rmtree(tmp, ignore_errors=True)


class _Preemption:
    """`after_step` of the loop: polls `ray.train.get_preemption_info()` every `every` steps (a barrier:
    every rank calls it equally often). On the first notice every rank saves the checkpoint of this
    step at once, synchronously, so it is in storage before the node goes; rank 0 logs the notice
    (deadline, seconds the save took). Then the ranks hold, polling, until Ray Train tears the group
    down at the deadline (it restarts from that checkpoint on what remains, counting a preemption,
    not a failure), or the notice is withdrawn and training goes on."""

    def __init__(self, every: int, reporter: _Reporter, dist: DistInfo) -> None:
        self.every, self.reporter, self.dist = every, reporter, dist

    def __call__(self, step: int) -> None:
        if self.every <= 0 or step % self.every:
            return
        info = ray.train.get_preemption_info()
        if info is None:
            return
        t0 = time.time()
        self.reporter.on_checkpoint(step, sync=True)
        if self.dist.is_main:
            left = None if info.deadline_ms is None else info.deadline_ms / 1000 - time.time()
            took = time.time() - t0
            self.reporter.log.append({"step": step, "preemption_notice": True,
                                      "deadline_ms": info.deadline_ms,
                                      "preempted_ranks": info.preempted_ranks, "checkpoint_s": took,
                                      "deadline_left_s": left, "start_step": self.reporter.start_step,
                                      "world_size": self.dist.world_size, "time": time.time()})
            before = "" if left is None else f", {left:.1f} s before the deadline"
            _say(f"preemption notice at step {step} for ranks {info.preempted_ranks}: checkpoint saved in "
                 f"{took:.1f} s{before}")
        while ray.train.get_preemption_info() is not None:
            time.sleep(0.5)


def _restore(model: GPT, optimizers: list, dist: DistInfo,
             num_steps: int) -> tuple[int, list[DataPosition], dict]:
    """(start step, data positions of all ranks, loop state) from Ray Train's latest checkpoint."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return 0, start_positions(dist.world_size), {}
    with latest.as_directory() as d:
        state = ckpt.load_training_checkpoint(d, model, optimizers, dist)
    if state.step > num_steps:
        raise ckpt.CheckpointError(f"the checkpoint is at step {state.step}, past this run's horizon "
                                   f"{num_steps}")
    saved = [DataPosition.from_dict(p) for p in state.data]
    positions = resume_positions(saved, dist.world_size)
    if dist.is_main:
        left, frontier = leftovers(saved) if state.world_size != dist.world_size else ([], None)
        how = f"; {len(left)} leftover items below item {frontier} re-dealt" if left else ""
        _say(f"resuming from step {state.step} (saved by {state.world_size} ranks; data position exact{how})")
    return state.step, positions, state.loop


def _load_initial_weights(model: GPT, init_from: str, device: torch.device) -> None:
    """The weights of an exported model (local path or URI), identical on every rank."""
    model.load_state_dict(ckpt.load_weights(localize(init_from), device))


def train_worker(cfg: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer (Ray Train set up the process group)."""
    spec: TrainSpec = cfg["spec"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if spec.group.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(spec.group.cpus_per_worker)))
    dist = DistInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), str(device))
    tokenizer = load_tokenizer(cfg["tokenizer"])
    plan = make_plan(spec, tokenizer.vocab_size, dist.world_size)
    precision = agreed_precision(plan.loop.precision, device, dist.world_size)  # a collective for "auto"
    if dist.is_main and plan.loop.precision == "auto":
        _say(f"precision auto: {precision} (bf16 only where every rank's device multiplies it natively)")
    loop = replace(plan.loop, peak_flops=peak_bf16_flops(device), precision=precision)
    model = build_model(plan.model, device, spec.seed)
    if cfg["init_from"]:
        _load_initial_weights(model, cfg["init_from"], device)  # a checkpoint of this stage overrides them
    optimizers = model.setup_optimizers(spec.lrs, dist, ns_dtype=training_dtype(loop.precision, device))
    start_step, positions, loop_state = _restore(model, optimizers, dist, loop.num_steps)
    source: BatchSource = cfg["source"]
    batches = source.train_batches(spec, dist, cfg["tokenizer"], tokenizer, positions[dist.rank])
    val = source.val_batches(spec, dist, tokenizer, plan)
    token_bytes = tokenizer.token_bytes()

    def evaluate(step: int) -> dict[str, float]:
        if val is None:
            return {}
        return {"val_bpb": evaluate_bpb(model, iter(val), token_bytes, dist)}

    batches.prime()  # start the data pipeline before the clock of step 1 runs
    reporter = _Reporter(cfg, spec, plan, dist, model, optimizers, batches, start_step,
                         loop_state.get("train_time_s", 0.0))
    try:
        train_loop(model, optimizers, batches, loop, dist, start_step=start_step, evaluate=evaluate,
                   on_metrics=reporter.on_metrics, on_checkpoint=reporter.on_checkpoint,
                   after_step=_Preemption(spec.group.preemption_poll_every, reporter, dist))
    finally:
        batches.close()
        if reporter.log is not None:  # an object store's metrics.jsonl is written whole, at flushes
            reporter.log.flush()


# ----------------------------------------------------------------------------- the driver


@dataclass
class Prepared:
    """What the driver resolved before starting any worker."""

    tokenizer: str  # tokenizer directory URI
    source: BatchSource
    plan: Plan
    stage: str  # the run directory and Ray Train run name: pretrain, midtrain or sft
    init_from: str | None = None  # exported model whose weights start the stage (None: fresh from the seed)
    resume_step: int | None = None  # step of the latest complete checkpoint of this run, if any
    notes: list[str] = field(default_factory=list)  # printed when training starts
    tasks: dict[str, int] | None = None  # the training conversations per task (chat stages), for the report


def check_storage_for_cluster(storage_uri: str, num_nodes: int, shared: bool) -> None:
    """Refuse a node-local storage path on a multi-node cluster (checkpoints must be shared)."""
    remote = storage_uri.startswith(("s3://", "gs://", "gcs://"))
    if num_nodes > 1 and not remote and not shared:
        raise StorageError(
            f"the Ray cluster has {num_nodes} nodes but the run storage {storage_uri} is a local path: "
            "workers on other nodes would write checkpoints to their own disks and a restarted worker "
            "could not find them. Use --storage s3://... or gs://..., or, if this path is a shared "
            "filesystem (NFS) mounted on every node, set storage_is_shared=true"
        )


def check_resume(prepared: Prepared, storage: RunStorage, spec: TrainSpec) -> Prepared:
    """The stage's latest checkpoint must fit the model and the horizon (it sets resume_step); a
    node-local storage path is refused on a multi-node cluster. Needs a connected Ray."""
    plan = prepared.plan
    found = artifacts.latest_checkpoint(storage, prepared.stage)
    if found is not None:
        step, state = found.step, found.state
        ckpt.check_model_config(state["model_config"], plan.model,
                                f"of run {storage.run!r} ({prepared.stage}) at step {step}")
        if step > plan.loop.num_steps:
            raise ckpt.CheckpointError(
                f"run {storage.run!r} has a {prepared.stage} checkpoint at step {step}, past the horizon of "
                f"{plan.loop.num_steps} steps: raise num_iterations or start another run")
        prepared.resume_step = step
    alive = [n for n in ray.nodes() if n.get("Alive")]
    check_storage_for_cluster(storage.uri or "", len(alive), spec.group.storage_is_shared)
    if not storage.remote:  # declared shared: check that every node really sees the run directory
        verify_shared_storage(storage.root, alive)
    return prepared


def _metrics_env(interval_s: float) -> dict[str, Any] | None:
    """Runtime env of the workers: only to change Ray's metrics push interval from its default
    (a worker with its own runtime env cannot reuse the cluster's pre-started worker processes)."""
    if interval_s == 10.0:
        return None
    return {"env_vars": {"RAY_metrics_report_interval_ms": str(max(1000, int(interval_s * 1000)))}}


def build_trainer(spec: TrainSpec, storage: RunStorage, prepared: Prepared) -> TorchTrainer:
    """The TorchTrainer of a run: scaling, storage, failure and checkpoint config from the spec."""
    g = spec.group
    resources = {"CPU": g.cpus_per_worker, **({"GPU": 1} if g.use_gpu else {})}
    workers = g.num_workers if g.min_workers is None else (g.min_workers, g.num_workers)
    run_root = storage.stage_uri(prepared.stage).rsplit("/", 1)[0]
    config = {"spec": spec, "tokenizer": prepared.tokenizer, "source": prepared.source,
              "init_from": prepared.init_from, "stage": prepared.stage, "run": storage.run,
              "storage": storage.uri}
    return TorchTrainer(
        train_worker,  # (1) the per-worker function
        train_loop_config=config,
        # (2) the workers: a count, or an elastic range
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=g.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=g.resize_check_s),
        run_config=RunConfig(  # (3) storage, retries, retention
            name=prepared.stage, storage_path=run_root,
            failure_config=FailureConfig(max_failures=g.max_failures,
                                         max_preemption_failures=g.max_preemptions),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.group.checkpoints_to_keep),
            worker_runtime_env=_metrics_env(spec.group.metrics_interval_s),
        ),
    )


def export_model(checkpoint: Checkpoint, storage: RunStorage, tokenizer: str, meta: dict[str, Any],
                 stage: str) -> str:
    """Copy the final weights and the tokenizer to {run}/<stage>/model/, config.json last."""
    src_fs, src = checkpoint.filesystem, checkpoint.path
    dest = f"{storage.stage_path(stage)}/model"
    storage.fs.create_dir(dest, recursive=True)
    pafs.copy_files(f"{src}/{ckpt.MODEL_FILE}", f"{dest}/{ckpt.MODEL_FILE}",
                    source_filesystem=src_fs, destination_filesystem=storage.fs)
    tok_fs, tok_path = (pafs.FileSystem.from_uri(tokenizer) if "://" in tokenizer
                        else (pafs.LocalFileSystem(), tokenizer))
    storage.fs.create_dir(f"{dest}/{ckpt.TOKENIZER_DIR}", recursive=True)
    if tok_fs.get_file_info(f"{tok_path}/{MERGES_FILE}").type == pafs.FileType.File:
        pafs.copy_files(tok_path, f"{dest}/{ckpt.TOKENIZER_DIR}", source_filesystem=tok_fs,
                        destination_filesystem=storage.fs)
    else:  # the stage started from a transformers directory: its tokenizer.json, not its weights
        pafs.copy_files(f"{tok_path}/{HF_TOKENIZER_FILE}", f"{dest}/{ckpt.TOKENIZER_DIR}/{HF_TOKENIZER_FILE}",
                        source_filesystem=tok_fs, destination_filesystem=storage.fs)
    with src_fs.open_input_stream(f"{src}/{ckpt.STATE_FILE}") as f:
        state = json.loads(f.read().decode())
    write_text_atomic(storage.fs, f"{dest}/{ckpt.CONFIG_FILE}",
                      ckpt.model_config_json(state["model_config"], meta))
    return f"{storage.stage_uri(stage)}/model"


def add_loop_spans(writer: Any, rows: list[dict[str, Any]], fit_start: float, fit_end: float) -> None:
    """Split the "train" phase on the timeline with the worker's own records of this fit():
    start-up until the loop starts (Ray Train's controller and worker group, model, data pipeline),
    the compile inside the first step (its time beyond a median step), and writing from the last
    step's record to fit()'s return (the final checkpoint, the worker group's shutdown)."""
    rows = [r for r in rows if fit_start <= r.get("time", 0.0) <= fit_end]
    started = [r["loop_started_at"] for r in rows if r.get("loop_started_at")]
    if not rows or not started:
        return
    loop_start = max(started)  # the last attempt's loop, after any restart
    rows = [r for r in rows if r["time"] >= loop_start]
    writer.span("worker start", "start-up", fit_start, loop_start)
    timed = [r for r in rows if r.get("step_time_s")]
    if timed and timed[0].get("compiled") and len(timed) > 2:
        first = timed[0]
        extra = first["step_time_s"] - statistics.median(r["step_time_s"] for r in timed[1:])
        if extra > 0:
            begin = first["time"] - first["step_time_s"]
            writer.span("compile", "start-up", begin, begin + extra)
    writer.span("final checkpoint", "writing", rows[-1]["time"], fit_end)


def train_and_export(spec: TrainSpec, storage: RunStorage, prepared: Prepared,
                     config: dict[str, Any]) -> dict[str, Any]:
    """Run the TorchTrainer of a prepared stage to its last step, export {run}/<stage>/model/ and
    write meta.json last; a run that ends early raises (relaunching resumes it)."""
    plan, stage = prepared.plan, prepared.stage
    start = f"resuming from step {prepared.resume_step}" if prepared.resume_step else "starting"
    init = f" from {prepared.init_from}" if prepared.init_from else ""
    print(f"{stage} {storage.run}: {start}{init}; depth {spec.depth}, {plan.num_params:,} parameters, "
          f"{plan.loop.num_steps} steps of {spec.total_batch_tokens:,} tokens, "
          f"{spec.group.num_workers} workers "
          f"x {plan.loop.grad_accum_steps} micro-batches of {spec.device_batch_size}x{spec.sequence_len}",
          flush=True)
    for note in prepared.notes:
        print(f"{stage} {storage.run}: {note}", flush=True)
    writer = storage.writer(stage, config, in_place=True)
    with writer:
        fit_start = time.time()
        with writer.phase("train"):
            result = build_trainer(spec, storage, prepared).fit()
        add_loop_spans(writer, storage.read_metrics(stage), fit_start, time.time())
        final = dict(result.metrics or {})
        if result.checkpoint is None or final.get("step") != plan.loop.num_steps:
            raise RuntimeError(f"training ended at step {final.get('step')} of {plan.loop.num_steps} "
                               "without a final checkpoint; relaunch the same run to resume it")
        summary = {"final_step": final["step"], "val_bpb": final.get("val_bpb"), "loss": final.get("loss"),
                   "tokens": final["step"] * spec.total_batch_tokens,
                   "train_time_s": final.get("train_time_s"),
                   "num_params": plan.num_params, "tokens_per_param": final["step"] * spec.total_batch_tokens
                   / plan.num_params}
        with writer.phase("export", "writing"):
            model_uri = export_model(result.checkpoint, storage, prepared.tokenizer, summary, stage)
        writer.metrics.update(summary)
        writer.extra.update({"model": model_uri, "checkpoint": result.checkpoint.path,
                             "tokenizer": prepared.tokenizer, "world_size": spec.group.num_workers,
                             "num_steps": plan.loop.num_steps, "init_from": prepared.init_from,
                             **({"tasks": prepared.tasks} if prepared.tasks else {})})
        return writer.commit()

