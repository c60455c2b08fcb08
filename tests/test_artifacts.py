"""Stored artifacts (cluster/artifacts.py): one checkpoint rule on a local disk and through a pyarrow
filesystem standing for an object store (pyarrow's in-memory filesystem behind an `s3://` URI),
uploads with their marker last, localize's cache, and the lookup of a stage's model and tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster import artifacts, storage
from cluster.storage import RunStorage, StorageError
from nanochat import checkpoint as ckpt
from nanochat.common import DistInfo
from nanochat.errors import NotFoundError
from nanochat.gpt import GPT, GPTConfig
from tests.helpers import tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def object_store(monkeypatch) -> pafs.FileSystem:
    """`s3://...` URIs resolve to one in-memory pyarrow filesystem for the test (no rename, like S3)."""
    mock = pafs._MockFileSystem()
    real = storage.resolve_storage

    def resolve(uri: str | None) -> tuple[pafs.FileSystem, str]:
        if uri and uri.startswith("s3://"):
            return mock, uri.removeprefix("s3://").rstrip("/")
        return real(uri)

    monkeypatch.setattr(storage, "resolve_storage", resolve)
    monkeypatch.setattr(artifacts, "resolve_storage", resolve)
    return mock


@pytest.fixture(params=["local", "object_store"])
def run_storage(request, tmp_path) -> RunStorage:
    if request.param == "object_store":
        request.getfixturevalue("object_store")
        return RunStorage("r", "s3://bucket/runs")
    return RunStorage("r", str(tmp_path / "runs"))


def saved_checkpoint(root: Path, step: int, world: int = 2) -> Path:
    """A real two-rank checkpoint of a one-layer model, written by the core into a local directory."""
    model = tiny_gpt(GPTConfig.from_depth(1, vocab_size=64, sequence_len=16, head_dim=64), step)
    d = root / f"local-{step}"
    for rank in range(world):
        dist = DistInfo(rank, world, 0, "cpu")
        ckpt.save_training_checkpoint(d, model, model.setup_optimizers(dist=dist), dist, step=step,
                                      data={"item": step, "row": 0})
    return d


def upload(run_storage: RunStorage, local: Path, name: str, drop: tuple[str, ...] = (), torn: bool = False) -> str:
    """Put the checkpoint `local` at {run}/pretrain/<name>, without the files in `drop`, or with a torn state.json."""
    staged = local.parent / f"staged-{name}"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(local, staged)
    for f in drop:
        (staged / f).unlink()
    if torn:
        (staged / ckpt.STATE_FILE).write_text((staged / ckpt.STATE_FILE).read_text()[:20])
    dest = f"{run_storage.stage_uri('pretrain')}/{name}"
    artifacts.upload_dir(staged, dest, last=(ckpt.STATE_FILE,))
    return dest


@pytest.mark.parametrize("half", ["a rank's optimizer shard missing", "no state.json", "state.json torn",
                                  "the model missing"])
def test_a_checkpoint_without_all_its_files_is_never_picked(run_storage, tmp_path, half):
    upload(run_storage, saved_checkpoint(tmp_path, 5), artifacts.checkpoint_name(5))
    ten = saved_checkpoint(tmp_path, 10)
    drop = {"a rank's optimizer shard missing": (ckpt.optim_file(1),), "no state.json": (ckpt.STATE_FILE,),
            "the model missing": (ckpt.MODEL_FILE,)}.get(half, ())
    upload(run_storage, ten, artifacts.checkpoint_name(10), drop=drop, torn=half == "state.json torn")
    found = artifacts.latest_checkpoint(run_storage, "pretrain")
    assert found is not None and found.step == 5 and found.uri.endswith(artifacts.checkpoint_name(5))
    assert found.state["world_size"] == 2
    upload(run_storage, ten, artifacts.checkpoint_name(10) + "-whole")  # not a checkpoint name: ignored
    assert artifacts.latest_checkpoint(run_storage, "pretrain").step == 5
    artifacts.delete_dir(f"{run_storage.stage_uri('pretrain')}/{artifacts.checkpoint_name(10)}")
    upload(run_storage, ten, artifacts.checkpoint_name(10))
    assert artifacts.latest_checkpoint(run_storage, "pretrain").step == 10


def test_no_checkpoint_at_all(run_storage):
    assert artifacts.latest_checkpoint(run_storage, "pretrain") is None
    assert artifacts.checkpoints(run_storage, "pretrain") == []


def test_rl_checkpoints_of_runs_before_the_rename_are_still_found(run_storage, tmp_path):
    two, four = saved_checkpoint(tmp_path, 2), saved_checkpoint(tmp_path, 4)
    artifacts.upload_dir(two, f"{run_storage.stage_uri('rl')}/{artifacts.checkpoint_name(2)}", last=(ckpt.STATE_FILE,))
    artifacts.upload_dir(four, f"{run_storage.stage_uri('rl')}/checkpoints/step_000004", last=(ckpt.STATE_FILE,))
    found = artifacts.latest_checkpoint(run_storage, "rl")
    assert found.step == 4 and found.uri.endswith("rl/checkpoints/step_000004")
    assert [u.rsplit("/", 1)[1] for u in artifacts.checkpoints(run_storage, "rl")] == [
        artifacts.checkpoint_name(2), "step_000004"]


def test_upload_writes_the_marker_last(tmp_path, monkeypatch, object_store):
    local = saved_checkpoint(tmp_path, 3)
    order: list[str] = []
    real = pafs.copy_files

    def recording(src, dest, **kw):
        order.append(dest.rsplit("/", 1)[1])
        return real(src, dest, **kw)

    monkeypatch.setattr(pafs, "copy_files", recording)
    artifacts.upload_dir(local, "s3://bucket/up", last=(ckpt.STATE_FILE,))
    assert order[-1] == ckpt.STATE_FILE and sorted(order) == sorted(p.name for p in local.iterdir())
    with pytest.raises(StorageError, match="not a directory"):
        artifacts.upload_dir(tmp_path / "nothing", "s3://bucket/up2")


def test_upload_to_a_disk_never_shows_a_partial_file(tmp_path, monkeypatch):
    local = saved_checkpoint(tmp_path, 3)
    seen: list[str] = []
    real = pafs.copy_files

    def recording(src, dest, **kw):
        seen.append(dest)
        return real(src, dest, **kw)

    monkeypatch.setattr(pafs, "copy_files", recording)
    artifacts.upload_dir(local, str(tmp_path / "dest"), last=(ckpt.STATE_FILE,))
    assert all(".tmp-" in d for d in seen)  # copied beside, then renamed into place
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted(p.name for p in local.iterdir())


def test_localize_copies_an_object_store_directory_once_and_names_a_missing_one(tmp_path, object_store,
                                                                                monkeypatch):
    src = tmp_path / "tok"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    artifacts.upload_dir(src, "s3://bucket/tok")
    calls: list[str] = []
    real = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda s, d, **kw: (calls.append(s), real(s, d, **kw))[1])
    first = artifacts.localize("s3://bucket/tok")
    assert Path(first, "a.txt").read_text() == "hello"
    assert artifacts.localize("s3://bucket/tok") == first and len(calls) == 1  # cached for the process
    assert artifacts.localize(str(src)) == str(src)  # a local path is used as it is
    with pytest.raises(NotFoundError, match="s3://bucket/nothing does not exist"):
        artifacts.localize("s3://bucket/nothing")


def test_localize_publishes_nothing_when_the_copy_fails(tmp_path, object_store, monkeypatch):
    src = tmp_path / "m"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 10)
    artifacts.upload_dir(src, "s3://bucket/m")

    def broken(*a, **kw):
        raise OSError("connection reset")

    monkeypatch.setattr(pafs, "copy_files", broken)
    with pytest.raises(OSError, match="connection reset"):
        artifacts.localize("s3://bucket/m")
    monkeypatch.undo()
    monkeypatch.setattr(storage, "resolve_storage", lambda uri: (object_store, uri.removeprefix("s3://")))
    monkeypatch.setattr(artifacts, "resolve_storage", lambda uri: (object_store, uri.removeprefix("s3://")))
    again = artifacts.localize("s3://bucket/m")  # nothing half-copied was kept: the next call fetches it whole
    assert Path(again, "w.bin").read_bytes() == b"x" * 10


def _complete(run_storage: RunStorage, stage: str) -> None:
    run_storage.fs.create_dir(run_storage.stage_path(stage), recursive=True)  # the in-memory store has directories
    with run_storage.writer(stage, {}) as w:
        w.commit()


def test_find_model_resolves_the_tokenizer_and_names_what_to_run(run_storage, tmp_path):
    with pytest.raises(StorageError, match="run the sft stage first"):
        artifacts.find_model(run_storage, "sft")
    _complete(run_storage, "sft")
    with pytest.raises(NotFoundError, match="has no exported model.*rerun the sft stage"):
        artifacts.find_model(run_storage, "sft")
    local = tmp_path / "model"
    ckpt.save_model(local, GPT(GPTConfig.from_depth(1, vocab_size=64, sequence_len=16, head_dim=64)), {"step": 1})
    artifacts.upload_dir(local, artifacts.stage_model_uri(run_storage, "sft"), last=(ckpt.CONFIG_FILE,))
    with pytest.raises(StorageError, match="run the tokenizer stage first"):
        artifacts.find_model(run_storage, "sft")
    _complete(run_storage, "tokenizer")
    ref = artifacts.find_model(run_storage, "sft")
    assert (ref.tokenizer, ref.tokenizer_beside) == (run_storage.stage_uri("tokenizer"), False)
    (local / ckpt.TOKENIZER_DIR).mkdir()
    (local / ckpt.TOKENIZER_DIR / "merges.txt").write_text("")
    artifacts.upload_dir(local, artifacts.stage_model_uri(run_storage, "sft"), last=(ckpt.CONFIG_FILE,))
    ref = artifacts.find_model(run_storage, "sft")
    assert ref.tokenizer == f"{ref.model}/{ckpt.TOKENIZER_DIR}" and ref.tokenizer_beside
    assert artifacts.read_model_config(ref.model)["model_config"]["n_layer"] == 1
    with pytest.raises(NotFoundError, match="no exported model at .*elsewhere: its config.json is missing"):
        artifacts.find_model(run_storage, "sft", explicit=f"{tmp_path}/elsewhere")
    json.dumps(ref.__dict__)  # plain strings: it travels in job configs
