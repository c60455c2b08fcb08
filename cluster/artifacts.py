"""Stored artifacts of a run: the one place that knows how they are fetched, found and published.

    local = localize(uri)                         # a local directory with the files of `uri`
    ref = find_model(storage, "sft")              # the stage's exported model and its tokenizer
    found = latest_checkpoint(storage, "pretrain")  # the newest COMPLETE training checkpoint
    upload_dir(local_dir, dest_uri, last=[STATE_FILE])   # files first, the marker last

- `localize`: a local path is used as it is; an `s3://` or
  `gs://` URI is copied once per process into a cache directory keyed by the URI (a missing one
  is an error naming it), published by a rename only when the copy is whole; the cache is removed
  when the process exits.
- `find_model`: a stage's exported model is `{run}/<stage>/model/` (its config.json is written
  last), or an explicit directory (ours or transformers' NanoChat format, nanochat/hf_format.py).
  Its tokenizer is the one beside the weights (`tokenizer/`, or a transformers `tokenizer.json`),
  else the run's tokenizer stage. Errors name the stage to run.
- `latest_checkpoint`: one rule for every stage and every storage, built on the core's
  completeness marker (nanochat/checkpoint.py: state.json names the world size, and the model and
  every rank's files must be present). Ray Train names its directories
  `{run}/<stage>/checkpoint_NNNNNNN/`; RL writes the same names. Runs written before that change
  kept RL's at `{run}/rl/checkpoints/step_NNNNNN/`; those are still found. A directory whose
  files are not all there (a crash or an upload cut short) is never picked.
- `upload_dir`: copy a local directory to a URI with the named marker files last, so a reader
  that checks the marker never sees half of it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from cluster.storage import RunStorage, StorageError, resolve_storage
from nanochat import checkpoint as ckpt
from nanochat import hf_format
from nanochat.errors import NotFoundError
from nanochat.hf_format import TOKENIZER_FILE as HF_TOKENIZER_FILE
from nanochat.tokenizer import Tokenizer

MODEL_DIR = "model"  # a stage's exported model: {run}/<stage>/model/
CHECKPOINT_PREFIX = "checkpoint_"  # {run}/<stage>/checkpoint_0000120/
LEGACY_RL_CHECKPOINTS = ("checkpoints", "step_")  # {run}/rl/checkpoints/step_000120/ (runs before the rename)

_cache_lock = threading.Lock()
_cache: dict[str, Path] = {}
_cache_root: Path | None = None


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _remove_cache() -> None:
    if _cache_root is not None:
        shutil.rmtree(_cache_root, ignore_errors=True)


def localize(uri: str) -> str:
    """A local directory holding the files of `uri` (see the module docstring)."""
    if _is_local(uri):  # as it is: a missing one is reported by whoever reads it, with its context
        return str(Path(uri.removeprefix("file://")).expanduser())
    global _cache_root
    with _cache_lock:
        if uri in _cache and _cache[uri].exists():
            return str(_cache[uri])
        if _cache_root is None:
            _cache_root = Path(tempfile.mkdtemp(prefix="nanochat-artifacts-"))
            atexit.register(_remove_cache)
        fs, path = resolve_storage(uri)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise NotFoundError(f"{uri} does not exist")
        target = _cache_root / hashlib.sha256(uri.encode()).hexdigest()[:16]
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=_cache_root))
        try:
            pafs.copy_files(path, str(partial), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _cache[uri] = target
        return str(target)


def load_tokenizer(uri: str) -> Tokenizer:
    """The tokenizer at `uri` (our directory or a transformers tokenizer.json directory)."""
    return Tokenizer.load(localize(uri))


def exists(uri: str) -> bool:
    fs, path = resolve_storage(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> dict[str, Any]:
    fs, path = resolve_storage(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


# ----------------------------------------------------------------------------- exported models


@dataclass(frozen=True)
class ModelRef:
    """An exported model and the tokenizer it was trained with."""

    model: str  # directory URI of the weights and config.json
    tokenizer: str  # directory URI of the tokenizer
    tokenizer_beside: bool  # the tokenizer travels with the model (inside its directory)


def read_model_config(model_uri: str) -> dict[str, Any]:
    """config.json of an exported model (local path or URI); NotFoundError naming it when absent.
    A transformers NanoChat config.json is translated to {"model_config": GPTConfig fields, "hf_config"}."""
    if not exists(f"{model_uri}/{ckpt.CONFIG_FILE}"):
        raise NotFoundError(f"no exported model at {model_uri}: its {ckpt.CONFIG_FILE} is missing")
    config = read_json(f"{model_uri}/{ckpt.CONFIG_FILE}")
    if "model_type" in config and "model_config" not in config:  # transformers' NanoChat format
        return {"model_config": asdict(hf_format.gpt_config_from_hf(config, model_uri)), "hf_config": config}
    return config


def stage_model_uri(storage: RunStorage, stage: str) -> str:
    return f"{storage.stage_uri(stage)}/{MODEL_DIR}"


def find_model(storage: RunStorage, stage: str, explicit: str | None = None) -> ModelRef:
    """The exported model of `stage` in the run (or the `explicit` directory) and its tokenizer;
    errors say which stage to run first (StorageError / NotFoundError)."""
    if explicit:
        model = explicit
        if not exists(f"{model}/{ckpt.CONFIG_FILE}"):
            raise NotFoundError(f"no exported model at {model}: its {ckpt.CONFIG_FILE} is missing")
    else:
        storage.read_meta(stage)  # "... (run the <stage> stage first)" when it is not complete
        model = stage_model_uri(storage, stage)
        if not exists(f"{model}/{ckpt.CONFIG_FILE}"):
            raise NotFoundError(f"stage {stage!r} of run {storage.run!r} has no exported model at {model} "
                                f"(its {ckpt.CONFIG_FILE} is missing): rerun the {stage} stage "
                                "(with --force) to export it")
    if exists(f"{model}/{ckpt.TOKENIZER_DIR}"):
        return ModelRef(model, f"{model}/{ckpt.TOKENIZER_DIR}", True)
    if exists(f"{model}/{HF_TOKENIZER_FILE}"):  # a transformers directory holds its tokenizer.json
        return ModelRef(model, model, True)
    storage.read_meta("tokenizer")  # "... (run the tokenizer stage first)" when missing
    return ModelRef(model, storage.stage_uri("tokenizer"), False)


# ----------------------------------------------------------------------------- training checkpoints


@dataclass(frozen=True)
class FoundCheckpoint:
    """A complete training checkpoint in storage."""

    step: int
    uri: str
    state: dict[str, Any]  # its state.json


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of `step` (Ray Train's and RL's)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def is_complete(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """state.json of the checkpoint directory at `path` if every file the core requires is there,
    else None."""
    try:
        with fs.open_input_stream(f"{path}/{ckpt.STATE_FILE}") as f:
            state = json.loads(f.read().decode())
        names = ckpt.required_files(int(state["world_size"]))
    except (OSError, FileNotFoundError, ValueError, KeyError, TypeError):  # absent, torn or not ours
        return None
    infos = fs.get_file_info([f"{path}/{n}" for n in names])
    return state if all(i.type == pafs.FileType.File for i in infos) else None


def _candidates(storage: RunStorage, stage: str) -> list[tuple[int, str, str]]:
    """(step, path, uri) of every checkpoint-named directory of the stage, newest first."""
    root, root_uri = storage.stage_path(stage), storage.stage_uri(stage)
    out = []
    for sub, prefix in (("", CHECKPOINT_PREFIX), LEGACY_RL_CHECKPOINTS):
        base = f"{root}/{sub}" if sub else root
        if not storage.exists(base):
            continue
        for info in storage.fs.get_file_info(pafs.FileSelector(base, recursive=False)):
            name = info.base_name
            if (info.type == pafs.FileType.Directory and name.startswith(prefix)
                    and name[len(prefix):].isdigit()):
                uri = f"{root_uri}/{sub}/{name}" if sub else f"{root_uri}/{name}"
                out.append((int(name[len(prefix):]), info.path, uri))
    return sorted(out, key=lambda c: c[0], reverse=True)


def latest_checkpoint(storage: RunStorage, stage: str) -> FoundCheckpoint | None:
    """The newest complete checkpoint of the stage (see the module docstring), or None."""
    for step, path, uri in _candidates(storage, stage):
        state = is_complete(storage.fs, path)
        if state is not None:
            return FoundCheckpoint(int(state.get("step", step)), uri, state)
    return None


def checkpoints(storage: RunStorage, stage: str) -> list[str]:
    """URIs of every checkpoint-named directory of the stage, oldest first (retention deletes from the
    front)."""
    return [uri for _, _, uri in reversed(_candidates(storage, stage))]


# ----------------------------------------------------------------------------- publishing


def upload_dir(local: str | Path, dest_uri: str, last: tuple[str, ...] = ()) -> None:
    """Copy the files of the local directory into `dest_uri` (created), the names in `last` after every
    other file, in that order: a reader that waits for them sees the directory whole."""
    fs, dest = resolve_storage(dest_uri)
    local = Path(local)
    if not local.is_dir():
        raise StorageError(f"cannot upload {local}: not a directory")
    fs.create_dir(dest, recursive=True)
    first = [p for p in sorted(local.rglob("*"))
             if p.is_file() and p.relative_to(local).as_posix() not in last]
    on_disk = isinstance(fs, pafs.LocalFileSystem)
    for p in first + [local / n for n in last if (local / n).is_file()]:
        rel = p.relative_to(local).as_posix()
        if "/" in rel:
            fs.create_dir(f"{dest}/{rel.rsplit('/', 1)[0]}", recursive=True)
        final = f"{dest}/{rel}"
        # a disk shows a file while it is copied: copy beside it, then rename (object stores publish
        # an object only when its upload completes)
        tmp = f"{final}.tmp-{os.getpid()}" if on_disk else final
        pafs.copy_files(str(p), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        if tmp != final:
            fs.move(tmp, final)


def delete_dir(uri: str) -> None:
    """Remove a directory of the storage (checkpoint retention), if it exists."""
    fs, path = resolve_storage(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def clear_stage(storage: RunStorage, stage: str) -> None:
    """Delete everything of a stage, its checkpoints included: `--force` starts it over."""
    delete_dir(storage.stage_uri(stage))
