"""Real hosts on one Linux machine: a multi-host Ray cluster in namespaces, with lost hosts and cut links.

    python -m cluster.hosts up --workers 2          # head + 2 workers + client, Ray running, token auth
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
- PID: a small init (`python -m cluster.hosts _init`) is its pid 1; killing it kills every process
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
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanochat.errors import NanochatError, entrypoint

PREFIX = "nch-"  # every namespace and cgroup of the harness starts with it
BASE = Path("/var/tmp/nanochat-hosts")  # state files <id>.json and directories <id>/
FREEZER = Path("/sys/fs/cgroup/freezer")
SUBNET = "10.77.0"  # /24; the switch has no address, hosts get .2 (head), .11.. (workers), .100 (client)
SHARED_MOUNT = "/srv"  # where every host sees the shared (NFS stand-in) directory
HOST_HOME = "/home/nanochat"
REPO_ROOT = Path(__file__).resolve().parent.parent
GCS_PORT, DASHBOARD_PORT = 6379, 8265
OBJECT_STORE_BYTES = 256 * 1024**2  # per host: the micro stages need little, and /dev/shm is a 2 GiB tmpfs
CMD_TIMEOUT_S = 60.0  # any single ip/nft/tc/mount command
CLI_NAME = "cli"


class HostError(NanochatError, RuntimeError):
    """The harness cannot do what was asked (not root, a tool missing, a host that does not exist...)."""


# ----------------------------------------------------------------------------- plumbing


def _sh(*cmd: str, check: bool = True, timeout: float = CMD_TIMEOUT_S, input: str | None = None) -> str:
    """Run a root-namespace command (ip, nft, ...) under a timeout; its stdout."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise HostError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s") from None
    if check and out.returncode != 0:
        raise HostError(f"`{' '.join(cmd)}` failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    try:
        text = " ".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children"))
    except OSError:
        return []
    return [int(x) for x in text.split()]


def netns_list() -> list[str]:
    """Names of the network namespaces `ip netns` knows."""
    return [line.split()[0] for line in _sh("ip", "netns", "list").splitlines() if line.strip()]


def root_network() -> dict[str, list[str]]:
    """The root namespace's links and addresses (what the harness must never change), and its
    nftables tables."""
    links = sorted(line.split()[0] for line in _sh("ip", "-br", "link").splitlines() if line.strip())
    addrs = sorted(" ".join(line.split()[:1] + line.split()[2:]) for line in _sh("ip", "-br", "addr").splitlines())
    tables = sorted(_sh("nft", "list", "tables", check=False).splitlines()) if shutil.which("nft") else []
    routes = sorted(_sh("ip", "route").splitlines())
    return {"links": links, "addresses": addrs, "routes": routes, "nft_tables": tables}


def check_requirements() -> None:
    """Root, the tools and the freezer, or a HostError that says what is missing."""
    if os.geteuid() != 0:
        raise HostError("the host harness needs root (network namespaces, cgroups): run it as root")
    missing = [t for t in ("ip", "unshare", "nsenter", "nft", "tc", "mount") if shutil.which(t) is None]
    if missing:
        raise HostError(f"missing tools: {', '.join(missing)} (Debian: apt-get install iproute2 util-linux nftables)")
    if not (FREEZER / "cgroup.procs").exists():
        raise HostError(f"no cgroup v1 freezer at {FREEZER}: freezing hosts needs it")


# ----------------------------------------------------------------------------- the cluster


@dataclass
class Host:
    """One host: its name, address, role and the pid (root namespace) of its init."""

    name: str
    ip: str
    role: str  # head, worker, client
    num_cpus: int = 0
    token: str = "cluster"  # ~/.ray/auth_token: the cluster's token, "none" (no file) or "other" (a wrong one)
    init_pid: int | None = None
    booted_at: float | None = None


@dataclass
class HostCluster:
    """Head, workers and a client host in namespaces; see the module docstring.

    with HostCluster.create(workers=2) as hc:
        hc.start_ray()
        hc.run("client", ["ray", "job", "submit", ...])
        hc.kill("w2"); hc.restart("w2")
    """

    id: str
    hosts: dict[str, Host] = field(default_factory=dict)
    owner_pid: int | None = None  # None: started from the CLI, lives until `down`
    token: str = ""
    ray_env: dict[str, str] = field(default_factory=dict)  # extra environment of every host's commands
    shared_root: str = ""  # stand-in for NFS

    # ------------------------------------------------------------------ names and paths

    @property
    def dir(self) -> Path:
        return BASE / self.id

    @property
    def state_file(self) -> Path:
        return BASE / f"{self.id}.json"

    @property
    def switch_ns(self) -> str:
        return f"{PREFIX}{self.id}-sw"

    def ns(self, host: str) -> str:
        return f"{PREFIX}{self.id}-{host}"

    def cgroup(self, host: str) -> Path:
        return FREEZER / self.ns(host)

    def host_dir(self, host: str) -> Path:
        return self.dir / "hosts" / host

    @property
    def shared(self) -> Path:
        """The shared directory as the root namespace sees it (hosts see it at SHARED_MOUNT)."""
        return self.dir / "shared"

    @property
    def head(self) -> Host:
        return next(h for h in self.hosts.values() if h.role == "head")

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            raise HostError(f"no host {name!r} in cluster {self.id} (hosts: {', '.join(self.hosts)})")
        return self.hosts[name]

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def create(cls, workers: int = 2, *, head_cpus: int = 1, worker_cpus: int = 1, owned: bool = True,
               cluster_id: str | None = None, timeout_s: float = 120.0) -> HostCluster:
        """Make the switch, head, `workers` worker hosts (w1, w2, ...) and the client; Ray not yet started.
        Leftovers of crashed runs are removed first; on any failure everything made so far is removed."""
        check_requirements()
        if workers < 0 or workers > 80:
            raise HostError(f"workers must be 0..80, got {workers}")
        if cluster_id is not None and not re.fullmatch(r"[a-z0-9]{1,12}", cluster_id):
            raise HostError(f"cluster id {cluster_id!r}: use 1 to 12 lowercase letters or digits")
        cleanup_stale()
        hc = cls(id=cluster_id or secrets.token_hex(3), owner_pid=os.getpid() if owned else None,
                 token=secrets.token_hex(32))
        if hc.state_file.exists():
            raise HostError(f"a host cluster {hc.id!r} is already up ({hc.state_file}): `python -m cluster.hosts "
                            "down` first")
        hc.hosts = {"head": Host("head", f"{SUBNET}.2", "head", head_cpus)}
        for i in range(1, workers + 1):
            hc.hosts[f"w{i}"] = Host(f"w{i}", f"{SUBNET}.{10 + i}", "worker", worker_cpus)
        hc.hosts["client"] = Host("client", f"{SUBNET}.100", "client")
        hc.shared_root = str(hc.shared)
        try:
            hc.save()  # before anything exists: a crash from here on is found by the next start
            hc.shared.mkdir(parents=True)
            _sh("ip", "netns", "add", hc.switch_ns)
            _sh("ip", "-n", hc.switch_ns, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", hc.switch_ns, "link", "set", "br0", "up")
            deadline = time.time() + timeout_s
            for host in list(hc.hosts.values()):
                hc._boot(host, deadline)
        except BaseException:
            hc.destroy()
            raise
        return hc

    def add_host(self, name: str, *, role: str = "worker", num_cpus: int = 1, token: str = "cluster",
                 timeout_s: float = 60.0) -> Host:
        """Another host on the switch (e.g. one without the token); Ray not started on it."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name):  # its switch port v-<name> must fit 15 characters
            raise HostError(f"host name {name!r}: use 1 to 12 lowercase letters or digits, a letter first")
        if name in self.hosts:
            raise HostError(f"host {name!r} already exists")
        if token not in ("cluster", "none", "other"):
            raise HostError(f"token must be cluster, none or other, got {token!r}")
        used = {h.ip for h in self.hosts.values()}
        ip = next(f"{SUBNET}.{n}" for n in range(30, 250) if f"{SUBNET}.{n}" not in used)
        host = self.hosts[name] = Host(name, ip, role, num_cpus, token)
        self.save()
        self._boot(host, time.time() + timeout_s)
        return host

    def _boot(self, host: Host, deadline: float) -> None:
        """Namespace, cable, address, directories, token, freezer cgroup and init of one host."""
        ns = self.ns(host.name)
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", self.switch_ns, "link", "add", f"v-{host.name}", "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _sh("ip", "-n", self.switch_ns, "link", "set", f"v-{host.name}", "master", "br0", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        hdir = self.host_dir(host.name)
        shutil.rmtree(hdir, ignore_errors=True)  # a restarted host starts with empty disks
        for sub in ("tmp", "home/nanochat/.ray", "shm"):
            (hdir / sub).mkdir(parents=True)
        (hdir / "tmp").chmod(0o1777)
        if host.token != "none":
            token_file = hdir / "home/nanochat/.ray/auth_token"
            token_file.write_text(self.token if host.token == "cluster" else secrets.token_hex(32))
            token_file.chmod(0o600)
        (hdir / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{h.ip} nch-{h.name}\n" for h in self.hosts.values()))
        self.cgroup(host.name).mkdir(exist_ok=True)
        ready = hdir / "ready"
        ready.unlink(missing_ok=True)
        spec = {"hostname": f"nch-{host.name}", "ready": str(ready), "hide": str(BASE),
                "binds": [[str(hdir / "tmp"), "/tmp"], [str(hdir / "home"), "/home"],
                          [str(self.shared), SHARED_MOUNT], [str(hdir / "hosts"), "/etc/hosts"]]}
        cgroup_procs = str(self.cgroup(host.name) / "cgroup.procs")
        log = open(hdir.parent / f"{host.name}.init.log", "ab")  # noqa: SIM115 (kept by the child only)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--mount-proc", "--uts", "--mount",
             "--propagation", "private", sys.executable, "-m", "cluster.hosts", "_init", json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO_ROOT, start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": str(REPO_ROOT)},
            preexec_fn=lambda: Path(cgroup_procs).write_text(str(os.getpid())))
        log.close()
        host.init_pid = None
        while time.time() < deadline:
            kids = _children(proc.pid)
            if kids and ready.exists() and ready.read_text() == "ready":
                host.init_pid = kids[0]
                break
            if proc.poll() is not None:
                raise HostError(f"host {host.name}: its init exited ({proc.returncode}); see "
                                f"{hdir.parent / (host.name + '.init.log')}")
            time.sleep(0.05)
        if host.init_pid is None:
            raise HostError(f"host {host.name} did not come up in time")
        host.booted_at = time.time()
        self.save()

    def save(self) -> None:
        BASE.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, cluster_id: str) -> HostCluster:
        path = BASE / f"{cluster_id}.json"
        if not path.is_file():
            raise HostError(f"no host cluster {cluster_id!r} is up (no {path}): `python -m cluster.hosts up`")
        data = json.loads(path.read_text())
        data["hosts"] = {k: Host(**v) for k, v in data["hosts"].items()}
        return cls(**data)

    def __enter__(self) -> HostCluster:
        self._old_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def stop(signum, frame):  # Ctrl-C or a kill: clean up, then behave as before
            self.destroy()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        for s in self._old_handlers:
            signal.signal(s, stop)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self.destroy()

    def destroy(self) -> None:
        """Remove everything of this cluster (idempotent): processes, namespaces, cgroups, directories."""
        for name in list(self.hosts):
            self._power_off(name)
        if self.switch_ns in netns_list():
            _sh("ip", "netns", "del", self.switch_ns, check=False)
        for cg in FREEZER.glob(f"{PREFIX}{self.id}-*"):
            _rmdir_cgroup(cg)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ commands on a host

    def env(self, host: str) -> dict[str, str]:
        """The environment of a command on `host`."""
        venv_bin = str(Path(sys.executable).parent)
        return {"PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": HOST_HOME, "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO_ROOT),
                "RAY_AUTH_MODE": "token", "GLOO_SOCKET_IFNAME": "eth0", "RAY_USAGE_STATS_ENABLED": "0",
                # every host sees the whole machine's memory, used by all hosts (and anything else running):
                # Ray's per-node OOM killer would act on the others' usage, so it is off
                "RAY_memory_monitor_refresh_ms": "0",
                "HOSTNAME": f"nch-{host}", **self.ray_env}

    def _nsenter(self, host: str, cmd: Sequence[str], cwd: str) -> list[str]:
        h = self.host(host)
        if not _pid_alive(h.init_pid):
            raise HostError(f"host {host} is down (killed or never booted)")
        return ["nsenter", "-t", str(h.init_pid), "-n", "-p", "-u", "-m", f"--wd={cwd}", "--", *cmd]

    def popen(self, host: str, cmd: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
              **kw) -> subprocess.Popen:
        """Start `cmd` on `host` (in all its namespaces and its freezer cgroup)."""
        procs = str(self.cgroup(host) / "cgroup.procs")
        return subprocess.Popen(self._nsenter(host, cmd, cwd or str(REPO_ROOT)), env={**self.env(host), **(env or {})},
                                preexec_fn=lambda: Path(procs).write_text(str(os.getpid())), **kw)

    def run(self, host: str, cmd: Sequence[str], *, timeout: float = 120.0, check: bool = True,
            cwd: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` on `host` to its end (killed after `timeout` seconds); stdout and stderr captured."""
        proc = self.popen(host, cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise HostError(f"`{' '.join(cmd)}` on {host} did not finish within {timeout:.0f}s:\n{(out + err)[-2000:]}")\
                from None
        done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise HostError(f"`{' '.join(cmd)}` on {host} failed (exit {proc.returncode}):\n{(out + err)[-3000:]}")
        return done

    def processes(self, host: str) -> list[int]:
        """Pids (root namespace) of every process of `host`."""
        try:
            return [int(p) for p in (self.cgroup(host) / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    # ------------------------------------------------------------------ Ray on the hosts

    def start_ray(self, hosts: Sequence[str] | None = None, timeout: float = 180.0) -> None:
        """`ray start` on the head (if listed or not yet up) and on each worker host."""
        names = list(hosts) if hosts is not None else [h.name for h in self.hosts.values() if h.role != "client"]
        names.sort(key=lambda n: self.hosts[n].role != "head")
        for name in names:
            self.run(name, self.ray_start_command(name), timeout=timeout)

    def ray_start_command(self, host: str) -> list[str]:
        h = self.host(host)
        common = [f"--node-ip-address={h.ip}", f"--num-cpus={h.num_cpus}", "--num-gpus=0", "--temp-dir=/tmp/ray",
                  "--disable-usage-stats",
                  f"--object-store-memory={OBJECT_STORE_BYTES}", f"--resources={json.dumps({'host_' + host: 1})}"]
        if h.role == "head":
            return ["ray", "start", "--head", f"--port={GCS_PORT}", f"--dashboard-host={h.ip}",
                    f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true", *common]
        return ["ray", "start", f"--address={self.head.ip}:{GCS_PORT}", *common]

    def nodes(self, via: str = "client", timeout: float = 60.0) -> list[tuple[str, str, str]]:
        """(node ip, state, node id) of every node the head's GCS knows, dead ones included
        (`ray list nodes`, run on `via`)."""
        out = self.run(via, ["ray", "list", "nodes", "--address", self.dashboard_url, "--format", "json", "--limit",
                             "200"], timeout=timeout)
        return [(n["node_ip"], n["state"], n["node_id"]) for n in json.loads(out.stdout)]

    def alive_ips(self, via: str = "client") -> list[str]:
        return sorted(ip for ip, state, _ in self.nodes(via) if state == "ALIVE")

    # ------------------------------------------------------------------ failures

    def kill(self, host: str) -> float:
        """Power loss: SIGKILL the host's init (the kernel kills every process of its PID namespace)
        and pull its cable; the time of the kill. `restart` brings a fresh host with the same address."""
        t = time.time()
        self._power_off(host)
        return t

    def _power_off(self, host: str) -> None:
        h = self.hosts.get(host)
        ns = self.ns(host)
        if h is not None and _pid_alive(h.init_pid):
            try:
                os.kill(h.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cg = self.cgroup(host)
        if cg.exists():
            for pid in self.processes(host):  # nsenter'd commands that are outside the PID namespace's tree
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            (cg / "freezer.state").write_text("THAWED")  # a frozen process dies only once thawed
            deadline = time.time() + 30
            while self.processes(host) and time.time() < deadline:
                time.sleep(0.05)
        if ns in netns_list():
            _sh("ip", "netns", "del", ns, check=False)  # its eth0 and the switch's end of the cable go with it
        if h is not None:
            h.init_pid = None
        if self.state_file.exists():
            self.save()

    def restart(self, host: str, *, start_ray: bool = True, timeout_s: float = 120.0) -> float:
        """A fresh host with the same name, address and role (empty /tmp and HOME, the token again),
        Ray started on it; the time it was back."""
        h = self.host(host)
        self._power_off(host)
        _rmdir_cgroup(self.cgroup(host))
        self._boot(h, time.time() + timeout_s)
        if start_ray and h.role != "client":
            self.run(host, self.ray_start_command(host), timeout=timeout_s)
        return time.time()

    def _switch_port(self, host: str) -> str:
        self.host(host)
        return f"v-{host}"

    def cut(self, host: str) -> float:
        """Unplug the host's cable at the switch (its processes run on, unreachable)."""
        _sh("ip", "-n", self.switch_ns, "link", "set", self._switch_port(host), "down")
        return time.time()

    def restore(self, host: str) -> float:
        _sh("ip", "-n", self.switch_ns, "link", "set", self._switch_port(host), "up")
        return time.time()

    def limit(self, host: str, rate: str) -> None:
        """Token-bucket bandwidth limit (tc tbf) both ways, e.g. rate="1mbit"; "0" removes it."""
        port = self._switch_port(host)
        for ns, dev in ((self.ns(host), "eth0"), (self.switch_ns, port)):
            if rate in ("0", "", "none"):
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            else:
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", "32kbit", "latency", "400ms")

    def drop(self, host: str, percent: float) -> None:
        """Drop `percent` % of the host's packets at random, both ways (an nftables table in its
        namespace); 0 removes it."""
        if not 0 <= percent <= 100:
            raise HostError(f"percent must be within 0..100, got {percent}")
        ns = self.ns(host)
        self.host(host)
        _sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "nch_drop", check=False)
        if percent > 0:
            share = min(10_000, int(round(percent * 100)))  # in 1/100 %: numgen's modulus must exceed it
            match = "" if share >= 10_000 else f"numgen random mod 10000 < {share} "
            rules = (f"table inet nch_drop {{\n"
                     f" chain input {{ type filter hook input priority 0; iifname \"eth0\" {match}drop; }}\n"
                     f" chain output {{ type filter hook output priority 0; oifname \"eth0\" {match}drop; }}\n"
                     f"}}\n")
            _sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=rules)

    def freeze(self, host: str) -> float:
        """Stop every process of the host (cgroup freezer): it holds its sockets but answers nothing."""
        self.host(host)
        (self.cgroup(host) / "freezer.state").write_text("FROZEN")
        return time.time()

    def thaw(self, host: str) -> float:
        self.host(host)
        (self.cgroup(host) / "freezer.state").write_text("THAWED")
        return time.time()

    def status(self) -> str:
        lines = [f"host cluster {self.id} (state {self.state_file}; shared dir {self.shared} = {SHARED_MOUNT} "
                 f"on the hosts; owner {'pid ' + str(self.owner_pid) if self.owner_pid else 'the CLI'})",
                 f"dashboard (from the client host): {self.dashboard_url}"]
        for h in self.hosts.values():
            state = "up" if _pid_alive(h.init_pid) else "down"
            if state == "up":
                try:
                    freezer = (self.cgroup(h.name) / "freezer.state").read_text().strip()
                except OSError:
                    freezer = "?"
                if freezer != "THAWED":
                    state = "frozen"
                link = _sh("ip", "-n", self.switch_ns, "-br", "link", "show", f"v-{h.name}", check=False).split()
                if len(link) > 1 and link[1] == "DOWN":
                    state += ", cable cut"
            lines.append(f"  {h.name:8s} {h.ip:12s} {h.role:7s} cpus {h.num_cpus}  {state}  "
                         f"{len(self.processes(h.name))} processes{'' if h.token == 'cluster' else f'  (token: {h.token})'}")
        return "\n".join(lines)


def _rmdir_cgroup(cg: Path) -> None:
    if not cg.exists():
        return
    try:
        (cg / "freezer.state").write_text("THAWED")
    except OSError:
        pass
    deadline = time.time() + 30
    while True:
        try:
            for pid in (cg / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.time() > deadline:
                raise HostError(f"cgroup {cg} still holds processes after 30 s") from None
            time.sleep(0.1)


def cleanup_stale(everything: bool = False) -> list[str]:
    """Remove clusters whose owner process is gone (all of them if `everything`), and any namespace or
    cgroup with the harness's prefix that no live cluster owns; the ids removed."""
    removed = []
    live = set()
    for path in sorted(BASE.glob("*.json")) if BASE.is_dir() else []:
        try:
            hc = HostCluster.load(path.stem)
        except (OSError, ValueError, TypeError, HostError):
            path.unlink(missing_ok=True)
            continue
        if everything or (hc.owner_pid is not None and not _pid_alive(hc.owner_pid)):
            hc.destroy()
            removed.append(hc.id)
        else:
            live.add(hc.id)
    for ns in netns_list():
        if ns.startswith(PREFIX) and ns[len(PREFIX):].split("-")[0] not in live:
            for pid in _sh("ip", "netns", "pids", ns, check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    for cg in FREEZER.glob(f"{PREFIX}*") if FREEZER.is_dir() else []:
        if cg.name[len(PREFIX):].split("-")[0] not in live:
            _rmdir_cgroup(cg)
            removed.append(cg.name)
    for d in BASE.iterdir() if BASE.is_dir() else []:
        if d.is_dir() and d.name not in live:
            shutil.rmtree(d, ignore_errors=True)
    return removed


def harness_leftovers() -> list[str]:
    """Whatever of any harness run still exists: namespaces, cgroups, state files, directories, processes
    running inside a harness namespace (empty when all is clean)."""
    left = [f"netns {n}" for n in netns_list() if n.startswith(PREFIX)]
    left += [f"cgroup {c.name}" for c in FREEZER.glob(f"{PREFIX}*")] if FREEZER.is_dir() else []
    left += [f"path {p}" for p in BASE.iterdir()] if BASE.is_dir() else []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"cluster.hosts\0_init" in cmd:
                left.append(f"process {proc.name} {cmd[:80]!r}")
    return left


@contextmanager
def host_cluster(workers: int = 2, **kw) -> Iterator[HostCluster]:
    """A HostCluster for the duration of a `with` block (removed after, also on errors and Ctrl-C)."""
    hc = HostCluster.create(workers, **kw)
    with hc:
        yield hc


# ----------------------------------------------------------------------------- the host's init


def _init(spec: dict) -> None:
    """pid 1 of a host: hostname, mounts, then reap orphans until killed."""
    ready = open(spec["ready"], "w")  # noqa: SIM115 (opened before /var/tmp is hidden)
    socket.sethostname(spec["hostname"])
    for src, dest in spec["binds"]:
        subprocess.run(["mount", "--bind", src, dest], check=True, timeout=30)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "shm", "/dev/shm"], check=True, timeout=30)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "hidden", spec["hide"]], check=True, timeout=30)
    ready.write("ready")
    ready.close()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.5)


# ----------------------------------------------------------------------------- CLI


def _cli_cluster(cluster_id: str) -> HostCluster:
    return HostCluster.load(cluster_id)


@entrypoint
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_init"]:
        _init(json.loads(argv[1]))
        return 0
    p = argparse.ArgumentParser(prog="python -m cluster.hosts", description=__doc__.splitlines()[0])
    p.add_argument("--cluster", default=CLI_NAME, help="cluster id (default: the CLI's cluster, 'cli')")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="head + workers + client, Ray started on them")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--head-cpus", type=int, default=1)
    up.add_argument("--worker-cpus", type=int, default=1)
    up.add_argument("--no-ray", action="store_true", help="only the hosts, without Ray")
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
        hc = HostCluster.create(args.workers, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus,
                                owned=False, cluster_id=args.cluster)
        try:
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
