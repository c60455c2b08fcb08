"""Real hosts on one Linux machine: a multi-host Ray cluster in namespaces, with lost hosts and cut links.

    python -m cluster.hosts up --workers 2          # head + 2 workers + client, Ray running, token auth
    python -m cluster.hosts up --workers 3 --resources w1=learner_host:1 --resources w2,w3=rollout_host:1
                                                    # custom Ray resources per host, as node types declare
    python -m cluster.hosts status
    python -m cluster.hosts run client -- ray job submit --address http://10.77.0.2:8265 -- python -c 1
    python -m cluster.hosts kill w1                 # power loss: every process of the host at once
    python -m cluster.hosts restart w1              # a fresh host with the same name and address rejoins
    python -m cluster.hosts cut w1 / restore w1     # its cable out of the switch / back in
    python -m cluster.hosts limit w1 --rate 1mbit   # tbf both ways; `limit w1 --rate 0` removes it
    python -m cluster.hosts drop w1 --percent 30    # nftables random drop both ways; 0 removes it
    python -m cluster.hosts freeze w1 / thaw w1     # cgroup freezer: a hung host
    python -m cluster.hosts down                    # everything of the cluster removed
    python -m cluster.hosts cleanup                 # every leftover of any crashed harness run removed

Needs root (namespaces, cgroups), `ip` (iproute2), `unshare`/`nsenter` (util-linux), `nft` (nftables)
and the cgroup v1 freezer. Each host is a network + PID + UTS + mount namespace:
- network: its own `eth0` with an address on 10.77.0.0/24, cabled to a bridge that lives in a
  switch namespace of its own; no default route, so no packet can leave the namespaces the harness
  made. The root namespace gets no link, address, route or nftables rule, ever.
- PID: a small init (`python -m cluster.netns _init`) is its pid 1; killing it kills every process
  of the host at once, as a power loss does.
- UTS: its own hostname (`nch-<host>`); /etc/hosts names every host of the cluster, as a VPC's DNS would.
- mount: private /tmp, /dev/shm and HOME (/home/nanochat), and one shared directory mounted at
  /srv on every host: the NFS stand-in, the only storage all hosts see. The harness's own directory
  is hidden from the hosts.
Each host also gets a freezer cgroup holding all its processes (freeze, and the proof that none
is left after). Ray runs on each host with `--node-ip-address`, its own temp dir in its private
/tmp, the default ports (each host has its own port space), RAY_AUTH_MODE=token and the cluster's
token in ~/.ray/auth_token (0600); GLOO_SOCKET_IFNAME=eth0 for collectives.

Bookkeeping: every name starts with `nch-<id>` (namespaces, cgroups) and every cluster has a state
file in /var/tmp/nanochat-hosts/<id>.json written BEFORE anything is created. A cluster whose owner
process is gone (a crashed test) is removed by the next `HostCluster.start()` of any cluster; one
started from this CLI is owned by nobody and stays until `down` or `cleanup`. Every external command
runs under a timeout; `HostCluster` is a context manager and also cleans up on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import time

from cluster.host_cluster import HostCluster, cleanup_stale
from cluster.netns import HostError
from nanochat.errors import entrypoint

CLI_NAME = "cli"


def _cli_cluster(cluster_id: str) -> HostCluster:
    return HostCluster.load(cluster_id)


def parse_host_resources(items: list[str], hosts: list[str]) -> dict[str, dict[str, float]]:
    """`["w1=learner_host:1", "w2,w3=rollout_host:1,x:2"]` -> {host: {resource: amount}}; HostError
    naming the problem for an unknown host, a reserved name or a bad amount."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        names, _, spec = item.partition("=")
        pairs = [p.partition(":") for p in spec.split(",") if p]
        if not names or not pairs:
            raise HostError(f"--resources {item!r}: use HOST[,HOST]=NAME:AMOUNT[,NAME:AMOUNT]")
        for host in names.split(","):
            if host not in hosts:
                raise HostError(f"--resources {item!r}: no host {host!r} (hosts: {', '.join(hosts)})")
            for name, _, amount in pairs:
                reserved = name in ("CPU", "GPU", "memory", "object_store_memory")
                if reserved or name.startswith(("node:", "host_")):
                    raise HostError(f"--resources {item!r}: {name!r} is set by the harness or Ray itself")
                try:
                    value = float(amount)
                except ValueError:
                    value = -1.0
                if not value > 0:
                    raise HostError(f"--resources {item!r}: amount of {name!r} must be a number > 0")
                out.setdefault(host, {})[name] = value
    return out


@entrypoint
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m cluster.hosts", description=__doc__.splitlines()[0])
    p.add_argument("--cluster", default=CLI_NAME, help="cluster id (default: the CLI's cluster, 'cli')")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="head + workers + client, Ray started on them")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--head-cpus", type=int, default=1)
    up.add_argument("--worker-cpus", type=int, default=1)
    up.add_argument("--no-ray", action="store_true", help="only the hosts, without Ray")
    up.add_argument("--resources", action="append", default=[], metavar="HOST[,HOST]=NAME:AMOUNT[,...]",
                    help="custom Ray resources a worker host declares (repeatable), e.g. w2=rollout_host:1")
    sub.add_parser("down", help="remove the cluster")
    sub.add_parser("status")
    sub.add_parser("cleanup", help="remove every harness leftover (all clusters, crashed or not)")
    for name in ("kill", "restart", "cut", "restore", "freeze", "thaw"):
        sub.add_parser(name).add_argument("host")
    lim = sub.add_parser("limit")
    lim.add_argument("host")
    lim.add_argument("--rate", required=True, help="e.g. 1mbit, 500kbit; 0 removes the limit")
    drp = sub.add_parser("drop")
    drp.add_argument("host")
    drp.add_argument("--percent", type=float, required=True)
    run = sub.add_parser("run", help="run a command on a host: run HOST -- CMD ...")
    run.add_argument("host")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)

    if args.command == "cleanup":
        removed = cleanup_stale(everything=True)
        print(f"removed: {', '.join(removed) or 'nothing'}")
        return 0
    if args.command == "up":
        names = ["head", *(f"w{i}" for i in range(1, args.workers + 1))]
        resources = parse_host_resources(args.resources, names)  # before anything is made
        hc = HostCluster.create(args.workers, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus,
                                owned=False, cluster_id=args.cluster)
        try:
            for host, res in resources.items():
                hc.host(host).resources = res
            hc.save()
            if not args.no_ray:
                hc.start_ray()
        except BaseException:
            hc.destroy()
            raise
        print(hc.status())
        return 0
    hc = _cli_cluster(args.cluster)
    if args.command == "down":
        hc.destroy()
        print(f"host cluster {hc.id} removed")
    elif args.command == "status":
        print(hc.status())
    elif args.command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise HostError("run HOST -- COMMAND: no command given")
        return hc.popen(args.host, cmd).wait()
    elif args.command in ("limit",):
        hc.limit(args.host, args.rate)
    elif args.command == "drop":
        hc.drop(args.host, args.percent)
    else:
        t = getattr(hc, args.command)(args.host)
        print(f"{args.command} {args.host} at {time.strftime('%H:%M:%S', time.localtime(t))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
