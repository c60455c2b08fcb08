"""The README's first command as a newcomer meets it: `make demo` in an empty home, then a `curl`.

`run_newcomer_demo()` runs `make demo PRESET=micro` in a subprocess. Only environment and Make
variables differ from the README: an empty NANOCHAT_HOME (no pack, no runs, no cluster state), a
HOME of its own (so the Ray token is created as on a new machine, and pip's download cache is
empty), free Ray and Serve ports and a temp dir of its own (so it never meets a cluster that is
already running here). The Python environment is the one already installed (`VENV=`): it is keyed on
pyproject.toml and a fresh clone reuses it the same way.

It then runs the `curl` line that the demo prints, stops the cluster with `make cluster-stop`, and
records what is still alive: processes that mention the test's directory, and open ports. The
conftest fixture `newcomer_demo` runs it once per test session; tests/test_newcomer.py asserts on
it and tests/test_pipeline_e2e.py uses its run directory as the end-to-end reference run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local import _process_table, free_port, port_open

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN = "e2e"
PRESET = "micro"
MAKE_TIMEOUT_S = 2400  # pack download + build, cluster start, the micro pipeline, serve: ~6 min on 2 cores
KEEP_ENV = ("PATH", "LANG", "LC_ALL", "TERM", "TZ", "USER", "LOGNAME", "SHELL", "CI", "TMPDIR")


@dataclass
class NewcomerRun:
    root: Path
    home: Path
    nanochat_home: Path
    ports: dict[str, int]
    make_rc: int | None = None
    make_seconds: float = 0.0
    output: str = ""
    curl_cmd: str | None = None
    curl_rc: int | None = None
    reply: dict | None = None
    curl_error: str = ""
    stop_rc: int | None = None
    stop_output: str = ""
    leftover_processes: list[str] = field(default_factory=list)
    open_ports: list[int] = field(default_factory=list)

    @property
    def storage(self) -> Path:
        return self.nanochat_home / "runs"

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def newcomer_env(home: Path, nanochat_home: Path) -> dict[str, str]:
    """A new user's shell: the basic variables, their own HOME and NANOCHAT_HOME, nothing of Ray's."""
    env = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
    env.update(HOME=str(home), NANOCHAT_HOME=str(nanochat_home))
    return env


def _make(target: str, run: NewcomerRun, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parent.parent  # the installed environment, reused as a second clone does
    args = ["make", "--no-print-directory", target, f"VENV={venv}", f"PRESET={PRESET}", f"RUN={RUN}",
            f"RAY_PORT={run.ports['gcs']}", f"DASHBOARD_PORT={run.ports['dashboard']}",
            f"METRICS_PORT={run.ports['metrics']}", f"SERVE_PORT={run.ports['serve']}",
            f"RAY_TEMP_DIR={run.root / 'ray'}"]
    with subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[newcomer test] make {target} killed after {timeout_s:.0f}s"
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def _curl_line(output: str) -> str | None:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip().startswith("curl http")]
    return lines[-1] if lines else None


def _survivors(root: Path) -> list[str]:
    """Processes whose command line mentions the test's directory (Ray's are all started with it)."""
    needle = str(root)
    return [f"{pid}: {cmd[:200]}" for pid, (_, cmd) in _process_table().items()
            if needle in cmd and pid != os.getpid()]


def _all_ports(run: NewcomerRun) -> list[int]:
    ports = list(run.ports.values())
    state = run.nanochat_home / "ray-local.json"
    if state.is_file():  # Ray's internal ports, picked free at start
        ports += json.loads(state.read_text()).get("agent_ports") or []
    return ports


def run_newcomer_demo() -> NewcomerRun:
    root = Path(tempfile.mkdtemp(prefix="ncnew-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    run = NewcomerRun(root=root, home=root / "home", nanochat_home=root / "nanochat",
                      ports={"gcs": free_port(), "dashboard": free_port(), "metrics": free_port(),
                             "serve": free_port()})
    run.home.mkdir()
    env = newcomer_env(run.home, run.nanochat_home)
    t0 = time.time()
    done = _make("demo", run, env, MAKE_TIMEOUT_S)
    run.make_seconds = time.time() - t0
    run.make_rc, run.output = done.returncode, done.stdout
    ports = _all_ports(run)
    run.curl_cmd = _curl_line(run.output)
    if run.make_rc == 0 and run.curl_cmd:
        # the printed line, as a user pastes it (bounded: -m), through the shell
        cmd = run.curl_cmd.replace("curl ", "curl -sS -m 120 ", 1)
        got = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=180)
        run.curl_rc = got.returncode
        try:
            run.reply = json.loads(got.stdout)
        except ValueError:
            run.curl_error = f"not JSON: {got.stdout[:500]!r} {got.stderr[:500]!r}"
    stopped = _make("cluster-stop", run, env, 120)
    run.stop_rc, run.stop_output = stopped.returncode, stopped.stdout
    deadline = time.time() + 15  # sockets of killed processes close shortly after
    while time.time() < deadline and (_survivors(root) or any(port_open(p) for p in ports)):
        time.sleep(0.5)
    run.leftover_processes = _survivors(root)
    run.open_ports = [p for p in ports if port_open(p)]
    return run


def clean_up(run: NewcomerRun) -> None:
    """Whatever the test found alive is killed; the directory goes."""
    for line in _survivors(run.root):
        try:
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    shutil.rmtree(run.root, ignore_errors=True)


def describe(run: NewcomerRun) -> str:
    return (f"make demo exited {run.make_rc} after {run.make_seconds:.0f}s; curl: {shlex.quote(run.curl_cmd or '-')}"
            f" -> rc {run.curl_rc} {run.curl_error}\n--- last lines of make demo ---\n{run.tail()}")
