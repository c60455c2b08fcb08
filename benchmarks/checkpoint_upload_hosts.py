"""Checkpoint upload to object storage behind a slow link: benchmarks/checkpoint_upload.py across hosts.

    python benchmarks/checkpoint_upload_hosts.py [--rate 100mbit] [--steps 40] [--every 10] [--preset tiny]

(root; run under the host harness lock: `flock /tmp/nanochat-hosts.lock ...`). The harness's shared
mount is a bind mount, which a `tbf` limit on a link cannot slow, so here the storage crosses the
network: a host cluster (cluster/host_cluster.py) gets one more host, `s3`, running an S3-compatible
server (moto's `moto_server`, a dev dependency), whose link is limited both ways with `tbf` to
`--rate`. benchmarks/checkpoint_upload.py then runs on the client host (its own one-node Ray there)
with `--storage s3://bench/runs`; pyarrow's S3 client, Ray Train's included, finds the server through
the standard `AWS_ENDPOINT_URL` variable, so no code path differs from real object storage. Prints that
benchmark's table (median step, median step + checkpoint, spike, background vs synchronous) and the
checkpoint's size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from cluster.host_cluster import HostCluster
from cluster.netns import HostError
from nanochat.data.dataset import nanochat_home

S3_PORT, BUCKET = 5000, "bench"


def wait_for_server(hc: HostCluster, url: str, timeout: float = 60.0) -> None:
    """Until the S3 server answers (asked from the client host)."""
    probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=5).read()"
    deadline = time.time() + timeout
    while hc.run("client", [sys.executable, "-c", probe], check=False, timeout=30).returncode != 0:
        if time.time() > deadline:
            raise HostError(f"the S3 server at {url} did not answer within {timeout:.0f}s")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="100mbit", help="tbf rate of the storage host's link (tc syntax)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--preset", default="tiny")
    args = p.parse_args(argv)
    with HostCluster.create(workers=0, head_cpus=0) as hc:
        s3 = hc.add_host("s3", role="client")
        endpoint = f"http://{s3.ip}:{S3_PORT}"
        server = hc.popen("s3", ["moto_server", "-H", s3.ip, "-p", str(S3_PORT)],
                          stdout=open(hc.host_dir("s3") / "moto.log", "w"), stderr=subprocess.STDOUT)
        try:
            wait_for_server(hc, f"{endpoint}/")
            create = (f"import urllib.request; urllib.request.urlopen(urllib.request.Request("
                      f"{endpoint + '/' + BUCKET!r}, method='PUT'), timeout=30).read()")
            hc.run("client", [sys.executable, "-c", create], timeout=60)
            hc.limit("s3", args.rate)
            env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                   "NANOCHAT_HOME": str(nanochat_home())}
            bench = [sys.executable, "benchmarks/checkpoint_upload.py", "--storage", f"s3://{BUCKET}/runs",
                     "--steps", str(args.steps), "--every", str(args.every), "--preset", args.preset]
            out = hc.run("client", bench, env=env, timeout=1800, check=False)
        finally:
            server.kill()
            server.wait()
    print(out.stdout)
    if out.returncode != 0:
        print(out.stderr[-4000:], file=sys.stderr)
        return out.returncode
    print(f"storage: s3://{BUCKET}/runs on an S3-compatible server (moto) behind a tbf-limited link of "
          f"{args.rate} (both ways)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
