"""The chat service across real hosts (cluster/hosts.py): a replica host killed under streaming load.

Head (0 CPUs: Serve's controller and HTTP proxy), two worker hosts with one replica each (1 CPU),
and a client host. `python -m jobs.serve` is submitted from the client host with `ray job submit`;
the client streams six long replies through the head's proxy, then w2 loses power. Checked: the
streams on w2's replica end with an error promptly (no hang), the streams on w1's replica finish,
and after Serve has noticed, every new request is answered (by w1). Timings are printed.

Run: PYTHONPATH=. python -m pytest tests/test_hosts_serve.py -q -s
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cluster.host_cluster import SHARED_MOUNT, HostCluster
from serve_app.testing import write_random_checkpoint
from tests.test_hosts import _harness_available, nothing_left_behind
from tests.test_serve_failover import SEQUENCE_LEN, cut_streams

pytestmark = [pytest.mark.hosts, pytest.mark.slow,
              pytest.mark.skipif(_harness_available() is not None,
                                 reason=f"host harness unavailable: {_harness_available()}")]

PORT = 8000

# runs on the client host: waits for the service, finds which replica lives on which host,
# streams six replies, says "streaming" in a file, then reports what each stream saw
LOAD = r"""
import json, sys, threading, time, requests
from ray.util.state import list_actors, list_nodes
from tests.test_serve_failover import MODEL, stream_until_end

url, dashboard, flag = sys.argv[1], sys.argv[2], sys.argv[3]
body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
deadline = time.time() + 300
while True:
    try:
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        if r.status_code == 200:
            break
    except requests.RequestException:
        pass
    assert time.time() < deadline, "the service never answered"
    time.sleep(1)
seen = {requests.post(f"{url}/v1/chat/completions", json=body, timeout=60).headers["x-nanochat-replica"]
        for _ in range(20)}
ips = {n.node_id: n.node_ip for n in list_nodes(address=dashboard)}
where = {a.name.rsplit("#", 1)[1]: ips[a.node_id]
         for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")])
         if a.name and a.name.startswith("SERVE_REPLICA::")}
results = [{} for _ in range(6)]
events = [threading.Event() for _ in results]
threads = [threading.Thread(target=stream_until_end, args=(url, out, ev)) for out, ev in zip(results, events)]
for t in threads:
    t.start()
for ev in events:
    ev.wait(60)
open(flag, "w").write("streaming")
for t in threads:
    t.join(120)
hung = sum(t.is_alive() for t in threads)
streams_done = time.time()
after, ok_in_a_row = [], 0  # new requests until 8 in a row are answered (at most 120 s)
while ok_in_a_row < 8 and time.time() < streams_done + 120:
    t = time.time()
    try:
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        after.append([r.status_code, r.headers.get("x-nanochat-replica"), t])
    except requests.RequestException as e:
        after.append([0, type(e).__name__, t])
    ok_in_a_row = ok_in_a_row + 1 if after[-1][0] == 200 else 0
killed = float(open(flag.replace("streaming", "killed")).read())
print(json.dumps({"seen": sorted(seen), "where": where, "results": results, "hung": hung, "after": after,
                  "streams_ended_s": streams_done - killed,
                  "answering_again_s": after[-8][2] - killed if ok_in_a_row == 8 else None}))
"""


def test_a_replica_host_killed_under_streaming_load(tmp_path):
    with nothing_left_behind(), HostCluster.create(workers=2, head_cpus=0, worker_cpus=1) as hc:
        hc.start_ray()
        run_dir = hc.shared / "runs" / "r1" / "sft"
        write_random_checkpoint(run_dir / "model", vocab_size=512, sequence_len=SEQUENCE_LEN)
        (run_dir / "meta.json").write_text(json.dumps({"stage": "sft"}))
        sets = ["num_replicas=2", "num_cpus=1", "torch_threads=1", "max_batch_size=8", f"port={PORT}",
                "host=0.0.0.0"]
        deploy = ["python", "-m", "jobs.serve", "--run", "r1", "--storage", f"{SHARED_MOUNT}/runs", "--stage", "sft",
                  *(a for s in sets for a in ("--set", s))]
        runtime_env = {"env_vars": {"PYTHONPATH": hc.env("client")["PYTHONPATH"]}}
        hc.run("client", ["ray", "job", "submit", "--address", hc.dashboard_url, "--runtime-env-json",
                          json.dumps(runtime_env), "--", *deploy], timeout=400)

        url = f"http://{hc.head.ip}:{PORT}"
        flag = hc.host_dir("client") / "tmp" / "streaming"
        load = hc.popen("client", [sys.executable, "-c", LOAD, url, hc.dashboard_url, "/tmp/streaming"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        deadline = time.time() + 400
        while not flag.exists():
            assert load.poll() is None and time.time() < deadline, load.communicate()[1][-3000:]
            time.sleep(0.1)
        killed_at = hc.kill("w2")
        (hc.host_dir("client") / "tmp" / "killed").write_text(repr(killed_at))
        out, err = load.communicate(timeout=400)
        assert load.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        print(f"\nserve-host scenario: {json.dumps(report)[:2000]}", flush=True)

        assert len(report["seen"]) == 2 and sorted(report["where"].values()) == [hc.host("w1").ip, hc.host("w2").ip]
        victim = next(r for r, ip in report["where"].items() if ip == hc.host("w2").ip)
        assert report["hung"] == 0, "a stream hung after its host died"
        cut = cut_streams(report["results"], victim, killed_at)  # a stream that had finished is no case
        survivors = [r for r in report["results"] if r.get("replica") != victim]
        assert cut and survivors, report["results"]
        for r in cut:
            assert r["error"] or not r["done"], r
        for r in survivors:
            assert r["done"] and r["error"] is None and r["tokens"] > 0, r
        assert report["answering_again_s"] is not None, report["after"]
        assert {rid for _, rid, _ in report["after"][-8:]} == {next(r for r in report["where"] if r != victim)}
        failed_after = sum(code != 200 for code, _, _ in report["after"])
        cut_ended = max(r["ended"] for r in cut) - killed_at
        print(f"serve-host scenario: {len(cut)} stream(s) on w2 ended {cut_ended:.1f}s after the kill, "
              f"all {len(report['results'])} {report['streams_ended_s']:.1f}s after it; "
              f"8 answers in a row from w1 from {report['answering_again_s']:.1f}s after the kill; "
              f"{failed_after} new request(s) failed meanwhile", flush=True)
