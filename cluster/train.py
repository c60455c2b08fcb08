"""Training on Ray Train: the TorchTrainer builder, the per-worker function, and the driver.

    meta = run_pretrain(spec, storage, data="embedded", tokenizer=None, config={...})
    meta = train_and_export(spec, storage, prepared, config)   # any stage (cluster/chat_train.py)

The machinery is shared by the three training stages; what differs is a `Prepared`: the stage
name (its directory, the Ray Train run name), the batch source (`ShardSource`: Ray Data over the
parquet shards for pretraining; cluster/chat_train.py's `ChatSource`: rendered conversations for
midtrain and SFT) and the initial weights (fresh from the seed, or an exported model).

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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.eval_pool import localize
from cluster.metrics import PretrainMetrics
from cluster.pretrain_data import load_tokenizer, ray_row_chunks
from cluster.shared_storage import verify_shared_storage
from cluster.storage import RunStorage, StorageError, write_text_atomic
from nanochat import checkpoint as ckpt
from nanochat.common import DistInfo, peak_bf16_flops, set_seed
from nanochat.dataloader import (
    DataPosition,
    Item,
    RowBatcher,
    plan_row_groups,
    rank_batches,
    resume_positions,
    start_positions,
    validation_rows,
)
from nanochat.dataset import get_source, list_shards, train_val_split
from nanochat.gpt import GPT, GPTConfig
from nanochat.schedule import grad_accum_steps, num_steps_from
from nanochat.tokenizer import HF_TOKENIZER_FILE, MERGES_FILE
from nanochat.train import Batch, LoopConfig, evaluate_bpb, train_loop

STAGE = "pretrain"


@dataclass(frozen=True)
class TrainSpec:
    """Plain values of a pretraining run (jobs/pretrain.py's PretrainConfig documents each)."""

    depth: int = 20  # the one dial: width 64 * depth, heads of head_dim
    head_dim: int = 128
    norm_eps: float | None = None  # RMSNorm epsilon (None: the dtype's; set from an imported model)
    sequence_len: int = 2048  # tokens per row (a row holds sequence_len + 1 for the shifted targets)
    device_batch_size: int = 32  # rows per micro-batch per worker
    total_batch_tokens: int = 524_288  # tokens per optimizer step over all workers
    num_iterations: int = -1  # horizon: explicit steps (> 0) ...
    flops_budget: float = -1.0  # ... or a FLOPs budget (> 0) ...
    target_param_data_ratio: float = 20.0  # ... or tokens per parameter
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    seed: int = 42
    eval_every: int = 250  # steps between validation bpb evaluations
    eval_tokens: int = 20 * 524_288  # validation tokens per evaluation
    checkpoint_every: int = 1000  # steps between checkpoints (and at the end)
    log_every: int = 1
    compile: bool | None = None  # torch.compile; None: nanochat.train.compile_pays_back decides
    tokenizer_actors: int = 1  # Ray Data tokenizer actors per worker
    tokenizer_actor_cpus: float = 0.25
    prefetch_batches: int = 4
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 3
    checkpoints_to_keep: int = 2
    storage_is_shared: bool = False  # a local storage path is an NFS-like mount on every node
    metrics_interval_s: float = 10.0  # how often workers push metrics to the node's exporter (Ray: 10 s)


@dataclass(frozen=True)
class Plan:
    """What a spec means for a given vocabulary and world size."""

    model: GPTConfig
    loop: LoopConfig
    world_size: int
    num_params: int
    flops_per_token: int
    eval_rows: int  # validation rows per evaluation (over all ranks)


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
                           flops_budget=spec.flops_budget, target_param_data_ratio=spec.target_param_data_ratio)
    loop = LoopConfig(num_steps=steps, grad_accum_steps=accum, warmup_ratio=spec.warmup_ratio,
                      warmdown_ratio=spec.warmdown_ratio, final_lr_frac=spec.final_lr_frac,
                      grad_clip=spec.grad_clip, eval_every=spec.eval_every,
                      checkpoint_every=spec.checkpoint_every, log_every=spec.log_every, compile=spec.compile)
    return Plan(model, loop, world_size, num_params, flops, max(1, spec.eval_tokens // spec.sequence_len))


def build_model(config: GPTConfig, device: str | torch.device, seed: int) -> GPT:
    """The initial model: identical on every rank for the same seed (no broadcast needed)."""
    set_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def build_optimizers(model: GPT, spec: TrainSpec, dist: DistInfo) -> list:
    return model.setup_optimizers(unembedding_lr=spec.unembedding_lr, embedding_lr=spec.embedding_lr,
                                  matrix_lr=spec.matrix_lr, weight_decay=spec.weight_decay, dist=dist)


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


@dataclass(frozen=True)
class ShardSource:
    """Pretraining's batches: parquet row groups tokenized and packed by Ray Data actors
    (cluster/pretrain_data.py); validation rows from the validation shards."""

    items: list[Item]  # every training row group, in order
    val_shards: list[str]

    def train_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer_uri: str, tokenizer: Any,
                      start: DataPosition) -> RowBatcher:
        chunks = ray_row_chunks(
            [tuple(i) for i in self.items], tokenizer_uri, spec.sequence_len + 1, start, dist.world_size,
            batch_size=spec.device_batch_size, prefetch_batches=spec.prefetch_batches,
            actors=spec.tokenizer_actors, actor_cpus=spec.tokenizer_actor_cpus)
        return RowBatcher(chunks, spec.device_batch_size, start)

    def val_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer: Any, plan: Plan) -> list[Batch]:
        rows = validation_rows(self.val_shards, tokenizer, spec.sequence_len + 1, plan.eval_rows)
        return rank_batches(rows, spec.device_batch_size, dist.rank, dist.world_size)


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
        self.loop_started_at: float | None = time.time()  # constructed just before the loop starts
        if dist.is_main:
            self.log = RunStorage(cfg["run"], cfg["storage"]).metrics(cfg["stage"])
            self.gauges = PretrainMetrics(cfg["run"], cfg["stage"])

    def on_metrics(self, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        dt = metrics.get("step_time_s")
        if dt is not None:
            self.train_time += dt * self.spec.log_every
            self.ema_step_s = dt if self.ema_step_s is None else 0.9 * self.ema_step_s + 0.1 * dt
        record = {**metrics, "tokens": step * self.spec.total_batch_tokens, "train_time_s": self.train_time,
                  "world_size": self.dist.world_size, "start_step": self.start_step, "time": time.time()}
        if self.loop_started_at is not None:  # the first record of this attempt: where the timeline's work starts
            record["loop_started_at"], self.loop_started_at = self.loop_started_at, None
        self.last = {k: v for k, v in {**self.last, **record}.items() if isinstance(v, (int, float, type(None)))}
        if not self.dist.is_main:
            return
        self.log.append(record)
        self.gauges.record(record, tokens=self.spec.total_batch_tokens * self.spec.log_every if dt else 0)
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

    def on_checkpoint(self, step: int) -> None:
        with tempfile.TemporaryDirectory(prefix="nanochat-ckpt-") as tmp:
            ckpt.save_training_checkpoint(tmp, self.model, self.optimizers, self.dist, step=step,
                                          data=self.batches.position.as_dict(),
                                          loop={"train_time_s": self.train_time})
            metrics = {**self.last, "step": step}
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")


def _restore(model: GPT, optimizers: list, dist: DistInfo, num_steps: int) -> tuple[int, list[DataPosition], dict]:
    """(start step, data positions of all ranks, loop state) from Ray Train's latest checkpoint."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return 0, start_positions(dist.world_size), {}
    with latest.as_directory() as d:
        state = ckpt.load_training_checkpoint(d, model, optimizers, dist)
    if state.step > num_steps:
        raise ckpt.CheckpointError(f"the checkpoint is at step {state.step}, past this run's horizon {num_steps}")
    positions = resume_positions([DataPosition.from_dict(p) for p in state.data], dist.world_size)
    if dist.is_main:
        how = "exact" if state.world_size == dist.world_size else "approximate (another world size)"
        _say(f"resuming from step {state.step} (saved by {state.world_size} ranks; data position {how})")
    return state.step, positions, state.loop


def _load_initial_weights(model: GPT, init_from: str, device: torch.device) -> None:
    """The weights of an exported model (local path or URI), identical on every rank."""
    model.load_state_dict(ckpt.load_weights(localize(init_from), device))


def train_worker(cfg: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer (Ray Train set up the process group)."""
    spec = TrainSpec(**cfg["spec"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    dist = DistInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), str(device))
    tokenizer = load_tokenizer(cfg["tokenizer"])
    plan = make_plan(spec, tokenizer.vocab_size, dist.world_size)
    loop = replace(plan.loop, peak_flops=peak_bf16_flops(device))
    model = build_model(plan.model, device, spec.seed)
    if cfg["init_from"]:
        _load_initial_weights(model, cfg["init_from"], device)  # a checkpoint of this stage overrides them
    optimizers = build_optimizers(model, spec, dist)
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
                   on_metrics=reporter.on_metrics, on_checkpoint=reporter.on_checkpoint)
    finally:
        batches.close()


# ----------------------------------------------------------------------------- the driver


@dataclass
class Prepared:
    """What the driver resolved before starting any worker."""

    tokenizer: str  # tokenizer directory URI
    source: BatchSource
    plan: Plan
    stage: str = STAGE  # the run directory and Ray Train run name: pretrain, midtrain or sft
    init_from: str | None = None  # exported model whose weights start the stage (None: fresh from the seed)
    resume_step: int | None = None  # step of the latest complete checkpoint of this run, if any
    notes: list[str] = field(default_factory=list)  # printed when training starts
    tasks: dict[str, int] | None = None  # the training conversations per task (chat stages), for the report


def resolve_shards(data: str) -> tuple[list[str], list[str]]:
    """(train shards, val shards) from a source name (embedded, fineweb) or a dir / s3:// / gs:// prefix."""
    if "/" not in data and "://" not in data:
        data = str(get_source(data).directory)
    return train_val_split(list_shards(data))


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


def latest_checkpoint(storage: RunStorage, stage: str = STAGE) -> tuple[int, dict[str, Any]] | None:
    """(step, state.json) of the newest checkpoint under {run}/<stage> with a state.json."""
    fs, root = storage.fs, storage.stage_path(stage)
    if not storage.exists(root):
        return None
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)
    for d in dirs:
        if storage.exists(f"{d}/{ckpt.STATE_FILE}"):
            with fs.open_input_stream(f"{d}/{ckpt.STATE_FILE}") as f:
                state = json.loads(f.read().decode())
            return int(state["step"]), state
    return None


def preflight(spec: TrainSpec, storage: RunStorage, data: str, tokenizer: str | None) -> Prepared:
    """Every check that needs no worker: raises with a message that says what to change."""
    tok_uri = tokenizer or storage.stage_uri("tokenizer")
    if tokenizer is None:
        storage.read_meta("tokenizer")  # raises "run the tokenizer stage first" when missing
    vocab = load_tokenizer(tok_uri).vocab_size
    plan = make_plan(spec, vocab, spec.num_workers)
    train, val = resolve_shards(data)
    items = plan_row_groups(train)
    storage.check_writable()
    return check_resume(Prepared(tok_uri, ShardSource(items, val), plan), storage, spec)


def check_resume(prepared: Prepared, storage: RunStorage, spec: TrainSpec) -> Prepared:
    """The stage's latest checkpoint must fit the model and the horizon (it sets resume_step); a
    node-local storage path is refused on a multi-node cluster. Needs a connected Ray."""
    plan = prepared.plan
    found = latest_checkpoint(storage, prepared.stage)
    if found is not None:
        step, state = found
        ckpt.check_model_config(state["model_config"], plan.model,
                                f"of run {storage.run!r} ({prepared.stage}) at step {step}")
        if step > plan.loop.num_steps:
            raise ckpt.CheckpointError(
                f"run {storage.run!r} has a {prepared.stage} checkpoint at step {step}, past the horizon of "
                f"{plan.loop.num_steps} steps: raise num_iterations or start another run")
        prepared.resume_step = step
    alive = [n for n in ray.nodes() if n.get("Alive")]
    check_storage_for_cluster(storage.uri or "", len(alive), spec.storage_is_shared)
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
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
    run_root = storage.stage_uri(prepared.stage).rsplit("/", 1)[0]
    config = {"spec": asdict(spec), "tokenizer": prepared.tokenizer, "source": prepared.source,
              "init_from": prepared.init_from, "stage": prepared.stage, "run": storage.run, "storage": storage.uri}
    return TorchTrainer(
        train_worker,  # (1) the per-worker function
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,  # (2) workers
                                     resources_per_worker=resources),
        run_config=RunConfig(  # (3) storage, retries, retention
            name=prepared.stage, storage_path=run_root,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoints_to_keep),
            worker_runtime_env=_metrics_env(spec.metrics_interval_s),
        ),
    )


def export_model(checkpoint: Checkpoint, storage: RunStorage, tokenizer: str, meta: dict[str, Any],
                 stage: str = STAGE) -> str:
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
    write_text_atomic(storage.fs, f"{dest}/{ckpt.CONFIG_FILE}", ckpt.model_config_json(state["model_config"], meta))
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


def clear_stage(storage: RunStorage, stage: str) -> None:
    """Delete everything of a stage (its checkpoints included): `--force` starts it over."""
    if storage.exists(storage.stage_path(stage)):
        if storage.remote:
            storage.fs.delete_dir(storage.stage_path(stage))
        else:
            shutil.rmtree(storage.stage_path(stage))


def run_pretrain(spec: TrainSpec, storage: RunStorage, *, data: str, tokenizer: str | None,
                 config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Check, train (resuming the run's last checkpoint unless `force`), export, write meta.json."""
    if force:
        clear_stage(storage, STAGE)
    return train_and_export(spec, storage, preflight(spec, storage, data, tokenizer), config)


def train_and_export(spec: TrainSpec, storage: RunStorage, prepared: Prepared,
                     config: dict[str, Any]) -> dict[str, Any]:
    """Run the TorchTrainer of a prepared stage to its last step, export {run}/<stage>/model/ and
    write meta.json last; a run that ends early raises (relaunching resumes it)."""
    plan, stage = prepared.plan, prepared.stage
    start = f"resuming from step {prepared.resume_step}" if prepared.resume_step else "starting"
    init = f" from {prepared.init_from}" if prepared.init_from else ""
    print(f"{stage} {storage.run}: {start}{init}; depth {spec.depth}, {plan.num_params:,} parameters, "
          f"{plan.loop.num_steps} steps of {spec.total_batch_tokens:,} tokens, {spec.num_workers} workers "
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
                   "tokens": final["step"] * spec.total_batch_tokens, "train_time_s": final.get("train_time_s"),
                   "num_params": plan.num_params, "tokens_per_param": final["step"] * spec.total_batch_tokens
                   / plan.num_params}
        with writer.phase("export", "writing"):
            model_uri = export_model(result.checkpoint, storage, prepared.tokenizer, summary, stage)
        writer.metrics.update(summary)
        writer.extra.update({"model": model_uri, "checkpoint": result.checkpoint.path,
                             "tokenizer": prepared.tokenizer, "world_size": spec.num_workers,
                             "num_steps": plan.loop.num_steps, "init_from": prepared.init_from,
                             **({"tasks": prepared.tasks} if prepared.tasks else {})})
        return writer.commit()

