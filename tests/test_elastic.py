"""Training that bends: an elastic worker range and spot preemption, on a Ray cluster of several nodes.

Each scenario runs in a child process with its own `ray.cluster_utils.Cluster` (a head without CPUs and
worker nodes that fit one Train worker each, with its data actor), so it stays outside the session's
shared cluster. The nodes share one machine and one IP: this shows Ray Train's
elastic and preemption handling and our reaction to it (the checkpoint saved at the notice, the
restart's start step, the constant global batch), not real hosts (tests/test_hosts.py does those).

- elastic: num_workers 2, min_workers 1; a worker node is killed mid-run; the run goes on with one
  worker from the last checkpoint, with the same global batch (twice the gradient accumulation), and
  metrics.jsonl shows world size 2 -> 1 with the start step of each attempt. The data positions of the
  checkpoints (copied as they appear) show the resized rank read on exactly from the positions the
  two ranks saved (nanochat/data/positions.py): no row of theirs again, none skipped. (Growing back when a
  node returns is Ray Train's resize check; here a node added back to a cluster_utils cluster under
  load never registered in time, so that half waits for the host harness.)
- preemption: the node of one worker is drained with reason PREEMPTION and a 10 s deadline (as the
  autoscaler does for a spot reclaim), and removed at the deadline; max_failures is 0, so the run
  finishes only if the node's death counts as a preemption; the checkpoint of the notice's step is
  saved before the deadline and the next attempt starts from exactly that step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.artifacts import CHECKPOINT_PREFIX, is_complete
from nanochat.checkpoint import data_file
from nanochat.data.positions import DataPosition, resume_positions
from tests.test_pretrain_cluster import attempts, micro_spec, new_run, registered_checkpoint

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("num_workers=2", "min_workers=1", "resize_check_s=3", "checkpoint_every=5", "eval_every=0",
            "max_failures=3", "cpus_per_worker=2", "tokenizer_actor_cpus=0.25",
            "storage_is_shared=true")  # one machine: the run's local path is shared by every node
ELASTIC_STEPS = PREEMPTION_STEPS = 40


def _cluster():
    """A head without CPUs (nothing of the run lands there; Ray Train's elastic policy counts only nodes with
    CPUs or GPUs) and two 3-CPU worker nodes: one 2-CPU Train worker each, and room for its data actor."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}, log_to_driver=False)
    return cluster, nodes


def _attempts(storage) -> list[list[dict]]:
    """attempts() of the pretraining tests, read while the run appends (a half-written line reads as none yet)."""
    try:
        return attempts(storage)
    except (ValueError, OSError):
        return []


def _shutdown(cluster) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def elastic_run(workdir: Path, data: str, tokenizer_dir: str) -> dict:
    """Child process: remove a worker node (SIGKILL of its processes, as a power loss) once a checkpoint
    is registered; the run must go on with one worker."""
    from cluster.pretrain import run_pretrain

    cluster, nodes = _cluster()
    storage = new_run(workdir, "elastic", tokenizer_dir)
    events: list[str] = []

    def lose_a_host() -> None:
        try:
            while "removed" not in events:
                runs = _attempts(storage)
                if runs and runs[-1][-1]["step"] >= 8 and registered_checkpoint(storage) >= 5:
                    cluster.remove_node(nodes[1], allow_graceful=False)
                    events.append("removed")
                time.sleep(0.1)
        except Exception as e:  # noqa: BLE001 (reported in the result, where the test shows it)
            events.append(f"error: {e!r}")

    positions: dict[int, list[dict]] = {}  # step -> every rank's saved data position

    def copy_positions() -> None:
        while "done" not in events:
            for path in storage.local_path("pretrain").glob(f"{CHECKPOINT_PREFIX}*"):
                state = is_complete(storage.fs, str(path))
                if state is not None and int(state["step"]) not in positions:
                    positions[int(state["step"])] = [json.loads((path / data_file(r)).read_text())
                                                     for r in range(int(state["world_size"]))]
            time.sleep(0.1)

    threading.Thread(target=lose_a_host, daemon=True).start()
    watcher = threading.Thread(target=copy_positions, daemon=True)
    watcher.start()
    meta = run_pretrain(micro_spec(*SETTINGS, f"num_iterations={ELASTIC_STEPS}", f"data={data}"), storage, config={})
    events.append("done")
    watcher.join()
    events.remove("done")
    result = {"final_step": meta["metrics"]["final_step"], "tokens": meta["metrics"]["tokens"], "events": events,
              "positions": positions,
              "attempts": [{"world_size": run[-1]["world_size"], "start_step": run[-1]["start_step"],
                            "first": run[0]["step"], "last": run[-1]["step"]} for run in attempts(storage)]}
    _shutdown(cluster)
    return result


def preemption_run(workdir: Path, data: str, tokenizer_dir: str) -> dict:
    """Child process: drain one worker's node with reason PREEMPTION and a 10 s deadline once a
    checkpoint is registered, remove the node at the deadline."""
    import ray
    from ray.core.generated import autoscaler_pb2

    from cluster.pretrain import run_pretrain

    cluster, nodes = _cluster()
    storage = new_run(workdir, "spot", tokenizer_dir)
    events: dict[str, float] = {}

    def preempt() -> None:
        while "drained" not in events:
            runs = _attempts(storage)
            if runs and runs[-1][-1]["step"] >= 8 and registered_checkpoint(storage) >= 5:
                deadline_ms = time.time_ns() // 1_000_000 + 10_000
                client = ray._raylet.GcsClient(address=cluster.address)
                accepted, why = client.drain_node(nodes[1].node_id,
                                                  autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                                  "spot instance reclaimed (test)", deadline_ms)
                assert accepted, why
                events["drained"], events["deadline"] = time.time(), deadline_ms / 1000
            time.sleep(0.1)
        time.sleep(max(0.0, events["deadline"] - time.time()))
        cluster.remove_node(nodes[1])
        events["removed"] = time.time()

    threading.Thread(target=preempt, daemon=True).start()
    spec = micro_spec(*SETTINGS, f"num_iterations={PREEMPTION_STEPS}", "max_failures=0", "max_preemptions=2",
                      f"data={data}")
    meta = run_pretrain(spec, storage, config={})
    records = storage.read_metrics("pretrain")
    result = {"final_step": meta["metrics"]["final_step"], "events": events,
              "notices": [r for r in records if r.get("preemption_notice")],
              "attempts": [{"world_size": run[-1]["world_size"], "start_step": run[-1]["start_step"],
                            "first": run[0]["step"], "last": run[-1]["step"]}
                           for run in attempts(storage)]}
    _shutdown(cluster)
    return result


def _child(name: str, tmp_path: Path, embedded_pack: Path, tokenizer_dir: str) -> dict:
    # a lost node stays in the view Ray Train sizes the group from until the GCS marks it dead, so the
    # first restart waits for a group that cannot be placed: let that wait end in 15 s, not 60
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "tests.test_elastic", name, str(tmp_path), str(embedded_pack),
                          tokenizer_dir], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_lost_host_shrinks_the_run_which_finishes_on_the_rest(embedded_pack, pack_tokenizer_dir, tmp_path):
    result = _child("elastic", tmp_path, embedded_pack, pack_tokenizer_dir)
    sizes = [a["world_size"] for a in result["attempts"]]
    assert result["events"] == ["removed"] and result["final_step"] == ELASTIC_STEPS, result
    assert sizes[0] == 2 and sizes[-1] == 1, result["attempts"]  # no failure left: min_workers=1 kept it going
    for before, after in zip(result["attempts"], result["attempts"][1:], strict=False):
        assert after["start_step"] % 5 == 0 and before["last"] - after["start_step"] <= 5, result["attempts"]
    assert result["tokens"] == ELASTIC_STEPS * micro_spec().train.total_batch_tokens  # constant global batch
    check_rows_after_the_resize(result, embedded_pack, pack_tokenizer_dir)


def rows_read_on_from(start: DataPosition, rows: int, rows_in) -> DataPosition:
    """The position a single rank reaches from `start` after `rows` more rows (RowBatcher's rule)."""
    pos = start
    for item, skip in start.stream(1):
        take = min(rows, rows_in(item) - skip)
        if take > 0:
            pos, rows = pos.at(item, skip + take), rows - take
        if rows == 0:
            return pos
    raise AssertionError("unreachable: the stream is endless")


def check_rows_after_the_resize(result: dict, data: Path, tokenizer_dir: str) -> None:
    """The first attempt on one worker starts at a checkpoint of two ranks; its next checkpoint is exactly
    (steps between) x global batch rows further along the stream dealt from the two ranks' positions."""
    from cluster.artifacts import load_tokenizer
    from cluster.pretrain import resolve_shards
    from nanochat.data import dataloader as dl

    positions = {int(k): [DataPosition.from_dict(p) for p in v] for k, v in result["positions"].items()}
    s0 = next(a["start_step"] for a in result["attempts"] if a["world_size"] == 1)
    s1 = min(s for s, p in positions.items() if s > s0 and len(p) == 1)
    assert len(positions[s0]) == 2, (s0, positions)
    spec = micro_spec().train
    plan, tok = dl.plan_row_groups(resolve_shards(str(data))[0]), load_tokenizer(tokenizer_dir)
    counts: dict[int, int] = {}

    def rows_in(item: int) -> int:
        if item % len(plan) not in counts:
            texts = dl.read_texts(*dl.item_source(plan, item))
            counts[item % len(plan)] = len(dl.tokenize_and_pack(tok, texts, spec.sequence_len + 1))
        return counts[item % len(plan)]

    dealt = resume_positions(positions[s0], 1)[0]
    rows = (s1 - s0) * spec.total_batch_tokens // spec.sequence_len
    assert rows_read_on_from(dealt, rows, rows_in) == positions[s1][0], (dealt, positions[s1])


def test_a_preempted_host_is_saved_at_the_notice_and_not_counted_as_a_failure(embedded_pack,
                                                                               pack_tokenizer_dir,
                                                                               tmp_path):
    result = _child("preemption", tmp_path, embedded_pack, pack_tokenizer_dir)
    assert result["final_step"] == PREEMPTION_STEPS, result  # max_failures=0: the node's death counted as a preemption
    notice = result["notices"][0]
    assert notice["deadline_left_s"] > 0, notice  # the checkpoint was in storage before the deadline
    restarted = [a for a in result["attempts"] if a["start_step"] >= notice["step"]]
    assert restarted and restarted[0]["start_step"] == notice["step"], (notice, result["attempts"])


if __name__ == "__main__":
    runner = {"elastic": elastic_run, "preemption": preemption_run}[sys.argv[1]]
    print(json.dumps(runner(Path(sys.argv[2]), sys.argv[3], sys.argv[4])), flush=True)
