"""`jobs.data --check` and the pipeline's `ensure_data` on a missing, partial, corrupted and complete pack.

The pack is built by a stand-in `fill` (small synthetic shards, no network), in an empty NANOCHAT_HOME;
everything else is the real code path a newcomer's `make demo` takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import data as data_job
from jobs import datapack, pipeline
from jobs.datapack import MANIFEST, eval_dir_for, pack_status
from nanochat.data.dataset import get_source, write_shards


class _Fill:
    """A `fill` for the embedded pack: synthetic shards and one evaluation file, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pack: Path, evals: Path) -> dict:
        self.calls += 1
        write_shards([f"train {i}" for i in range(1500)], ["val 0", "val 1"], pack, docs_per_shard=1024)
        (evals / "toy").mkdir()
        (evals / "toy" / "test.jsonl").write_text('{"id": "0"}\n')
        return {"sources": [{"name": "synthetic"}], "eval": {"toy": {"test": 1}}}


@pytest.fixture
def fill(home, monkeypatch) -> _Fill:
    f = _Fill()
    monkeypatch.setattr(datapack, "_fill_embedded", f)
    return f


def _pack() -> Path:
    return get_source("embedded").directory


def _damage(kind: str) -> str:
    """Damage the built pack the way `kind` says; return what the messages must name."""
    pack = _pack()
    if kind == "missing":
        import shutil

        shutil.rmtree(pack)
        return "manifest.json is missing"
    if kind == "partial":
        (pack / "shard_00001.parquet").unlink()
        return "shard_00001.parquet is missing"
    if kind == "truncated":
        shard = pack / "shard_00000.parquet"
        shard.write_bytes(shard.read_bytes()[:100])
        return "shard_00000.parquet is 100 bytes"
    assert kind == "corrupted"  # same size, other bytes: only the sha256 check sees it
    f = eval_dir_for(pack) / "toy" / "test.jsonl"
    f.write_text('{"id": "9"}\n')
    return "test.jsonl does not match its sha256"


def test_check_passes_on_a_complete_pack(fill, capsys):
    datapack.build_embedded_pack()
    assert data_job.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and str(_pack()) in out and "3 shards" in out


@pytest.mark.parametrize("kind", ["missing", "partial", "truncated", "corrupted"])
def test_check_names_the_problem_and_exits_1(fill, capsys, kind):
    datapack.build_embedded_pack()
    what = _damage(kind)
    assert data_job.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "NOT ok" in err and what in err and "python -m jobs.data --source embedded" in err
    assert fill.calls == 1, "--check must never rebuild"


@pytest.mark.parametrize("kind", ["missing", "partial", "truncated"])
def test_ensure_data_rebuilds_a_broken_pack_and_says_why(fill, capsys, kind):
    datapack.build_embedded_pack()
    what = _damage(kind)
    path = pipeline.ensure_data({"data": {"source": "embedded"}})
    out = capsys.readouterr().out
    assert f"[data] embedded pack at {_pack()}: " in out and what in out and "building it" in out
    assert path == str(_pack()) and fill.calls == 2
    assert pack_status(_pack(), full=True).ok


def test_ensure_data_builds_a_pack_on_an_empty_home_and_reuses_it(fill, capsys):
    assert not (_pack() / MANIFEST).exists()
    assert pipeline.ensure_data({}) == str(_pack())  # no data section: the embedded pack
    assert "manifest.json is missing" in capsys.readouterr().out and fill.calls == 1
    assert pipeline.ensure_data({"data": {"source": "embedded"}}) == str(_pack())
    assert capsys.readouterr().out == "" and fill.calls == 1  # complete: reused silently


def test_an_unknown_source_is_a_user_error(home, capsys):
    assert data_job.main(["--source", "nope"]) == 2
    assert "unknown data source 'nope'" in capsys.readouterr().err


def test_status_reason_lists_at_most_three_problems():
    status = datapack.PackStatus(False, [f"p{i}" for i in range(5)])
    assert status.reason == "p0; p1; p2; and 2 more problem(s)"
    assert datapack.PackStatus(True).reason == "complete"
