"""Training that bends, across real hosts (cluster/hosts.py): an elastic run that shrinks when a worker
host dies and grows back when it returns, and a spot preemption (a GCS drain, then the host's death).

The cluster of tests/test_hosts_pretrain.py (whose helpers this file reuses): a CPU-less head, two
1-CPU worker hosts (one Train worker of 0.75 CPU and a tokenizer actor of 0.25 each, so the two
workers must land on different hosts) and a client host; micro pretraining with `num_workers=2`,
`min_workers=1`, checkpoints on the shared mount, submitted from the client host.

- grow back: w2 loses power after a checkpoint; the run goes on with one worker from the last
  checkpoint; once that attempt trains the harness boots w2 again, and at a following resize check Ray
  Train restarts the group with two workers. Checked in metrics.jsonl: world size 2 -> 1 -> 2 with the
  start_step of each attempt, steps lost at the loss <= checkpoint_every, the final step, the tokens of
  the uninterrupted run, final val bpb within 2% of it.
  Why growing back takes up to ~20 s more than `resize_check_s` (read in the 2.60 wheel): Ray Train's
  ElasticScalingPolicy counts the workers that fit in the resources the AutoscalingCoordinator actor
  (ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py) reserved for the run,
  and that actor refreshes its view of the cluster's nodes only on its tick, every 20 s
  (TICK_INTERVAL_S); no setting changes that. The resize itself restarts the group from the latest
  registered checkpoint (steps since are trained again).
- preemption: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 10`
  on w2's node, sent from the client host with the cluster's token; the harness kills w2 at the
  deadline; `max_failures=0`, so the run finishes only if Ray Train counts the death as a preemption.
  Checked: the checkpoint of the first step at which get_preemption_info() was non-None has all its
  files and is registered before the deadline, and the next attempt starts at exactly that step.

Timings (detection, shrink, grow, notice) are printed, never asserted.
Run: PYTHONPATH=. python -m pytest tests/test_hosts_elastic.py -q -s   (under the hosts lock)
"""

from __future__ import annotations

import json
import time

import pytest

from cluster.host_cluster import GCS_PORT, SHARED_MOUNT, HostCluster
from nanochat import checkpoint as ckpt
from tests.test_hosts import _harness_available
from tests.test_hosts_pretrain import (
    CHECKPOINT_EVERY,
    FIRST_CHECKPOINT,
    Job,
    Timings,
    clean_machine,  # noqa: F401 (fixture)
    pretrain_args,
    start_cluster,
    tokenizer,  # noqa: F401 (fixture)
    wait_for_failure_point,
    wait_until_dead,
)
from tests.test_pretrain_cluster import micro_spec, reference_losses, registered_checkpoint

pytestmark = [pytest.mark.hosts, pytest.mark.slow,
              pytest.mark.skipif(_harness_available() is not None,
                                 reason=f"host harness unavailable: {_harness_available()}")]

# long enough that the one-worker attempt is still training when w2 is back and the coordinator's next
# tick (<= 20 s) and resize check have passed
GROW_STEPS, PREEMPT_STEPS, RESIZE_CHECK_S = 160, 40, 2
ELASTIC = {"min_workers": "1", "resize_check_s": str(RESIZE_CHECK_S), "eval_every": "0"}
# a lost node stays in the view Ray Train sizes the group from until the GCS marks it dead: let the
# restart that waits for a group that cannot be placed end in 15 s, not 60
JOB_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}


def _attempts(storage) -> list[list[dict]]:
    """attempts() of the pretraining tests without the preemption notices (a notice repeats its step,
    which attempts() would read as a restart), read while the run appends (a half-written line reads as
    none yet)."""
    try:
        records = [r for r in storage.read_metrics("pretrain") if not r.get("preemption_notice")]
    except (ValueError, OSError):
        return []
    out: list[list[dict]] = []
    for rec in records:
        if not out or rec["start_step"] != out[-1][-1]["start_step"] or rec["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(rec)
    return out


def wait_for_attempt(storage, job: Job, count: int, world_size: int, since: float, timeout: float) -> float:
    """Seconds from `since` until the run's `count`-th attempt has logged a step at `world_size` workers."""
    while True:
        runs = _attempts(storage)
        if len(runs) >= count and runs[count - 1] and runs[count - 1][0]["world_size"] == world_size:
            return time.time() - since
        assert job.running(), job.logs()[-4000:]
        assert time.time() < since + timeout, (f"no attempt {count} at {world_size} workers after {timeout:.0f}s: "
                                               f"{[(r[0]['world_size'], r[0]['start_step']) for r in runs if r]}")
        time.sleep(0.2)


def finish(hc: HostCluster, job: Job, steps: int) -> None:
    try:
        assert job.wait(timeout=600) == "SUCCEEDED", job.logs()[-4000:]
    finally:
        if job.running():
            hc.run("client", ["ray", "job", "stop", "--address", hc.dashboard_url, job.id], check=False, timeout=120)
    assert f"pretrain done: step {steps}" in job.logs()


def check_result(storage, steps: int, tokenizer_dir: str, embedded_pack, timings: Timings) -> None:
    """The run ended at `steps` with the uninterrupted run's tokens and val bpb within 2% of it."""
    spec = micro_spec("num_workers=2", f"num_iterations={steps}", f"checkpoint_every={CHECKPOINT_EVERY}",
                      "eval_every=0")
    meta = storage.read_meta("pretrain")
    assert meta["metrics"]["final_step"] == steps
    assert meta["metrics"]["tokens"] == steps * spec.train.total_batch_tokens
    runs = _attempts(storage)
    assert [r["step"] for r in runs[-1]] == list(range(runs[-1][0]["start_step"] + 1, steps + 1))
    assert all(r["tokens"] == r["step"] * spec.train.total_batch_tokens for run in runs for r in run)
    _, reference_bpb = reference_losses(spec, tokenizer_dir, str(embedded_pack), world=2)
    timings["final val bpb"], timings["uninterrupted val bpb"] = meta["metrics"]["val_bpb"], reference_bpb
    assert meta["metrics"]["val_bpb"] == pytest.approx(reference_bpb, rel=0.02)


def w2_node(hc: HostCluster) -> str:
    return next(nid for ip, state, nid in hc.nodes() if ip == hc.host("w2").ip and state == "ALIVE")


def test_a_lost_host_shrinks_the_run_and_its_return_grows_it_back(embedded_pack, tokenizer, clean_machine):  # noqa: F811
    timings = Timings()
    hc, storage = start_cluster(embedded_pack, tokenizer, timings)
    with hc:
        job = Job(hc, "grow", pretrain_args(f"{SHARED_MOUNT}/runs", num_iterations=str(GROW_STEPS), **ELASTIC),
                  env=JOB_ENV)
        try:
            node = w2_node(hc)
            wait_for_failure_point(hc, storage, job)
            killed_at = hc.kill("w2")
            last_before = _attempts(storage)[-1][-1]["step"]
            timings["lost host detected after (s)"] = wait_until_dead(hc, node, killed_at)
            timings["shrunk to 1 worker, training after (s)"] = wait_for_attempt(storage, job, 2, 1, killed_at, 300)
            back_at = hc.restart("w2")
            timings["host back after (s)"] = back_at - killed_at
            timings["grown to 2 workers, training after (s)"] = wait_for_attempt(storage, job, 3, 2, back_at, 300)
        except BaseException:
            if job.running():
                hc.run("client", ["ray", "job", "stop", "--address", hc.dashboard_url, job.id], check=False,
                       timeout=120)
            raise
        finish(hc, job, GROW_STEPS)

        runs = _attempts(storage)
        shape = [(run[0]["world_size"], run[0]["start_step"], run[-1]["step"]) for run in runs]
        print(f"grow-back scenario: attempts (world size, start step, last step) {shape}", flush=True)
        assert [s[0] for s in shape] == [2, 1, 2], shape
        assert all(r["world_size"] == run[0]["world_size"] for run in runs for r in run)
        (_, _, first_last), (_, shrunk_from, shrunk_last), (_, grown_from, _) = shape
        assert first_last == last_before
        timings["steps lost at the loss"] = last_before - shrunk_from
        assert shrunk_from % CHECKPOINT_EVERY == 0 and FIRST_CHECKPOINT <= shrunk_from <= last_before
        assert last_before - shrunk_from <= CHECKPOINT_EVERY
        timings["steps trained again at the growth"] = shrunk_last - grown_from
        assert grown_from % CHECKPOINT_EVERY == 0 and shrunk_from < grown_from <= shrunk_last
        for run in runs:  # each attempt trained every step from its start (a fresh run also logs step 0)
            steps = [r["step"] for r in run if r["step"] > run[0]["start_step"]]
            assert steps == list(range(run[0]["start_step"] + 1, run[-1]["step"] + 1))
        check_result(storage, GROW_STEPS, tokenizer, embedded_pack, timings)


def checkpoint_files(storage, step: int) -> list[str]:
    """Files of the checkpoint of `step` on the shared mount that a complete 2-rank checkpoint must have
    but does not (empty: complete)."""
    d = storage.local_path("pretrain") / f"checkpoint_{step:07d}"
    try:
        world = json.loads((d / ckpt.STATE_FILE).read_text())["world_size"]
    except (OSError, ValueError, KeyError):
        return [ckpt.STATE_FILE]
    need = ckpt.required_files(world) if world == 2 else [f"world_size {world}, not 2"]
    return [f for f in need if not (d / f).is_file()]


def test_a_drained_spot_host_is_saved_at_the_notice_and_not_counted_as_a_failure(
        embedded_pack, tokenizer, clean_machine):  # noqa: F811
    timings = Timings()
    hc, storage = start_cluster(embedded_pack, tokenizer, timings)
    with hc:
        settings = {**ELASTIC, "num_iterations": str(PREEMPT_STEPS), "max_failures": "0", "max_preemptions": "2"}
        # Train's controller asks the GCS for drains every 5 s by default: every 1 s leaves the workers more
        # of the 10 s before the deadline
        job = Job(hc, "spot", pretrain_args(f"{SHARED_MOUNT}/runs", **settings),
                  env={**JOB_ENV, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"})
        try:
            node = w2_node(hc)
            wait_for_failure_point(hc, storage, job)
            drained_at = time.time()
            hc.run("client", ["ray", "drain-node", "--address", f"{hc.head.ip}:{GCS_PORT}", "--node-id", node,
                              "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaimed (test)",
                              "--deadline-remaining-seconds", "10"], timeout=60)
            deadline = drained_at + 10
            notice = None
            while notice is None and time.time() < deadline:
                notice = next((r for r in storage.read_metrics("pretrain") if r.get("preemption_notice")), None)
                time.sleep(0.1)
            assert notice is not None, "no preemption notice reached the workers before the deadline"
            deadline = notice["deadline_ms"] / 1000  # the GCS's: set when the drain-node command ran
            # what storage holds just before the harness kills the host at the deadline
            while time.time() < deadline - 0.5:
                time.sleep(0.1)
            missing, registered = checkpoint_files(storage, notice["step"]), registered_checkpoint(storage)
            hc.kill("w2")
            timings["notice after the drain (s)"] = notice["time"] - notice["checkpoint_s"] - drained_at
            timings["notice checkpoint saved in (s)"] = notice["checkpoint_s"]
            timings["deadline left after the save (s)"] = notice["deadline_left_s"]
            assert not missing, f"checkpoint of step {notice['step']} incomplete at the deadline: {missing}"
            assert registered == notice["step"], (registered, notice)
            wait_for_attempt(storage, job, 2, 1, deadline, 300)
        except BaseException:
            if job.running():
                hc.run("client", ["ray", "job", "stop", "--address", hc.dashboard_url, job.id], check=False,
                       timeout=120)
            raise
        finish(hc, job, PREEMPT_STEPS)  # max_failures=0: the death counted as a preemption

        runs = _attempts(storage)
        shape = [(run[0]["world_size"], run[0]["start_step"], run[-1]["step"]) for run in runs]
        print(f"preemption scenario: attempts (world size, start step, last step) {shape}", flush=True)
        assert len(runs) == 2 and runs[1][0]["start_step"] == notice["step"], (notice, shape)
        assert runs[0][-1]["step"] == notice["step"]  # the ranks held from the notice to the deadline
        check_result(storage, PREEMPT_STEPS, tokenizer, embedded_pack, timings)
