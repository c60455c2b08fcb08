"""The host cluster: head, workers and a client host on one Linux machine, Ray on them, and the failures
done to them (power loss, cut or slow or lossy cable, a hung host); see cluster/hosts.py for the layout
of a host and the command line.

HostCluster keeps the bookkeeping (names, addresses, the state file written before anything is made);
the Linux plumbing it calls (namespaces, cables, cgroups, the hosts' init) is cluster/netns.py.
The file is over 500 lines, kept whole: one class, the lifecycle of the hosts and of Ray on them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.netns import (
    BASE,
    FREEZER,
    PREFIX,
    REPO_ROOT,
    HostError,
    add_cabled_ns,
    add_switch,
    cgroup_pids,
    check_requirements,
    drop_random,
    kill,
    kill_cgroup,
    netns_list,
    pid_alive,
    rmdir_cgroup,
    sh,
    shape,
    start_init,
)

SUBNET = "10.77.0"  # /24; the switch has no address, hosts get .2 (head), .11.. (workers), .100 (client)
SHARED_MOUNT = "/srv"  # where every host sees the shared (NFS stand-in) directory
HOST_HOME = "/home/nanochat"
GCS_PORT, DASHBOARD_PORT = 6379, 8265
START_ATTEMPTS = 4  # `ray start` per host, see start_ray
OBJECT_STORE_BYTES = 256 * 1024**2  # per host: the micro stages need little, and /dev/shm is a 2 GiB tmpfs


# ----------------------------------------------------------------------------- the cluster


@dataclass
class Host:
    """One host: its name, address, role and the pid (root namespace) of its init."""

    name: str
    ip: str
    role: str  # head, worker, client
    num_cpus: int = 0
    # ~/.ray/auth_token: the cluster's token, "none" (no file) or "other" (a wrong one)
    token: str = "cluster"
    init_pid: int | None = None
    booted_at: float | None = None
    # custom Ray resources its `ray start` declares besides host_<name> (as a cluster.yaml node type's
    # `resources:`), e.g. {"rollout_host": 1}; kept across a restart
    resources: dict[str, float] = field(default_factory=dict)


def _repo_visible(binds: list[list[str]], repo: Path) -> list[list[str]]:
    """The host's binds, with the repository mounted first into the directory that will cover its
    path (a clone under /tmp or /home, as CI's, would else be hidden inside the host: its Python
    path and working directory gone, Ray's dashboard modules died at start). The binds are
    recursive (netns._init), so the covering bind carries the repository's mount along."""
    for source, dest in binds:
        if repo.is_relative_to(dest):
            inside = Path(source) / repo.relative_to(dest)
            inside.mkdir(parents=True, exist_ok=True)
            return [[str(repo), str(inside)], *binds]
    return binds


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
            raise HostError(f"a host cluster {hc.id!r} is already up ({hc.state_file}): "
                            "`python -m cluster.hosts down` first")
        hc.hosts = {"head": Host("head", f"{SUBNET}.2", "head", head_cpus)}
        for i in range(1, workers + 1):
            hc.hosts[f"w{i}"] = Host(f"w{i}", f"{SUBNET}.{10 + i}", "worker", worker_cpus)
        hc.hosts["client"] = Host("client", f"{SUBNET}.100", "client")
        hc.shared_root = str(hc.shared)
        try:
            hc.save()  # before anything exists: a crash from here on is found by the next start
            hc.shared.mkdir(parents=True)
            add_switch(hc.switch_ns)
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
        add_cabled_ns(ns, self.switch_ns, f"v-{host.name}", f"{host.ip}/24")
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
        binds = [[str(hdir / "tmp"), "/tmp"], [str(hdir / "home"), "/home"],
                 [str(self.shared), SHARED_MOUNT], [str(hdir / "hosts"), "/etc/hosts"]]
        spec = {"hostname": f"nch-{host.name}", "ready": str(hdir / "ready"), "hide": str(BASE),
                "binds": _repo_visible(binds, REPO_ROOT.resolve())}
        host.init_pid = None
        host.init_pid = start_init(host.name, ns, spec, self.cgroup(host.name),
                                   hdir.parent / f"{host.name}.init.log", deadline)
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
            sh("ip", "netns", "del", self.switch_ns, check=False)
        for cg in FREEZER.glob(f"{PREFIX}{self.id}-*"):
            rmdir_cgroup(cg)
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
        if not pid_alive(h.init_pid):
            raise HostError(f"host {host} is down (killed or never booted)")
        return ["nsenter", "-t", str(h.init_pid), "-n", "-p", "-u", "-m", f"--wd={cwd}", "--", *cmd]

    def popen(self, host: str, cmd: Sequence[str], *, cwd: str | None = None,
              env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        """Start `cmd` on `host` (in all its namespaces and its freezer cgroup)."""
        procs = str(self.cgroup(host) / "cgroup.procs")
        return subprocess.Popen(self._nsenter(host, cmd, cwd or str(REPO_ROOT)),
                                env={**self.env(host), **(env or {})},
                                preexec_fn=lambda: Path(procs).write_text(str(os.getpid())), **kw)

    def run(self, host: str, cmd: Sequence[str], *, timeout: float = 120.0, check: bool = True,
            cwd: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` on `host` to its end (killed after `timeout` seconds); stdout and stderr captured."""
        proc = self.popen(host, cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, stdin=subprocess.DEVNULL)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise HostError(f"`{' '.join(cmd)}` on {host} did not finish within {timeout:.0f}s:\n"
                            f"{(out + err)[-2000:]}") from None
        done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise HostError(f"`{' '.join(cmd)}` on {host} failed (exit {proc.returncode}):\n"
                            f"{(out + err)[-3000:]}")
        return done

    def processes(self, host: str) -> list[int]:
        """Pids (root namespace) of every process of `host`."""
        return cgroup_pids(self.cgroup(host))

    # ------------------------------------------------------------------ Ray on the hosts

    def start_ray(self, hosts: Sequence[str] | None = None, timeout: float = 180.0) -> None:
        """`ray start` on the head (if listed or not yet up) and on each worker host."""
        names = (list(hosts) if hosts is not None
                 else [h.name for h in self.hosts.values() if h.role != "client"])
        names.sort(key=lambda n: self.hosts[n].role != "head")
        for name in names:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    self.run(name, self.ray_start_command(name), timeout=timeout)
                    break
                except HostError as e:
                    # retried, as a cluster launcher would: on an overloaded machine a head's dashboard
                    # module has been seen to die while starting ("Module MetricsHead failed to start.
                    # Received EOF from pipe."); the error carries Ray's own logs of that host
                    logs = self.ray_log_tails(name)
                    self.run(name, ["ray", "stop", "--force"], check=False, timeout=timeout)
                    if attempt == START_ATTEMPTS:
                        raise HostError(f"{e}\n{logs}") from None
                    print(f"hosts: ray start on {name} failed (attempt {attempt} of {START_ATTEMPTS}), "
                          f"retrying:\n{logs}", file=sys.stderr, flush=True)
                    time.sleep(5.0 * attempt)

    def ray_log_tails(self, host: str, lines: int = 15) -> str:
        """The last lines of the Ray logs that explain a failed start on `host` (its newest session)."""
        # not session_latest: an absolute link to /tmp/ray/session_..., which is the host's own /tmp
        # inside its namespace and nowhere (or another machine's Ray) seen from here
        sessions = sorted((self.host_dir(host) / "tmp" / "ray").glob("session_2*"))
        logs = (sessions[-1] if sessions else self.host_dir(host) / "tmp" / "ray" / "session_latest") / "logs"
        names = ["dashboard.log", "dashboard.err", "gcs_server.err", "raylet.err"]
        found = [logs / n for n in names] + sorted(logs.glob("dashboard_*.log")) if logs.is_dir() else []
        parts = []
        for path in found:
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                parts.append(f"--- {host}:{path.relative_to(self.host_dir(host))} (last {len(tail)} lines)\n"
                             + "\n".join(tail))
        return "\n".join(parts) or f"(no Ray logs found under {logs})"

    def ray_start_command(self, host: str) -> list[str]:
        h = self.host(host)
        common = [f"--node-ip-address={h.ip}", f"--num-cpus={h.num_cpus}", "--num-gpus=0",
                  "--temp-dir=/tmp/ray", "--disable-usage-stats",
                  f"--object-store-memory={OBJECT_STORE_BYTES}",
                  f"--resources={json.dumps({'host_' + host: 1, **h.resources})}"]
        if h.role == "head":
            return ["ray", "start", "--head", f"--port={GCS_PORT}", f"--dashboard-host={h.ip}",
                    f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true", *common]
        return ["ray", "start", f"--address={self.head.ip}:{GCS_PORT}", *common]

    def nodes(self, via: str = "client", timeout: float = 60.0) -> list[tuple[str, str, str]]:
        """(node ip, state, node id) of every node the head's GCS knows, dead ones included
        (`ray list nodes`, run on `via`)."""
        out = self.run(via, ["ray", "list", "nodes", "--address", self.dashboard_url, "--format", "json",
                             "--limit", "200"], timeout=timeout)
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
        if h is not None and pid_alive(h.init_pid):
            kill(h.init_pid)
        kill_cgroup(self.cgroup(host))
        if ns in netns_list():
            sh("ip", "netns", "del", ns, check=False)  # its eth0 and the switch's end of the cable go with it
        if h is not None:
            h.init_pid = None
        if self.state_file.exists():
            self.save()

    def restart(self, host: str, *, start_ray: bool = True, timeout_s: float = 120.0) -> float:
        """A fresh host with the same name, address and role (empty /tmp and HOME, the token again),
        Ray started on it; the time it was back."""
        h = self.host(host)
        self._power_off(host)
        rmdir_cgroup(self.cgroup(host))
        self._boot(h, time.time() + timeout_s)
        if start_ray and h.role != "client":
            self.run(host, self.ray_start_command(host), timeout=timeout_s)
        return time.time()

    def _switch_port(self, host: str) -> str:
        self.host(host)
        return f"v-{host}"

    def cut(self, host: str) -> float:
        """Unplug the host's cable at the switch (its processes run on, unreachable)."""
        sh("ip", "-n", self.switch_ns, "link", "set", self._switch_port(host), "down")
        return time.time()

    def restore(self, host: str) -> float:
        sh("ip", "-n", self.switch_ns, "link", "set", self._switch_port(host), "up")
        return time.time()

    def limit(self, host: str, rate: str) -> None:
        """Token-bucket bandwidth limit (tc tbf) both ways, e.g. rate="1mbit"; "0" removes it."""
        port = self._switch_port(host)
        for ns, dev in ((self.ns(host), "eth0"), (self.switch_ns, port)):
            shape(ns, dev, rate)

    def drop(self, host: str, percent: float) -> None:
        """Drop `percent` % of the host's packets at random, both ways (an nftables table in its
        namespace); 0 removes it."""
        if not 0 <= percent <= 100:
            raise HostError(f"percent must be within 0..100, got {percent}")
        ns = self.ns(host)
        self.host(host)
        drop_random(ns, percent)

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
        lines = [f"host cluster {self.id} (state {self.state_file}; shared dir {self.shared} = "
                 f"{SHARED_MOUNT} on the hosts; "
                 f"owner {'pid ' + str(self.owner_pid) if self.owner_pid else 'the CLI'})",
                 f"dashboard (from the client host): {self.dashboard_url}"]
        for h in self.hosts.values():
            state = "up" if pid_alive(h.init_pid) else "down"
            if state == "up":
                try:
                    freezer = (self.cgroup(h.name) / "freezer.state").read_text().strip()
                except OSError:
                    freezer = "?"
                if freezer != "THAWED":
                    state = "frozen"
                link = sh("ip", "-n", self.switch_ns, "-br", "link", "show", f"v-{h.name}",
                          check=False).split()
                if len(link) > 1 and link[1] == "DOWN":
                    state += ", cable cut"
            lines.append(f"  {h.name:8s} {h.ip:12s} {h.role:7s} cpus {h.num_cpus}  {state}  "
                         f"{len(self.processes(h.name))} processes"
                         f"{'' if h.token == 'cluster' else f'  (token: {h.token})'}")
        return "\n".join(lines)


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
        if everything or (hc.owner_pid is not None and not pid_alive(hc.owner_pid)):
            hc.destroy()
            removed.append(hc.id)
        else:
            live.add(hc.id)
    for ns in netns_list():
        if ns.startswith(PREFIX) and ns[len(PREFIX):].split("-")[0] not in live:
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                kill(int(pid))
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    for cg in FREEZER.glob(f"{PREFIX}*") if FREEZER.is_dir() else []:
        if cg.name[len(PREFIX):].split("-")[0] not in live:
            rmdir_cgroup(cg)
            removed.append(cg.name)
    for d in BASE.iterdir() if BASE.is_dir() else []:
        if d.is_dir() and d.name not in live:
            shutil.rmtree(d, ignore_errors=True)
    return removed


@contextmanager
def host_cluster(workers: int = 2, **kw) -> Iterator[HostCluster]:
    """A HostCluster for the duration of a `with` block (removed after, also on errors and Ctrl-C)."""
    hc = HostCluster.create(workers, **kw)
    with hc:
        yield hc
