"""RL across real hosts (cluster/hosts.py): learner on one host, rollout actors on two others, one of
them lost mid-step; the step completes on the remaining actor and the count comes back with the host.

Head (0 CPUs: the job driver), three 1-CPU worker hosts and a client host. The hosts declare custom
resources as a cluster.yaml's node types would: w1 `learner_host`, w2 and w3 `rollout_host`; the
run asks for them (`learner_resources`, `rollout_resources`), so the learner lands on w1 and one
rollout actor on each of w2 and w3 (asserted from the hosts' processes). From the client host,
`ray job submit` of tests/hosts_rl_driver.py: micro RL on the toy task, 6 steps, the weight sync
through the object store across hosts, checked every step (checksums and probe log-probs). While
step 2's rollouts are in flight, w3 loses power; its actor's replacement cannot be placed (no other
host has `rollout_host` room), so after `replace_wait_s` the chunk goes to w2's actor and the step
completes with every sample. While step 4's are in flight the harness boots a fresh w3: the queued
replacement is placed there and joins at the next sync, checked like the others. Checked: the right
step count, every step's sync check, the lost step's full sample count and re-sent chunk, 1 actor
after the syncs of steps 2-3, 2 again from step 4 on. Timings (detection, the lost step) are printed, never asserted.

Run: PYTHONPATH=. python -m pytest tests/test_hosts_rl.py -q -s   (under the harness lock, see README)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.host_cluster import SHARED_MOUNT, HostCluster
from cluster.storage import RunStorage
from nanochat.tokenizer import Tokenizer
from tests.test_hosts import _harness_available, nothing_left_behind
from tests.test_hosts_pretrain import Job, Timings
from tests.test_rl_cluster import CORPUS, TOY, VOCAB, stand_in_sft

pytestmark = [pytest.mark.hosts, pytest.mark.slow,
              pytest.mark.skipif(_harness_available() is not None,
                                 reason=f"host harness unavailable: {_harness_available()}")]

RUN, STEPS, KILL_STEP, BACK_STEP = "hr", 6, 1, 3  # on_dispatch steps are 0-based: the 2nd and 4th step
PROMPTS, GROUP = 8, 8
# long enough rollouts (most of 96 tokens from an untrained model: it rarely samples the stop token)
# that the host dies while its chunk is generating, not after it returned
SETTINGS = {"num_steps": STEPS, "examples_per_step": PROMPTS, "group_size": GROUP, "max_new_tokens": 96,
            "num_rollout_actors": 2, "rollout_cpus": 1, "learner_cpus": 1, "weight_sync": "object_store",
            "rollout_resources": "{rollout_host: 1}", "learner_resources": "{learner_host: 1}",
            "replace_wait_s": 10, "max_actor_restarts": 2}


def actors_on(hc: HostCluster, host: str) -> dict[str, int]:
    """How many RolloutWorker and LearnerWorker actor processes run on `host` (Ray's process titles)."""
    found = {"RolloutWorker": 0, "LearnerWorker": 0}
    for pid in hc.processes(host):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        for name in found:
            found[name] += f"ray::{name}".encode() in cmd
    return found


def wait_file(path: Path, job: Job, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert time.time() < deadline, f"the driver never wrote {path.name}"
        assert job.running(), job.logs()[-4000:]
        time.sleep(0.05)


def test_rollout_host_lost_mid_step_the_step_completes_and_the_count_comes_back(tmp_path):
    timings = Timings()
    t0 = time.time()
    with nothing_left_behind(), HostCluster.create(workers=3, head_cpus=0, worker_cpus=1) as hc:
        hc.host("w1").resources = {"learner_host": 1}
        hc.host("w2").resources = hc.host("w3").resources = {"rollout_host": 1}
        hc.save()
        hc.start_ray()
        timings["cluster up (s)"] = time.time() - t0
        runs = hc.shared / "runs"
        tok = tmp_path / "tok"
        Tokenizer.train_from_iterator(CORPUS, vocab_size=VOCAB).save(tok)
        stand_in_sft(runs, RUN, tok, sequence_len=256)
        sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
        job = Job(hc, "rl-hosts", ["python", "-m", "tests.hosts_rl_driver", "--storage", f"{SHARED_MOUNT}/runs",
                                   "--run", RUN, "--kill-step", str(KILL_STEP), "--back-step", str(BACK_STEP),
                                   *sets])
        hand = runs / RUN / "handshake"
        wait_file(hand / "dispatched", job)
        placed = {h: actors_on(hc, h) for h in ("head", "w1", "w2", "w3")}
        t_kill = hc.kill("w3")
        (hand / "killed").write_text(str(t_kill))
        print(f"\nactors by host at the kill: {placed}", flush=True)
        wait_file(hand / "want_host_back", job)
        t_back = hc.restart("w3")
        (hand / "host_back").write_text(str(t_back))
        timings["w3 back in the cluster after the kill (s)"] = t_back - t_kill
        status = job.wait(900)
        logs = job.logs()
        print(logs[-2500:], flush=True)
        assert status == "SUCCEEDED", logs[-5000:]

        # where the actors ran: the learner alone on w1, one rollout actor on each rollout host
        assert placed["w1"] == {"RolloutWorker": 0, "LearnerWorker": 1}, placed
        assert placed["w2"] == placed["w3"] == {"RolloutWorker": 1, "LearnerWorker": 0}, placed
        assert placed["head"] == {"RolloutWorker": 0, "LearnerWorker": 0}, placed

        steps = [r for r in RunStorage(RUN, str(runs)).read_metrics("rl") if "reward_mean" in r]
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        for r in steps:  # the sync crossed hosts and its check passed every step
            assert r["verify_s"] > 0 and r["probe_gap"] <= TOY.probe_atol and r["version"] == r["step"]
            assert r["samples"] == PROMPTS * GROUP
        lost = steps[KILL_STEP]
        assert lost["chunks_redispatched"] >= 1 and lost["actor_restarts"] == 1, lost
        counts = [r["rollout_actors"] for r in steps]  # after each step's sync
        assert counts == [2] * KILL_STEP + [1] * (BACK_STEP - KILL_STEP) + [2] * (STEPS - BACK_STEP), counts

        events = [json.loads(line) for line in (hand / "events.jsonl").read_text().splitlines()]
        summary = next(e for e in events if e["event"] == "finished")["summary"]
        assert summary["final_step"] == STEPS and summary["rollout_actors_lost"] == 1
        fleet = [e for e in events if e["event"] == "fleet"]
        replacing = next(e["t"] for e in fleet if "replacing rollout actor" in e["message"])
        carried_on = next(e["t"] for e in fleet if "carrying on with 1 of 2" in e["message"])
        timings["lost actor detected by the driver after the kill (s)"] = replacing - t_kill
        timings["carrying on with 1 actor after the kill (s)"] = carried_on - t_kill
        timings["rollout wall time of the lost step (s)"] = lost["rollout_wall_s"]
        others = sorted(r["rollout_wall_s"] for i, r in enumerate(steps) if i != KILL_STEP)
        timings["rollout wall time of the other steps, median (s)"] = others[len(others) // 2]
        timings["scenario (s)"] = time.time() - t0
