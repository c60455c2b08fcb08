"""A one-node Ray cluster on this machine, bound to 127.0.0.1, with token authentication on.

    python -m cluster.local start [--num-cpus N]   # head node + dashboard (8265) + metrics export
    python -m cluster.local status                 # dashboard URL, resources, jobs
    python -m cluster.local stop
    python -m cluster.local start --port 6400 --dashboard-port 8300 --metrics-port 8100  # a second one

Ports and the temp dir: `--port` (GCS, default 6379), `--dashboard-port` (8265), `--metrics-port`
(8080) and `--temp-dir` (/tmp/ray for the default ports, else /tmp/ray-<port>), or the environment
variables NANOCHAT_RAY_PORT, NANOCHAT_DASHBOARD_PORT, NANOCHAT_METRICS_PORT, NANOCHAT_RAY_TEMP_DIR
(`make demo RAY_PORT=... DASHBOARD_PORT=... METRICS_PORT=... RAY_TEMP_DIR=...` sets them). Ray's
internal ports (dashboard agent, runtime-env agent, client server) are picked free at each start, so
two clusters on one machine never share one. `start` adopts only the cluster that this
$NANOCHAT_HOME started (its state file); another cluster on the requested ports or temp dir is
refused with a message, never joined.

Ray 2.60 turns token authentication on for `ray start --head` and writes the token to
`~/.ray/auth_token`. Clients must then run with `RAY_AUTH_MODE=token` (they read the token file);
The token file is made private (0600) after start.
The token is never put into job or actor environments: model-written code runs on these nodes
(see nanochat/sandbox.py).

CPUs: a 2-core machine cannot host a 2-CPU train worker next to a 1-CPU data actor, so the local
head advertises `2 x physical cores` logical CPUs by default. Train workers reserve their CPUs
explicitly (and torch uses that many threads); light actors (tokenizer pool, rollout helpers)
take fractional CPUs. The state of the started cluster (ports, temp dir) is kept in
`$NANOCHAT_HOME/ray-local.json`, so `stop` ends exactly this cluster's processes and never another.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanochat.data.dataset import nanochat_home
from nanochat.errors import NanochatError, entrypoint

AUTH_TOKEN_FILE = Path.home() / ".ray" / "auth_token"
DEFAULT_GCS_PORT, DEFAULT_DASHBOARD_PORT, DEFAULT_METRICS_PORT = 6379, 8265, 8080
PORT_ENV = {"gcs_port": "NANOCHAT_RAY_PORT", "dashboard_port": "NANOCHAT_DASHBOARD_PORT",
            "metrics_port": "NANOCHAT_METRICS_PORT"}
TEMP_DIR_ENV = "NANOCHAT_RAY_TEMP_DIR"
RAY_WORKER_PORTS = range(10002, 20000)  # `ray start`'s default --min/--max-worker-port: ours must avoid it


class ClusterError(NanochatError, RuntimeError):
    """The local cluster cannot start or be reached as asked (ports taken, another cluster in the way)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class LocalCluster:
    """Ports and directories of one local head node."""

    num_cpus: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))
    gcs_port: int = 6379
    dashboard_port: int = 8265
    metrics_port: int = 8080
    agent_ports: tuple[int, int, int] | None = None  # dashboard agent http, grpc, runtime-env agent
    temp_dir: str = "/tmp/ray"
    state_file: str = field(default_factory=lambda: str(nanochat_home() / "ray-local.json"))

    @classmethod
    def configured(cls, *, gcs_port: int | None = None, dashboard_port: int | None = None,
                   metrics_port: int | None = None, temp_dir: str | None = None,
                   num_cpus: int | None = None) -> LocalCluster:
        """The cluster asked for by arguments, else the NANOCHAT_* environment, else the defaults."""
        def port(name: str, given: int | None, default: int) -> int:
            value = given if given is not None else os.environ.get(PORT_ENV[name]) or default
            try:
                value = int(value)
            except ValueError:
                raise ClusterError(f"{PORT_ENV[name]}={value!r} is not a port number") from None
            if not 1 <= value <= 65535:
                raise ClusterError(f"port {value} ({name}) is outside 1..65535")
            if value in RAY_WORKER_PORTS:
                raise ClusterError(f"port {value} ({name}) is inside the range Ray keeps for its workers "
                                   f"({RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}): "
                                   "pick one outside it")
            return value

        ports = {"gcs_port": port("gcs_port", gcs_port, DEFAULT_GCS_PORT),
                 "dashboard_port": port("dashboard_port", dashboard_port, DEFAULT_DASHBOARD_PORT),
                 "metrics_port": port("metrics_port", metrics_port, DEFAULT_METRICS_PORT)}
        if len(set(ports.values())) < 3:
            raise ClusterError(f"the GCS, dashboard and metrics ports must differ, got {ports}")
        temp_dir = temp_dir or os.environ.get(TEMP_DIR_ENV) or (
            "/tmp/ray" if ports["gcs_port"] == DEFAULT_GCS_PORT else f"/tmp/ray-{ports['gcs_port']}")
        cluster = cls(**ports, temp_dir=temp_dir)
        if num_cpus:
            cluster.num_cpus = num_cpus
        return cluster

    @classmethod
    def isolated(cls, num_cpus: int, temp_dir: str, state_file: str) -> LocalCluster:
        """A cluster on fresh ports and its own temp dir (tests: never attach to a user's cluster)."""
        return cls(num_cpus=num_cpus, gcs_port=free_port(), dashboard_port=free_port(),
                   metrics_port=free_port(), agent_ports=(free_port(), free_port(), free_port()),
                   temp_dir=temp_dir, state_file=state_file)

    @classmethod
    def from_state(cls, state_file: str | None = None) -> LocalCluster | None:
        path = Path(state_file or nanochat_home() / "ray-local.json")
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("agent_ports"):
            data["agent_ports"] = tuple(data["agent_ports"])
        return cls(**data)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def job_client(self):
        """A `JobSubmissionClient` for this cluster with token auth.

        Ray reads RAY_AUTH_MODE once per process, when the client first authenticates, so it
        is set in this process's environment before Ray is imported here.
        """
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def is_running(self) -> bool:
        return port_open(self.gcs_port) and port_open(self.dashboard_port)

    def same_place(self, other: LocalCluster) -> bool:
        """Whether `other` is this cluster: the same ports and temp dir."""
        return (self.gcs_port, self.dashboard_port, self.metrics_port, self.temp_dir) == \
            (other.gcs_port, other.dashboard_port, other.metrics_port, other.temp_dir)

    def start_or_adopt(self, timeout_s: float = 90.0) -> LocalCluster:
        """Start this cluster, or return the running one this $NANOCHAT_HOME started on the same
        ports; refuse (ClusterError) when another cluster or program holds the ports or temp dir."""
        ours = LocalCluster.from_state(self.state_file)
        if ours is not None and ours.is_running():
            if ours.same_place(self):
                print(f"Ray is already running at {ours.address} (dashboard {ours.dashboard_url}), "
                      f"started from this NANOCHAT_HOME ({self.state_file})")
                return ours
            raise ClusterError(
                f"this NANOCHAT_HOME already runs a local cluster at {ours.address} (dashboard "
                f"{ours.dashboard_port}, temp dir {ours.temp_dir}), not on the ports asked for "
                f"({self.gcs_port}, {self.dashboard_port}, {self.metrics_port}, {self.temp_dir}): "
                "stop it first (`python -m cluster.local stop`) or use another NANOCHAT_HOME")
        if ours is not None:  # a stale state file: its cluster is gone
            Path(self.state_file).unlink(missing_ok=True)
        self.start(timeout_s)
        return self

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the head node on this object's ports and temp dir; refuse (ClusterError) when any of
        them is taken, by another Ray cluster or any program: never join a cluster we did not start."""
        taken = [f"{name} {port}" for name, port in (("GCS port", self.gcs_port),
                                                      ("dashboard port", self.dashboard_port),
                                                      ("metrics port", self.metrics_port)) if port_open(port)]
        if taken:
            raise ClusterError(
                f"{', '.join(taken)} on 127.0.0.1 already in use (another Ray cluster, or another program): "
                "stop it, or start this cluster on other ports: python -m cluster.local start --port P "
                "--dashboard-port D --metrics-port M (make demo RAY_PORT=P DASHBOARD_PORT=D METRICS_PORT=M "
                "SERVE_PORT=S)")
        users = self.processes()
        if users:
            raise ClusterError(f"Ray processes of another cluster use the temp dir {self.temp_dir} "
                               f"(pids {sorted(users)[:5]}): stop that cluster or pass --temp-dir")
        if not self.agent_ports:
            self.agent_ports = (free_port(), free_port(), free_port())
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--head",
            "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_port}", f"--num-cpus={self.num_cpus}",
            "--num-gpus=0" if not _has_cuda() else "", f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true", "--disable-usage-stats",
        ]
        if self.agent_ports:  # free ports, so that two local clusters never collide on Ray's defaults
            http, grpc, renv = self.agent_ports
            cmd += [f"--dashboard-agent-listen-port={http}", f"--dashboard-agent-grpc-port={grpc}",
                    f"--runtime-env-agent-port={renv}", f"--ray-client-server-port={free_port()}"]
        # job entrypoints run `python ...`: make that this environment's interpreter
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        ensure_auth_token(env)
        for _attempt in range(3):  # an overloaded machine can time out the raylet's first start
            out = subprocess.run([c for c in cmd if c], env=env, capture_output=True, text=True)
            if out.returncode == 0:
                break
            self.stop()  # clear what the failed start left behind before trying again
        else:
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-6:])
            raise ClusterError(f"`ray start` failed 3 times (exit {out.returncode}); its last lines:\n{tail}")
        deadline = time.time() + timeout_s
        while not self.is_running():
            if time.time() > deadline:
                raise ClusterError(f"Ray head did not open {self.address} and {self.dashboard_url} "
                                   f"within {timeout_s:.0f}s; "
                                   f"see logs under {self.temp_dir}/session_latest/logs")
            time.sleep(0.5)
        Path(self.state_file).parent.mkdir(parents=True, exist_ok=True)
        Path(self.state_file).write_text(json.dumps(asdict(self), indent=2))
        self._wait_for_jobs_api(deadline)

    def _wait_for_jobs_api(self, deadline: float) -> None:
        """The dashboard port opens before the job API answers; wait for the latter."""
        last = None
        while time.time() < deadline:
            try:
                self.job_client().list_jobs()
                return
            except Exception as e:  # connection refused / 503 while the head warms up
                last = e
                time.sleep(1.0)
        raise ClusterError(f"Ray job API at {self.dashboard_url} did not answer: {last}")

    def processes(self, procs: dict[int, tuple[int, str]] | None = None) -> set[int]:
        """Pids of this cluster's processes: the head's (found by this cluster's temp dir or GCS port on
        their command line) and their descendants (Ray's workers, `ray::IDLE` and actors, carry neither)."""
        procs = _process_table() if procs is None else procs
        needles = (self.temp_dir + "/", f"127.0.0.1:{self.gcs_port}", f":{self.gcs_port} ")
        roots = {pid for pid, (_, cmd) in procs.items()
                 if "ray" in cmd and any(n in cmd + " " for n in needles)}
        found, frontier = set(roots), list(roots)
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, _) in procs.items():
                if ppid == parent and pid not in found:
                    found.add(pid)
                    frontier.append(pid)
        found.discard(os.getpid())
        return found

    def stop(self) -> None:
        """End this cluster's processes (see `processes`), leaving any other Ray cluster alone."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            victims = self.processes()  # again before SIGKILL: workers may have started meanwhile
            for pid in victims:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if victims:
                time.sleep(2.0 if sig == signal.SIGTERM else 0.2)
        deadline = time.time() + 10.0  # the kernel closes a killed process's sockets shortly after
        while time.time() < deadline and any(port_open(p) for p in self.ports()):
            time.sleep(0.2)
        Path(self.state_file).unlink(missing_ok=True)

    def ports(self) -> list[int]:
        """Every TCP port this cluster was started with (user-facing and Ray-internal)."""
        return [self.gcs_port, self.dashboard_port, self.metrics_port, *(self.agent_ports or ())]

    def status(self) -> str:
        """Dashboard URL, resources and jobs, as text."""
        if not self.is_running():
            return f"no local Ray cluster is running at {self.address}"
        lines = [f"Ray head: {self.address}", f"dashboard: {self.dashboard_url}",
                 f"metrics: http://127.0.0.1:{self.metrics_port}/metrics",
                 f"logical CPUs: {self.num_cpus}"]
        jobs = self.job_client().list_jobs()
        running = [j for j in jobs
                   if str(j.status) in ("RUNNING", "PENDING", "JobStatus.RUNNING", "JobStatus.PENDING")]
        lines.append(f"jobs: {len(jobs)} submitted, {len(running)} running")
        for j in sorted(jobs, key=lambda j: j.start_time or 0)[-10:]:
            lines.append(f"  {j.submission_id or j.job_id}  {j.status}  {j.entrypoint[:80]}")
        return "\n".join(lines)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read in /proc."""
    table = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(proc.name)] = (ppid, cmd)
    return table


def ensure_auth_token(env: dict[str, str]) -> None:
    """Create `~/.ray/auth_token` if missing (`ray get-auth-token --generate`) and make it 0600."""
    if not AUTH_TOKEN_FILE.exists():
        ray_cli = str(Path(sys.executable).parent / "ray")
        out = subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True,
                             text=True)
        if out.returncode != 0 or not AUTH_TOKEN_FILE.exists():
            raise RuntimeError("could not create the Ray auth token: "
                               f"{out.stderr.strip() or out.stdout.strip()}")
    AUTH_TOKEN_FILE.chmod(0o600)  # Ray writes it 0644; only this user needs it


def _has_cuda() -> bool:
    return Path("/dev/nvidiactl").exists()


@entrypoint
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs to advertise (default 2 x cores)")
    p.add_argument("--port", type=int, default=None, help=f"GCS port (${PORT_ENV['gcs_port']}, default 6379)")
    p.add_argument("--dashboard-port", type=int, default=None,
                   help=f"dashboard and job API port (${PORT_ENV['dashboard_port']}, default 8265)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help=f"Prometheus metrics export port (${PORT_ENV['metrics_port']}, default 8080)")
    p.add_argument("--temp-dir", default=None,
                   help=f"Ray's temp dir (${TEMP_DIR_ENV}; default /tmp/ray, "
                        "or /tmp/ray-<port> on other ports)")
    args = p.parse_args(argv)
    if args.command == "start":
        wanted = LocalCluster.configured(gcs_port=args.port, dashboard_port=args.dashboard_port,
                                         metrics_port=args.metrics_port, temp_dir=args.temp_dir,
                                         num_cpus=args.num_cpus)
        cluster = wanted.start_or_adopt()
        print(cluster.status())
        print("\nSubmit a job by hand (the client reads ~/.ray/auth_token):\n"
              f"  RAY_AUTH_MODE=token ray job submit --address {cluster.dashboard_url} --working-dir . "
              "-- python -c 'import ray; ray.init(); print(ray.cluster_resources())'")
        return 0
    cluster = LocalCluster.from_state()
    if cluster is None:  # nothing started from this NANOCHAT_HOME: say so, touch nothing
        print(f"no local Ray cluster was started from this NANOCHAT_HOME ({nanochat_home()})")
        return 0 if args.command == "stop" else 1
    if args.command == "stop":
        cluster.stop()
        print(f"stopped the local Ray cluster at {cluster.address}")
    else:
        print(cluster.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
