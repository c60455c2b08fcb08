"""A one-node Ray cluster on this machine, bound to 127.0.0.1, with token authentication on.

    python -m cluster.local start [--num-cpus N]   # head node + dashboard (8265) + metrics export
    python -m cluster.local status                 # dashboard URL, resources, jobs
    python -m cluster.local stop

Ray 2.60 turns token authentication on for `ray start --head` and writes the token to
`~/.ray/auth_token`. Clients must then run with `RAY_AUTH_MODE=token` (they read the token file);
`client_env()` returns what a client needs. The token file is made private (0600) after start.
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

from nanochat.dataset import nanochat_home

AUTH_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


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

    def client_env(self) -> dict[str, str]:
        """Environment for processes that talk to this cluster (drivers, `ray job submit`)."""
        return {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": self.dashboard_url}

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

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the head node; a running cluster on the same ports is left as it is."""
        if self.is_running():
            print(f"Ray is already running at {self.address} (dashboard {self.dashboard_url})")
            return
        for port in (self.gcs_port, self.dashboard_port, self.metrics_port):
            if port_open(port):
                raise RuntimeError(
                    f"port {port} on 127.0.0.1 is taken by another program; stop it or pick other "
                    "ports before starting the local Ray cluster")
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--head",
            "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_port}", f"--num-cpus={self.num_cpus}",
            "--num-gpus=0" if not _has_cuda() else "", f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true", "--disable-usage-stats",
        ]
        if self.agent_ports:
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
            raise RuntimeError(f"`ray start` failed 3 times (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
        deadline = time.time() + timeout_s
        while not self.is_running():
            if time.time() > deadline:
                raise RuntimeError(f"Ray head did not open {self.address} and {self.dashboard_url} "
                                   f"within {timeout_s:.0f}s; see logs under {self.temp_dir}/session_latest/logs")
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
        raise RuntimeError(f"Ray job API at {self.dashboard_url} did not answer: {last}")

    def stop(self) -> None:
        """End this cluster's processes, leaving any other Ray cluster on the machine alone.

        The head's processes are found by this cluster's temp dir or GCS port on their command
        line; Ray's workers (`ray::IDLE`, actors) carry neither, so their descendants go too.
        """
        procs = _process_table()
        needles = (self.temp_dir + "/", f"127.0.0.1:{self.gcs_port}", f":{self.gcs_port} ")
        roots = {pid for pid, (_, cmd) in procs.items()
                 if "ray" in cmd and any(n in cmd + " " for n in needles)}
        victims, frontier = set(roots), list(roots)
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, _) in procs.items():
                if ppid == parent and pid not in victims:
                    victims.add(pid)
                    frontier.append(pid)
        victims.discard(os.getpid())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in victims:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2.0 if sig == signal.SIGTERM else 0.2)
        Path(self.state_file).unlink(missing_ok=True)

    def status(self) -> str:
        """Dashboard URL, resources and jobs, as text."""
        if not self.is_running():
            return f"no local Ray cluster is running at {self.address}"
        lines = [f"Ray head: {self.address}", f"dashboard: {self.dashboard_url}",
                 f"metrics: http://127.0.0.1:{self.metrics_port}/metrics",
                 f"logical CPUs: {self.num_cpus}"]
        jobs = self.job_client().list_jobs()
        running = [j for j in jobs if str(j.status) in ("RUNNING", "PENDING", "JobStatus.RUNNING", "JobStatus.PENDING")]
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
        out = subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, text=True)
        if out.returncode != 0 or not AUTH_TOKEN_FILE.exists():
            raise RuntimeError(f"could not create the Ray auth token: {out.stderr.strip() or out.stdout.strip()}")
    AUTH_TOKEN_FILE.chmod(0o600)  # Ray writes it 0644; only this user needs it


def _has_cuda() -> bool:
    return Path("/dev/nvidiactl").exists()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs to advertise (default 2 x cores)")
    args = p.parse_args(argv)
    cluster = LocalCluster.from_state() or LocalCluster()
    if args.command == "start":
        if args.num_cpus:
            cluster.num_cpus = args.num_cpus
        cluster.start()
        print(cluster.status())
        print("\nSubmit a job by hand (the client reads ~/.ray/auth_token):\n"
              f"  RAY_AUTH_MODE=token ray job submit --address {cluster.dashboard_url} --working-dir . "
              "-- python -c 'import ray; ray.init(); print(ray.cluster_resources())'")
    elif args.command == "stop":
        cluster.stop()
        print(f"stopped the local Ray cluster at {cluster.address}")
    else:
        print(cluster.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
