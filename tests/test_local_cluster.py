"""The local cluster: token auth on, the README's `ray job submit` line works, the token stays private."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import AUTH_TOKEN_FILE

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).parent / "ray")


def _submit(cluster, tmp_path, code: str, auth: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    if auth:
        env["RAY_AUTH_MODE"] = "token"
    return subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(tmp_path), "--", "python",
         "-c", code], env=env, capture_output=True, text=True, timeout=180)


def test_token_file_is_private(ray_cluster):
    assert AUTH_TOKEN_FILE.is_file()
    assert stat.S_IMODE(AUTH_TOKEN_FILE.stat().st_mode) == 0o600


def test_readme_job_submit_works_with_token_and_fails_without(ray_cluster, tmp_path):
    ok = _submit(ray_cluster, tmp_path, "import ray; ray.init(); print('CPUS', ray.cluster_resources()['CPU'])",
                 auth=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "CPUS 4.0" in ok.stdout + ok.stderr
    refused = _submit(ray_cluster, tmp_path, "print('should not run')", auth=False)
    assert refused.returncode != 0
    assert "uthentication" in refused.stdout + refused.stderr


def test_jobs_do_not_see_the_auth_token_in_their_environment(ray_cluster, tmp_path):
    code = ("import os; leaked=[k for k,v in os.environ.items() if 'TOKEN' in k.upper()]; "
            "print('LEAKED', leaked)")
    out = _submit(ray_cluster, tmp_path, code, auth=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LEAKED []" in out.stdout + out.stderr


def test_status_shows_dashboard_and_jobs(ray_cluster):
    text = ray_cluster.status()
    assert ray_cluster.dashboard_url in text and "jobs:" in text
