"""Pretraining on the cluster (cluster/pretrain.py, cluster/train.py, cluster/pretrain_data.py, jobs/pretrain.py):
2 workers vs the single-process loop, worker failures, relaunch, resume at another world size,
a node removed from a 2-node cluster, metrics on the Prometheus endpoint, and bad input.

Run: PYTHONPATH=. python -m pytest tests/test_pretrain_cluster.py -q       (cluster tests start
the session's local Ray cluster; the 2-node test runs this file as a child process:
`python -m tests.test_pretrain_cluster two-nodes DIR`, with its own `ray.cluster_utils.Cluster`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from cluster.pretrain import preflight, resolve_shards, run_pretrain
from cluster.specs import PretrainSpec
from cluster.storage import RunStorage, StorageError
from cluster.train import build_model, check_storage_for_cluster, make_plan
from jobs.config import ConfigError, load_stage_config
from jobs.pretrain import PretrainConfig
from nanochat import checkpoint as ckpt
from nanochat.common import DistInfo
from nanochat.data.dataloader import (
    DataPosition,
    RowBatcher,
    local_row_chunks,
    plan_row_groups,
    rank_batches,
    validation_rows,
)
from nanochat.tokenizer import Tokenizer
from nanochat.train import evaluate_bpb, train_loop

REPO_ROOT = Path(__file__).resolve().parent.parent


def micro_spec(*overrides: str) -> PretrainSpec:
    """The micro preset's pretraining spec, built as a user's run builds it: preset + `key=value` overrides."""
    return load_stage_config(PretrainConfig, "pretrain", "micro", list(overrides)).to_spec("micro")


def new_run(storage_dir: Path, run: str, tokenizer_dir: str) -> RunStorage:
    """A run whose tokenizer stage is complete (a copy of `tokenizer_dir`)."""
    storage = RunStorage(run, str(storage_dir))
    with storage.writer("tokenizer", {"copied_from": tokenizer_dir}) as w:
        Tokenizer.load(tokenizer_dir).save(w.path)
        w.commit()
    return storage


def attempts(storage: RunStorage) -> list[list[dict]]:
    """metrics.jsonl split into attempts: a new one starts where `start_step` changes or the step
    goes back (a worker group restarted from a checkpoint, or the run was relaunched)."""
    out: list[list[dict]] = []
    for rec in storage.read_metrics("pretrain"):
        if not out or rec["start_step"] != out[-1][-1]["start_step"] or rec["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(rec)
    return out


def reference_losses(pretrain: PretrainSpec, tokenizer_dir: str, data: str,
                     world: int) -> tuple[dict[int, dict], float]:
    """The single-process core loop fed the same global batches as `world` workers would get
    (micro-batches of rank 0, then rank 1, ...): per-step metrics and final validation bpb."""
    spec = pretrain.train
    tok = Tokenizer.load(tokenizer_dir)
    train, val = resolve_shards(data)
    plan = make_plan(spec, tok.vocab_size, 1)
    model = build_model(plan.model, "cpu", spec.seed)
    optimizers = model.setup_optimizers(spec.lrs, DistInfo())
    row_len = spec.sequence_len + 1
    items = plan_row_groups(train)
    ranks = [RowBatcher(local_row_chunks(items, tok, row_len, DataPosition(r), world), spec.device_batch_size,
                        DataPosition(r)) for r in range(world)]
    per_rank = plan.loop.grad_accum_steps // world

    def interleaved():
        while True:
            for stream in ranks:
                for _ in range(per_rank):
                    yield next(stream)

    val_rows = validation_rows(val, tok, row_len, max(1, pretrain.reading.eval_tokens // spec.sequence_len))
    token_bytes = tok.token_bytes()
    losses: dict[int, dict] = {}
    final = train_loop(
        model, optimizers, interleaved(), plan.loop, DistInfo(),
        evaluate=lambda s: {"val_bpb": evaluate_bpb(model, iter(rank_batches(val_rows, 4, 0, 1)), token_bytes,
                                                    DistInfo())},
        on_metrics=lambda m: losses.__setitem__(m["step"], m))
    return losses, final["val_bpb"]


class PrometheusWatch(threading.Thread):
    """Polls the node's metrics endpoint for a metric line of one run while training runs."""

    def __init__(self, port: int, metric: str, run: str) -> None:
        super().__init__(daemon=True)
        self.url, self.metric, self.run_id = f"http://127.0.0.1:{port}/metrics", metric, run
        self.seen: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.seen:
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                text = ""
            self.seen = [ln for ln in text.splitlines() if ln.startswith(self.metric) and f'run="{self.run_id}"' in ln]
            self.stop.wait(0.5)


def _train_worker_pids(dashboard_url: str) -> list[int]:
    """PIDs of the live Train workers of THIS cluster (the address is explicit: other Ray
    clusters may run on the same machine)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    pids = sorted(a.pid for a in actors if a.pid)
    return [p for p in pids if "RayTrainWorker" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]


def registered_checkpoint(storage: RunStorage) -> int:
    """Step of the latest checkpoint Ray Train's controller has registered (its run snapshot).
    A reported checkpoint counts only once the controller has collected the report; a worker
    killed before that restarts from the previous one."""
    path = storage.local_path("pretrain") / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(path.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, json.JSONDecodeError):
        return 0
    return int(latest.get("checkpoint_dir_name", "checkpoint_0").rsplit("_", 1)[1])


class Killer(threading.Thread):
    """Kills one Train worker process (SIGKILL) for each (step, checkpoint) of `at`, once the
    current attempt has logged `step` and a checkpoint >= `checkpoint` is registered. The PIDs
    are looked up as soon as an attempt logs, so the kill itself is immediate."""

    def __init__(self, storage: RunStorage, at: list[tuple[int, int]], dashboard_url: str) -> None:
        super().__init__(daemon=True)
        self.storage, self.at, self.killed, self.dashboard_url = storage, list(at), [], dashboard_url
        self.stop = threading.Event()

    def run(self) -> None:
        pids: list[int] = []
        while self.at and not self.stop.is_set():
            runs = attempts(self.storage)
            if runs and len(runs) == len(self.killed) + 1:  # the attempt to kill is running
                pids = pids or _train_worker_pids(self.dashboard_url)
                step, saved = self.at[0]
                if pids and runs[-1][-1]["step"] >= step and registered_checkpoint(self.storage) >= saved:
                    os.kill(pids[-1], signal.SIGKILL)
                    self.killed.append(runs[-1][-1]["step"])
                    self.at.pop(0)
                    pids = []
            self.stop.wait(0.05)


@pytest.mark.cluster
def test_two_workers_match_one_process_survive_a_failure_and_resume_on_one(ray_cluster, embedded_pack,
                                                                             pack_tokenizer_dir, tmp_path):
    """One run, several scenarios (each Train start costs tens of seconds on 2 cores):
    2 workers from scratch = the single-process loop on the same global batches (losses and val
    bpb); a killed worker is retried from the last checkpoint with the same losses; a second
    kill exhausts max_failures; the relaunch resumes that 2-worker checkpoint on ONE worker and
    finishes; the tokens/s gauge is on the Prometheus endpoint meanwhile; the export loads."""
    import ray.train

    storage = new_run(tmp_path, "run", pack_tokenizer_dir)
    settings = ("num_iterations=30", "checkpoint_every=5", "eval_every=10", "max_failures=1", "metrics_interval_s=1",
                f"data={embedded_pack}")
    spec = micro_spec(*settings, "num_workers=2")
    watch = PrometheusWatch(ray_cluster.metrics_port, "ray_nanochat_pretrain_tokens_per_sec", "run")
    killer = Killer(storage, at=[(7, 5), (17, 15)], dashboard_url=ray_cluster.dashboard_url)
    watch.start()
    killer.start()
    with pytest.raises(ray.train.TrainingFailedError):  # the second failure is one too many
        run_pretrain(spec, storage, config={})
    killer.stop.set()
    killer.join()
    assert len(killer.killed) == 2 and not storage.is_complete("pretrain")

    losses, _ = reference_losses(spec, pack_tokenizer_dir, str(embedded_pack), world=2)
    first, second = attempts(storage)[:2]
    for rec in first + second:  # same data, same global batch: the single-process trajectory
        if rec.get("loss") is not None:
            assert rec["loss"] == pytest.approx(losses[rec["step"]]["loss"], rel=1e-3), rec["step"]
        if rec.get("val_bpb") is not None:
            assert rec["val_bpb"] == pytest.approx(losses[rec["step"]]["val_bpb"], rel=0.01), rec["step"]
    assert any(r.get("val_bpb") is not None and r["step"] == 10 for r in first + second)
    resumed = second[0]["step"]  # the retry continued from a checkpoint the first attempt reached
    assert second[0]["start_step"] == resumed - 1 and resumed - 1 in (5, 10, 15) and resumed <= first[-1]["step"] + 1
    before = {r["step"]: r["loss"] for r in first if r.get("loss") is not None}
    for rec in second:  # steps run twice give the same loss: same state, same data
        if rec["step"] in before:
            assert rec["loss"] == pytest.approx(before[rec["step"]], rel=1e-5)

    # relaunch of the same run on ONE worker: resumes the 2-worker checkpoint, re-sharded
    meta = run_pretrain(micro_spec(*settings, "num_workers=1"), storage, config={})
    watch.stop.set()
    watch.join()
    last = attempts(storage)[-1]
    start = last[0]["step"]
    assert start > 10 and (start - 1) % 5 == 0 and last[0]["world_size"] == 1
    assert [r["step"] for r in last] == list(range(start, 31))
    previous = {r["step"]: r["loss"] for run in attempts(storage)[:-1] for r in run if r.get("loss") is not None}
    initial = previous[1]  # ~ln(vocab): where a run that started over would be
    assert abs(last[0]["loss"] - previous[start - 1]) < 0.5 * (initial - previous[start - 1])
    assert meta["metrics"]["final_step"] == 30 and storage.is_complete("pretrain")
    assert watch.seen, "the tokens/s gauge never appeared on the Prometheus endpoint during the run"
    assert float(watch.seen[0].rsplit(" ", 1)[1]) > 0

    model, info = ckpt.load_model(storage.local_path("pretrain") / "model", "cpu")
    assert info["final_step"] == 30 and Tokenizer.load(info["tokenizer_dir"]).vocab_size == 512
    fresh = build_model(make_plan(spec.train, 512, 1).model, "cpu", spec.train.seed)
    assert not torch.equal(model.lm_head.weight, fresh.lm_head.weight)  # trained weights were exported


@pytest.mark.cluster
@pytest.mark.parametrize("precision, workers", [("bfloat16", 1), ("auto", 2)])
def test_a_bfloat16_run_trains_in_bfloat16_and_its_loss_falls(ray_cluster, embedded_pack, pack_tokenizer_dir,
                                                              tmp_path, precision, workers):
    """The tiny preset's default on this CPU kind (precision auto: bf16 where native) forced on the
    micro preset (float32, for the exact checks above): the worker's loop and Muon run in bf16. With
    "auto" on 2 workers the ranks agree on one dtype (a collective in every worker): bf16 where this
    machine's CPU multiplies it natively, else float32."""
    from nanochat.common import cpu_has_native_bf16

    storage = new_run(tmp_path, "bf16", pack_tokenizer_dir)
    spec = micro_spec("num_iterations=12", "eval_every=0", "checkpoint_every=0", f"precision={precision}",
                      f"num_workers={workers}", f"data={embedded_pack}")
    assert spec.train.schedule.precision == precision
    meta = run_pretrain(spec, storage, config={})
    records = [r for r in storage.read_metrics("pretrain") if r.get("loss") is not None]
    expected = "bfloat16" if precision == "bfloat16" or cpu_has_native_bf16() else "float32"
    assert {r["dtype"] for r in records} == {expected} and len(records) == 12
    assert records[-1]["loss"] < records[0]["loss"] - 1.0 and meta["metrics"]["final_step"] == 12
    assert math.isfinite(meta["metrics"]["val_bpb"])


def two_node_run(workdir: Path, data: str, tokenizer_dir: str) -> dict:
    """Child process: a head (3 CPUs) + worker node (3 CPUs) Cluster; training starts on the
    worker node (the head's CPUs are held by a placeholder), which is removed mid-run."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"head": 1}})
    worker_node = cluster.add_node(num_cpus=3)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}, log_to_driver=False)

    @ray.remote(num_cpus=3, resources={"head": 1})
    class Placeholder:
        def ready(self) -> bool:
            return True

    holder = Placeholder.remote()
    ray.get(holder.ready.remote())
    storage = new_run(workdir, "nodes", tokenizer_dir)
    spec = micro_spec("num_workers=2", "num_iterations=24", "checkpoint_every=5", "eval_every=0", "max_failures=2",
                      "storage_is_shared=true",  # one machine: the "local" path is shared by both nodes
                      f"data={data}")
    removed: list[int] = []

    def remove_worker_node() -> None:
        while not removed:
            runs = attempts(storage)
            if runs and runs[-1][-1]["step"] >= 7 and registered_checkpoint(storage) >= 5:
                ray.kill(holder)
                removed.append(runs[-1][-1]["step"])
                cluster.remove_node(worker_node)
            time.sleep(0.1)

    threading.Thread(target=remove_worker_node, daemon=True).start()
    meta = run_pretrain(spec, storage, config={})
    result = {"final_step": meta["metrics"]["final_step"], "removed_at": removed,
              "attempts": [[r["step"] for r in run] for run in attempts(storage)]}
    ray.shutdown()
    cluster.shutdown()
    return result


@pytest.mark.cluster  # its own 2-node cluster in a child process, not the session's
@pytest.mark.slow
def test_removing_the_worker_node_mid_run_still_finishes(embedded_pack, pack_tokenizer_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-m", "tests.test_pretrain_cluster", "two-nodes", str(tmp_path), str(embedded_pack),
         pack_tokenizer_dir], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["final_step"] == 24 and result["removed_at"]
    assert len(result["attempts"]) >= 2  # the group restarted on the head after the node went away
    assert result["attempts"][-1][-1] == 24 and (result["attempts"][-1][0] - 1) % 5 == 0


# ----------------------------------------------------------------------------- bad input, no cluster


def test_depth_that_does_not_split_into_heads_is_refused():
    with pytest.raises(ConfigError, match="depth 3 gives width 192.*head_dim 128"):
        load_stage_config(PretrainConfig, "pretrain", "micro", ["depth=3", "head_dim=128"])


def test_batch_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        make_plan(micro_spec("total_batch_tokens=1000").train, 512, 2)


def test_tokenizer_vocab_differing_from_the_checkpoint_is_refused(embedded_pack, pack_tokenizer_dir,
                                                                  tmp_path):
    storage = new_run(tmp_path, "vocab", pack_tokenizer_dir)
    spec = micro_spec(f"data={embedded_pack}")
    other = build_model(make_plan(spec.train, 1024, 1).model, "cpu", 0)  # trained with a 1,024-token tokenizer
    ckpt.save_training_checkpoint(storage.local_path("pretrain") / "checkpoint_0000010", other,
                                  other.setup_optimizers(), DistInfo(), step=10, data={"item": 0, "row": 0})
    with pytest.raises(ckpt.CheckpointError, match="vocab_size: saved 1024, now 512"):
        preflight(spec, storage)


def test_storage_without_write_access_is_refused(embedded_pack, pack_tokenizer_dir, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    storage = RunStorage("r", str(tmp_path / "a_file" / "runs"))
    with pytest.raises(StorageError, match="not writable"):
        preflight(micro_spec(f"data={embedded_pack}", f"tokenizer={pack_tokenizer_dir}"), storage)


def test_missing_or_empty_shards_are_refused(tmp_path, pack_tokenizer_dir):
    storage = RunStorage("r", str(tmp_path / "runs"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no \\*.parquet shards"):
        preflight(micro_spec(f"data={tmp_path / 'empty'}", f"tokenizer={pack_tokenizer_dir}"), storage)
    with pytest.raises(FileNotFoundError, match="no shard directory"):
        preflight(micro_spec(f"data={tmp_path / 'nowhere'}", f"tokenizer={pack_tokenizer_dir}"), storage)


def test_missing_tokenizer_stage_is_refused(tmp_path, embedded_pack):
    with pytest.raises(StorageError, match="run the tokenizer stage first"):
        preflight(micro_spec(f"data={embedded_pack}"), RunStorage("r", str(tmp_path)))


def test_local_storage_on_several_nodes_is_refused_unless_shared():
    with pytest.raises(StorageError, match="2 nodes.*storage_is_shared"):
        check_storage_for_cluster("/data/runs", 2, shared=False)
    check_storage_for_cluster("/data/runs", 2, shared=True)
    check_storage_for_cluster("s3://bucket/runs", 4, shared=False)
    check_storage_for_cluster("/data/runs", 1, shared=False)


def test_presets_give_the_seed_horizons():
    for preset, steps in (("d20", 21_400), ("d26", 41_275), ("d32", 71_680)):
        cfg = load_stage_config(PretrainConfig, "pretrain", preset)
        plan = make_plan(cfg.to_spec(preset).train, 65_536, cfg.num_workers)
        assert plan.loop.num_steps == steps and cfg.use_gpu
    assert make_plan(micro_spec().train, 512, 2).loop.grad_accum_steps == 1
    tiny = load_stage_config(PretrainConfig, "pretrain", "tiny")
    assert tiny.depth == 4 and tiny.sequence_len == 256


if __name__ == "__main__":
    if sys.argv[1:2] == ["two-nodes"]:
        print(json.dumps(two_node_run(Path(sys.argv[2]), sys.argv[3], sys.argv[4])), flush=True)
