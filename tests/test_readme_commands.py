"""Every command in the README's fenced `bash` blocks is run by a test, so no README line goes stale unseen.

Each command must match exactly one rule below: run as written, run with a documented
substitution, covered by another test, or skipped with a reason (cloud-only lines). A README
command without a rule fails the test, naming it. Commands run from the repository root in a new
user's shell (their own HOME and NANOCHAT_HOME, the environment's interpreter first on PATH), on a
local cluster whose ports come from the NANOCHAT_* variables that `cluster.local` reads; that cluster
runs beside the test session's own cluster, which must be unharmed, and everything is stopped after.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.local import free_port, port_open
from tests.newcomer import NewcomerRun, clean_up, describe, newcomer_env

pytestmark = pytest.mark.cluster
REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"


@dataclass(frozen=True)
class Rule:
    pattern: str  # a regex that the whole command must match
    action: str  # "run", "newcomer" (tests/test_newcomer.py runs it), or "skip"
    why: str = ""
    substitute: tuple[tuple[str, str], ...] = ()  # (regex, replacement) applied before running

    def matches(self, command: str) -> bool:
        return re.fullmatch(self.pattern, command) is not None


DASHBOARD = "http://127.0.0.1:8265"
RULES = [
    Rule(r"(NANOCHAT_HOME=\S+ )?make demo\b.*", "newcomer",
         "tests/test_newcomer.py runs `make demo PRESET=micro` with an empty NANOCHAT_HOME and its own ports"),
    Rule(r"make test\b.*", "skip", "it is the command that runs this test"),
    Rule(r"python -m cluster\.local (start|status|stop)\b.*", "run"),
    Rule(r"python -m jobs\.data --source embedded", "run"),
    Rule(r"RAY_AUTH_MODE=token ray job submit .*", "run",
         "on the micro preset (the tiny preset's tokenizer is the same code, on 10x the text)",
         ((re.escape(DASHBOARD), "{dashboard}"), (r"--preset tiny\b", "--preset micro"))),
    Rule(r"RAY_AUTH_MODE=token ray get-auth-token --generate.*", "run"),
    Rule(r"ray (up|down|dashboard) .*cluster\.yaml.*", "skip",
         "needs AWS credentials; cluster.yaml is checked against Ray's schema in tests/test_cluster_config.py"),
    Rule(r"RAY_AUTH_MODE=token python -m jobs\.pipeline --preset d20 .*s3://.*", "run",
         "with --plan: the run itself needs 8xH100 nodes and a bucket; --plan checks the preset and arguments",
         ((r"<your-bucket>", "example-bucket"), (r"$", " --plan"))),
    # Hugging Face export and import: on the newcomer's micro run (run e2e), into the test's directory
    Rule(r"python -m jobs\.(export|serve) --run demo .*", "run", "on the newcomer's micro run, output in a temp dir",
         ((r"--run demo", "--run e2e --storage {runs}"), (r"\./nanochat-demo-sft", "{tmp}/nanochat-demo-sft"),
          (r"> serve\.yaml", "> {tmp}/serve.yaml"))),
    Rule(r"python -c \"from transformers import .*", "run", "on the export made by the line before",
         ((r"\./nanochat-demo-sft", "{tmp}/nanochat-demo-sft"),)),
    Rule(r"(transformers serve|curl -s 127\.0\.0\.1:8001/).*", "skip",
         "a long-running server: tests/test_hf_export.py starts `transformers serve` on an export and sends this "
         "chat completion"),
    Rule(r"python -m cluster\.hosts (up|status|run|kill|restart|cut|limit|drop|freeze|down) .*|"
         r"python -m cluster\.hosts (status|down)", "skip",
         "needs root and makes namespaces; tests/test_hosts.py runs each operation (and the CLI's up, status, "
         "down and its errors) and checks that nothing is left, tests/test_hosts_pretrain.py the scenarios"),
    Rule(r"python -m jobs\.(sft|evaluate|rl) .*/path/to/nanochat-d32.*", "skip",
         "needs the published d32, which cannot be downloaded here; tests/test_hf_export.py imports directories "
         "written by transformers' save_pretrained into the same entry points"),
]


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def rule_for(command: str) -> Rule:
    found = [r for r in RULES if r.matches(command)]
    assert len(found) == 1, (f"README command {command!r} matches {len(found)} rules: give it exactly one in "
                             "tests/test_readme_commands.py (run it, substitute, or skip with a reason)")
    return found[0]


def test_every_readme_command_has_exactly_one_rule():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 8, commands  # the parser found the blocks
    for command in commands:
        rule_for(command)
    assert "python -m cluster.local start" in commands


def test_readme_commands_run(ray_cluster, newcomer_demo):
    root = Path(tempfile.mkdtemp(prefix="ncrdm-", dir="/tmp"))  # short: Ray socket paths
    home, nanochat_home = root / "home", root / "nanochat"
    home.mkdir()
    ports = {"NANOCHAT_RAY_PORT": free_port(), "NANOCHAT_DASHBOARD_PORT": free_port(),
             "NANOCHAT_METRICS_PORT": free_port()}
    env = newcomer_env(home, nanochat_home)
    env.update({k: str(v) for k, v in ports.items()}, NANOCHAT_RAY_TEMP_DIR=str(root / "ray"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    dashboard = f"http://127.0.0.1:{ports['NANOCHAT_DASHBOARD_PORT']}"
    ran, skipped = [], []
    try:
        for command in readme_commands(README.read_text()):
            rule = rule_for(command)
            if rule.action == "skip":
                skipped.append((command, rule.why))
                continue
            if rule.action == "newcomer":
                assert newcomer_demo.make_rc == 0, describe(newcomer_demo)
                continue
            cmd = command
            for pattern, replacement in rule.substitute:
                cmd = re.sub(pattern, replacement.format(dashboard=dashboard, runs=newcomer_demo.storage,
                                                         tmp=root), cmd)
            done = subprocess.run(["bash", "-c", cmd], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"README command failed: {command}\n(ran: {cmd})\n" \
                                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            ran.append(cmd)
            if command.startswith("python -m cluster.local start"):
                assert f"Ray head: 127.0.0.1:{ports['NANOCHAT_RAY_PORT']}" in done.stdout, done.stdout
                assert ray_cluster.is_running(), "a second local cluster must not disturb the first"
            if "get-auth-token" in command:
                assert (home / ".ray" / "auth_token").is_file()
            if "ray job submit" in command:
                assert (nanochat_home / "runs" / "demo" / "tokenizer" / "meta.json").is_file(), done.stdout[-2000:]
            if "jobs.export" in cmd:
                assert (root / "nanochat-demo-sft" / "config.json").is_file(), done.stdout[-2000:]
            if "--print-serve-config" in cmd:
                assert "import_path: serve_app.app:build_app" in (root / "serve.yaml").read_text()
            if "--plan" in cmd:
                assert "parameters" in done.stdout and "GPU-hours" in done.stdout, done.stdout
    finally:
        subprocess.run([sys.executable, "-m", "cluster.local", "stop"], cwd=REPO_ROOT, env=env,
                       capture_output=True, timeout=120)
        clean_up(NewcomerRun(root=root, home=home, nanochat_home=nanochat_home, ports={}))
    assert not any(port_open(p) for p in ports.values()), "the README's `cluster.local stop` left ports open"
    assert ray_cluster.is_running()
    assert len(ran) >= 6 and skipped, (ran, skipped)


def test_a_start_on_ports_another_cluster_holds_is_refused(ray_cluster, tmp_path):
    env = {**os.environ, "NANOCHAT_HOME": str(tmp_path / "other-home")}
    done = subprocess.run([sys.executable, "-m", "cluster.local", "start", "--port", str(ray_cluster.gcs_port),
                           "--dashboard-port", str(ray_cluster.dashboard_port), "--metrics-port",
                           str(ray_cluster.metrics_port), "--temp-dir", str(tmp_path / "ray")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"GCS port {ray_cluster.gcs_port}" in done.stderr and "already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert ray_cluster.is_running()
