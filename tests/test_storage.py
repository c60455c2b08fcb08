"""Run storage: URI resolution, run ids, atomic stage outputs, metrics logs."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from cluster.storage import (
    RunStorage,
    StorageError,
    is_remote,
    resolve_storage,
    validate_run_id,
)


def test_default_storage_is_under_nanochat_home(home):
    fs, path = resolve_storage(None)
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(home / "runs")


def test_local_paths_resolve_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("rel/dir")[1] == str(tmp_path / "rel" / "dir")
    assert resolve_storage(f"file://{tmp_path}/x")[1] == f"{tmp_path}/x"


def test_object_store_uris_resolve_without_io():
    # `region` given so pyarrow does not look the bucket up; gs:// resolves lazily
    fs, path = resolve_storage("s3://bucket/prefix/runs?region=us-east-1")
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket/prefix/runs"
    fs, path = resolve_storage("gs://bucket/runs/")
    assert type(fs).__name__ == "GcsFileSystem" and path == "bucket/runs"
    assert is_remote("s3://b/x") and is_remote("gs://b/x") and not is_remote("/tmp/x")


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(StorageError, match="unsupported scheme 'ftp'"):
        resolve_storage("ftp://host/dir")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".", "..", "run id", "x" * 65, "/abs", "a\\b", "-lead"])
def test_run_ids_with_path_characters_are_refused(bad):
    with pytest.raises(ValueError, match="run id"):
        validate_run_id(bad)


def test_good_run_ids():
    for good in ["demo", "d20-2026.11.28", "r_1"]:
        assert validate_run_id(good) == good


def test_unwritable_storage_names_the_location(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    storage = RunStorage("r1", str(blocker / "runs"))
    with pytest.raises(StorageError, match="not writable"):
        storage.check_writable()
    with pytest.raises(StorageError, match="not writable"):
        storage.writer("tokenizer", {})


def test_stage_is_complete_only_after_commit(tmp_path):
    storage = RunStorage("r1", str(tmp_path))
    with storage.writer("tokenizer", {"vocab_size": 512}) as w:
        (w.path / "merges.bin").write_bytes(b"abc")
        assert not storage.is_complete("tokenizer")
        w.metrics["bpb"] = 1.5
        meta = w.commit()
    assert storage.is_complete("tokenizer")
    assert (tmp_path / "r1" / "tokenizer" / "merges.bin").read_bytes() == b"abc"
    on_disk = storage.read_meta("tokenizer")
    assert on_disk["config"] == {"vocab_size": 512} and on_disk["metrics"] == {"bpb": 1.5}
    assert on_disk == json.loads(json.dumps(meta, default=str))
    for key in ("git_commit", "versions", "duration_s", "timings"):
        assert key in on_disk


def test_phases_are_spans_of_the_timeline_with_the_submission_time(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_SUBMITTED_AT", "1000.5")
    storage = RunStorage("r1", str(tmp_path))
    with storage.writer("tokenizer", {}) as w:
        with w.phase("count"):
            pass
        with w.phase("write", "writing"):
            pass
        w.span("inside", "start-up", 1.0, 2.0)
        with pytest.raises(ValueError, match="span kind 'idle'"):
            w.span("x", "idle", 1.0, 2.0)
        meta = w.commit()
    timeline = meta["timeline"]
    assert timeline["submitted_at"] == 1000.5 and timeline["started_at"] == meta["started_at"]
    assert [(s["name"], s["kind"]) for s in timeline["spans"]] == [("count", "work"), ("write", "writing"),
                                                                  ("inside", "start-up")]
    assert all(s["start"] <= s["end"] for s in timeline["spans"])
    monkeypatch.delenv("NANOCHAT_SUBMITTED_AT")
    with storage.writer("pretrain", {}) as w:
        assert w.commit()["timeline"]["submitted_at"] is None  # run by hand


def test_interrupted_rewrite_keeps_previous_complete_output(tmp_path):
    storage = RunStorage("r1", str(tmp_path))
    with storage.writer("tokenizer", {"v": 1}) as w:
        (w.path / "data.txt").write_text("first")
        w.commit()
    with pytest.raises(KeyboardInterrupt):
        with storage.writer("tokenizer", {"v": 2}) as w:
            (w.path / "data.txt").write_text("half-writ")
            raise KeyboardInterrupt  # a crash half-way
    assert storage.is_complete("tokenizer")
    assert storage.read_meta("tokenizer")["config"] == {"v": 1}
    assert (tmp_path / "r1" / "tokenizer" / "data.txt").read_text() == "first"
    assert not list((tmp_path / "r1").glob(".staging-*")), "the aborted staging dir must be removed"
    with storage.writer("tokenizer", {"v": 3}) as w:
        (w.path / "data.txt").write_text("third")
        w.commit()
    assert storage.read_meta("tokenizer")["config"] == {"v": 3}
    assert (tmp_path / "r1" / "tokenizer" / "data.txt").read_text() == "third"


def test_in_place_writer_marks_stage_incomplete_until_commit(tmp_path):
    storage = RunStorage("r1", str(tmp_path))
    storage.writer("pretrain", {"step": 1}, in_place=True).commit()
    assert storage.is_complete("pretrain")
    w = storage.writer("pretrain", {"step": 2}, in_place=True)  # a rerun starts
    assert not storage.is_complete("pretrain"), "a stale meta.json must not mark a rerun complete"
    (w.path / "ckpt").mkdir()
    w.commit()
    assert storage.read_meta("pretrain")["config"] == {"step": 2}


def test_corrupt_meta_is_not_complete(tmp_path):
    storage = RunStorage("r1", str(tmp_path))
    (tmp_path / "r1" / "sft").mkdir(parents=True)
    (tmp_path / "r1" / "sft" / "meta.json").write_text('{"stage": "sf')
    assert not storage.is_complete("sft")
    with pytest.raises(StorageError, match="corrupt"):
        storage.read_meta("sft")


def test_missing_stage_error_names_what_to_run(tmp_path):
    with pytest.raises(StorageError, match="run the pretrain stage first"):
        RunStorage("r1", str(tmp_path)).read_meta("pretrain")


def test_metrics_log_appends_and_survives_a_cut_line(tmp_path):
    storage = RunStorage("r1", str(tmp_path))
    log = storage.metrics("pretrain")
    for step in range(3):
        log.append({"step": step, "loss": 1.0 / (step + 1)})
    with open(tmp_path / "r1" / "pretrain" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-append
    rows = storage.read_metrics("pretrain")
    assert [r["step"] for r in rows] == [0, 1, 2]
