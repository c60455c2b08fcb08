"""The pipeline runner: order, skipping complete stages, resuming after a crash, bad input."""

from __future__ import annotations

import pytest

from cluster.storage import RunStorage
from jobs import pipeline, registry
from jobs.config import ConfigError


@pytest.fixture
def fake_stages(monkeypatch, tmp_path):
    """Two registered stages a -> b backed by tests/fake_stage.py; data preparation stubbed."""
    stages = [
        registry.Stage("a", "tests.fake_stage", args=("--name", "a")),
        registry.Stage("b", "tests.fake_stage", inputs=("a",), args=("--name", "b")),
    ]
    monkeypatch.setattr(registry, "STAGES", stages)
    monkeypatch.setattr(pipeline, "ensure_data", lambda preset: str(tmp_path / "data"))
    crash_file = tmp_path / "crash"
    monkeypatch.setenv("FAKE_STAGE_CRASH_FILE", str(crash_file))
    return crash_file


def _run(tmp_path, **kw):
    return pipeline.run_pipeline("micro", "r1", storage_uri=str(tmp_path / "runs"), submit=False, **kw)


def test_runs_all_stages_then_skips_complete_ones(fake_stages, tmp_path, capsys):
    storage = _run(tmp_path)
    assert storage.is_complete("a") and storage.is_complete("b")
    first = {s: storage.read_meta(s)["finished_at"] for s in ("a", "b")}
    _run(tmp_path)
    out = capsys.readouterr().out
    assert "a: complete, skipped" in out and "b: complete, skipped" in out
    assert {s: storage.read_meta(s)["finished_at"] for s in ("a", "b")} == first


def test_resumes_after_a_crash_and_reruns_only_the_incomplete_stage(fake_stages, tmp_path, capsys):
    fake_stages.write_text("b")
    with pytest.raises(pipeline.PipelineError, match="stage b failed"):
        _run(tmp_path)
    storage = RunStorage("r1", str(tmp_path / "runs"))
    assert storage.is_complete("a") and not storage.is_complete("b")
    a_done = storage.read_meta("a")["finished_at"]
    fake_stages.unlink()
    _run(tmp_path)
    assert storage.is_complete("b")
    assert storage.read_meta("a")["finished_at"] == a_done, "a complete stage must not run again"


def test_force_reruns_a_complete_stage(fake_stages, tmp_path):
    storage = _run(tmp_path)
    before = storage.read_meta("a")["finished_at"]
    _run(tmp_path, force=["a"])
    assert storage.read_meta("a")["finished_at"] > before


def test_bad_input_is_refused_before_anything_runs(fake_stages, tmp_path):
    with pytest.raises(ValueError, match="run id"):
        pipeline.run_pipeline("micro", "../escape", storage_uri=str(tmp_path), submit=False)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        pipeline.run_pipeline("nope", "r1", storage_uri=str(tmp_path), submit=False)
    with pytest.raises(ConfigError, match="unknown stage 'zzz'"):
        pipeline.run_pipeline("micro", "r1", storage_uri=str(tmp_path), stages=["zzz"], submit=False)
    assert not (tmp_path / "r1").exists()


def test_cli_reports_errors_with_exit_code_2(fake_stages, tmp_path, capsys):
    assert pipeline.main(["--preset", "nope", "--run", "r1", "--storage", str(tmp_path), "--no-submit"]) == 2
    assert "unknown preset" in capsys.readouterr().err


@pytest.mark.cluster
def test_stages_run_as_submitted_ray_jobs(fake_stages, tmp_path, ray_cluster, capsys):
    storage = pipeline.run_pipeline("micro", "r2", storage_uri=str(tmp_path / "runs"), submit=True,
                                    address=ray_cluster.dashboard_url)
    out = capsys.readouterr().out
    assert "submitted job r2-a-" in out and "submitted job r2-b-" in out
    assert storage.is_complete("a") and storage.is_complete("b")


def test_report_is_stale_once_a_stage_finishes_after_it(tmp_path):
    storage = RunStorage("r1", str(tmp_path))
    report = registry.get_stage("report")
    storage.writer("tokenizer", {}).commit()
    assert not report.is_complete(storage)
    storage.writer("report", {}).commit()
    assert report.is_complete(storage)
    storage.writer("tokenizer", {"again": True}).commit()
    assert not report.is_complete(storage), "a report older than a stage's output must be rewritten"


def test_plan_of_the_speedrun_preset_matches_the_seed():
    text = pipeline.plan_text("d20", hourly_rate=2.0, mfu=0.4)
    assert "560,988,160 parameters" in text and "21,400 steps" in text and "GPU-hours" in text
    assert "CPU preset" in pipeline.plan_text("micro", hourly_rate=2.0, mfu=0.4)


@pytest.mark.cluster
def test_a_preset_the_cluster_can_never_place_is_refused_before_submitting(ray_cluster, tmp_path, monkeypatch):
    from cluster.resources import UnplaceableError

    monkeypatch.delenv("NANOCHAT_CLUSTER_CONFIG", raising=False)
    with pytest.raises(UnplaceableError, match="GPU"):
        pipeline.run_pipeline("d20", "r3", storage_uri=str(tmp_path), stages=["pretrain"], submit=True,
                              address=ray_cluster.dashboard_url)
    assert not (tmp_path / "r3" / "pretrain").exists()
