"""The whole micro pipeline on real hosts (cluster/hosts.py), every stage a `ray job submit` from the client.

Head (1 CPU), two worker hosts (2 CPUs each) and a client host. The data pack and the run storage are
on the shared mount (NANOCHAT_HOME=/srv/home, --storage /srv/runs), the training stages declare the
storage shared (and the driver checks it on every node). `python -m jobs.pipeline --address
http://<head>:8265` runs on the client host and submits each stage to the head; the stages' work is
placed by Ray over the hosts. Checked: every stage complete, both workers ran Ray workers and the
head the stages' drivers (Ray's worker records), each evaluation's actors ran on more than one host
(the nodes its record names), and nothing of the harness is left.

Run: PYTHONPATH=. python -m pytest tests/test_hosts_pipeline.py -q -s
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from cluster.host_cluster import SHARED_MOUNT, HostCluster
from jobs import registry
from tests.test_hosts import _harness_available, nothing_left_behind

pytestmark = [pytest.mark.hosts, pytest.mark.slow,
              pytest.mark.skipif(_harness_available() is not None,
                                 reason=f"host harness unavailable: {_harness_available()}")]


def test_micro_pipeline_through_ray_job_submit_from_the_client_host(embedded_pack):
    from cluster.storage import RunStorage

    with nothing_left_behind(), HostCluster.create(workers=2, head_cpus=1, worker_cpus=2) as hc:
        hc.start_ray()
        shutil.copytree(embedded_pack.parent, hc.shared / "home" / "data")  # the pack, as an NFS copy
        sets = [f"{stage}.storage_is_shared=true" for stage in ("pretrain", "midtrain", "sft")]
        cmd = ["python", "-m", "jobs.pipeline", "--preset", "micro", "--run", "hp", "--storage", f"{SHARED_MOUNT}/runs",
               "--address", hc.dashboard_url, *(a for s in sets for a in ("--set", s))]
        t0 = time.time()
        out = hc.run("client", cmd, env={"NANOCHAT_HOME": f"{SHARED_MOUNT}/home"}, timeout=1500, check=False)
        log = out.stdout + out.stderr
        print(f"\npipeline across hosts: {time.time() - t0:.0f}s, exit {out.returncode}\n{log[-1500:]}", flush=True)
        assert out.returncode == 0, log[-5000:]
        storage = RunStorage("hp", str(hc.shared / "runs"))
        for stage in registry.select(None):
            assert stage.is_complete(storage), stage.name
        jobs = hc.run("client", ["ray", "list", "jobs", "--address", hc.dashboard_url, "--format", "json",
                                 "--limit", "100"], timeout=120).stdout
        assert jobs.count('"SUCCEEDED"') >= len(registry.select(None)) - 1
        workers = hc.run("client", ["ray", "list", "workers", "--address", hc.dashboard_url, "--format", "json",
                                    "--limit", "1000"], timeout=120).stdout
        ran = [(w["ip"], w["worker_type"]) for w in json.loads(workers)]
        assert {hc.host("w1").ip, hc.host("w2").ip} <= {ip for ip, kind in ran if kind == "WORKER"}, ran
        assert (hc.head.ip, "DRIVER") in ran  # the stages' drivers ran on the head, none on the client
        assert hc.host("client").ip not in {ip for ip, _ in ran}
        for stage in ("pretrain", "midtrain", "sft", "rl"):  # each evaluation's actors (SPREAD) on several hosts
            doc = json.loads((hc.shared / "runs" / "hp" / "evaluate" / f"{stage}.json").read_text())
            nodes = {a["node"] for a in doc["pool"]["actors"]}
            print(f"evaluate {stage}: {len(doc['pool']['actors'])} actors on {sorted(nodes)}", flush=True)
            assert len(nodes) > 1, (stage, doc["pool"])
