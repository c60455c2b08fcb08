"""Run storage: where a run's stage outputs live, on a local disk or an object store.

A run is `{storage}/{run}/` with one directory per stage (see docs/DESIGN.md):

    {storage}/{run}/tokenizer/   {storage}/{run}/pretrain/   ...   {storage}/{run}/report/

Rules kept here, so no stage has to remember them:
- `storage` is a local directory (default `$NANOCHAT_HOME/runs`, NANOCHAT_HOME defaulting to
  `~/.cache/nanochat-ray`) or an `s3://` / `gs://` prefix; all access goes through `pyarrow.fs`.
- A stage directory is complete only when its `meta.json` exists; it is written last.
- Small outputs are built in a local staging directory and published whole (`StageWriter`):
  on a local disk the staging directory is renamed into place, and a previous complete output
  is replaced only after the new one is complete; on object stores (no rename) the files are
  uploaded and `meta.json` goes last, so the marker is the commit.
- Large outputs that grow during a stage (training checkpoints) are written in place under the
  stage directory; `StageWriter(in_place=True)` first removes a stale `meta.json` so a crashed
  rerun is never taken as complete.
- Per-step metrics are appended to `{stage}/metrics.jsonl` (`MetricsLog`).
- Every timed phase is also a span of the stage's timeline (`start-up`, `work` or `writing`, with
  wall-clock start and end) in meta.json's `timeline`, with the moment the pipeline submitted the
  stage (`NANOCHAT_SUBMITTED_AT`), so the report can split each stage's wall time
  (nanochat/timeline.py).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from nanochat.data.dataset import nanochat_home
from nanochat.errors import NanochatError

META_FILE = "meta.json"
SPAN_KINDS = ("start-up", "work", "writing")
METRICS_FILE = "metrics.jsonl"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STAGE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class StorageError(NanochatError, ValueError):
    """A storage URI that cannot be used (unknown scheme, not writable, missing output)."""


def validate_run_id(run: str) -> str:
    """Return `run` if it is a safe directory name, else raise a StorageError (a ValueError) that says why."""
    if not isinstance(run, str) or not _RUN_ID.match(run) or run in {".", ".."} or ".." in run:
        raise StorageError(
            f"run id {run!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', starting "
            "with a letter or digit, and no path characters ('/', '..', spaces)"
        )
    return run


def default_storage() -> str:
    """The default run storage: `$NANOCHAT_HOME/runs`."""
    return str(nanochat_home() / "runs")


def is_remote(uri: str) -> bool:
    """True for object-store URIs (`s3://`, `gs://`), which have no rename."""
    return uri.startswith(("s3://", "gs://", "gcs://"))


def resolve_storage(uri: str | None) -> tuple[pafs.FileSystem, str]:
    """Map a storage URI to a (pyarrow filesystem, path inside it) pair.

    Accepts `None` (the default local storage), a local path (absolute, relative or `~`),
    `file://` URIs, `s3://bucket/prefix` and `gs://bucket/prefix`.
    """
    uri = uri or default_storage()
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    scheme = uri.split("://", 1)[0]
    if scheme not in {"file", "s3", "gs", "gcs"}:
        raise StorageError(
            f"storage URI {uri!r} has unsupported scheme {scheme!r}: use a local path, s3:// or gs://"
        )
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises several types here, all of them mean "cannot use"
        raise StorageError(f"cannot open storage {uri!r}: {e}") from e
    return fs, path.rstrip("/")


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text_atomic(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Write a small text file so readers see the old content or the new, never half of it."""
    data = text.encode("utf-8")
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # object stores publish an object only when its upload completes
        with fs.open_output_stream(path) as f:
            f.write(data)


def git_commit() -> str:
    """The commit being run: `NANOCHAT_GIT_COMMIT` (set by the pipeline for uploaded jobs), else git."""
    if os.environ.get("NANOCHAT_GIT_COMMIT"):
        return os.environ["NANOCHAT_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def submitted_at() -> float | None:
    """When the pipeline submitted this stage (`NANOCHAT_SUBMITTED_AT`, epoch seconds), if it did."""
    try:
        return float(os.environ["NANOCHAT_SUBMITTED_AT"])
    except (KeyError, ValueError):
        return None


def software_versions() -> dict[str, str]:
    """Versions that decide whether two runs are comparable."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "ray", "pyarrow", "rustbpe"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "not installed"
    return versions


@dataclass
class RunStorage:
    """One run inside a storage location: stage paths, completeness, meta and metrics."""

    run: str
    uri: str | None = None
    fs: pafs.FileSystem = field(init=False, repr=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        self.uri = self.uri or default_storage()
        self.fs, base = resolve_storage(self.uri)
        self.root = f"{base}/{self.run}"

    @property
    def remote(self) -> bool:
        return is_remote(self.uri or "")

    def stage_path(self, stage: str) -> str:
        """Path of a stage directory inside `self.fs`."""
        if not _STAGE.match(stage):
            raise StorageError(f"stage name {stage!r} is not a valid directory name")
        return f"{self.root}/{stage}"

    def stage_uri(self, stage: str) -> str:
        """The stage directory as a URI other processes can open (what configs carry)."""
        if self.remote:
            scheme = (self.uri or "").split("://", 1)[0]
            return f"{scheme}://{self.stage_path(stage)}"
        return self.stage_path(stage)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_complete(self, stage: str) -> bool:
        """A stage is complete when its meta.json exists and parses."""
        try:
            self.read_meta(stage)
        except StorageError:
            return False
        return True

    def read_meta(self, stage: str) -> dict[str, Any]:
        path = f"{self.stage_path(stage)}/{META_FILE}"
        if not self.exists(path):
            raise StorageError(
                f"stage {stage!r} of run {self.run!r} is not complete: {self.uri}/{self.run}/{stage}/"
                f"{META_FILE} is missing (run the {stage} stage first)"
            )
        try:
            return json.loads(_read_text(self.fs, path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StorageError(f"{path} is corrupt ({e}); rerun the {stage} stage") from e

    def check_writable(self) -> None:
        """Fail early, naming the location, if the run storage cannot be written."""
        probe = f"{self.root}/.write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as e:
            raise StorageError(
                f"run storage {self.uri}/{self.run} is not writable ({e}); choose another "
                "location with --storage or NANOCHAT_HOME"
            ) from e

    def local_path(self, stage: str) -> Path:
        """A stage directory as a local path (local storage only), for code that needs files."""
        if self.remote:
            raise StorageError(f"stage {stage!r} lives on {self.uri}; download it before reading locally")
        return Path(self.stage_path(stage))

    def writer(self, stage: str, config: dict[str, Any], *, in_place: bool = False) -> StageWriter:
        return StageWriter(self, stage, config, in_place=in_place)

    def metrics(self, stage: str) -> MetricsLog:
        return MetricsLog(self, stage)

    def read_metrics(self, stage: str) -> list[dict[str, Any]]:
        path = f"{self.stage_path(stage)}/{METRICS_FILE}"
        if not self.exists(path):
            return []
        rows = []
        for line in _read_text(self.fs, path).splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-append; the rest is still good
        return rows


class StageWriter:
    """Builds a stage's output and publishes it with `meta.json` last.

    Staged mode (default): files go to `self.path`, a local staging directory; `commit()` moves
    them into place (local) or uploads them (object store), then writes meta.json. If the stage
    fails before `commit()`, the previous complete output stays untouched.
    In-place mode: `self.path` is the stage directory itself (local storage) and a stale
    meta.json is removed at the start, so a crash leaves the stage visibly incomplete.
    """

    def __init__(self, storage: RunStorage, stage: str, config: dict[str, Any], *, in_place: bool):
        self.storage, self.stage, self.config, self.in_place = storage, stage, config, in_place
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self.spans: list[dict[str, Any]] = []  # the timeline: {"name", "kind", "start", "end"}
        self.metrics: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        storage.check_writable()
        final = storage.stage_path(stage)
        if in_place:
            meta = f"{final}/{META_FILE}"
            if storage.exists(meta):
                storage.fs.delete_file(meta)
            storage.fs.create_dir(final, recursive=True)
            self.path = Path(final) if not storage.remote else Path(tempfile.mkdtemp(prefix=f"{stage}-"))
        elif storage.remote:
            self.path = Path(tempfile.mkdtemp(prefix=f"nanochat-{stage}-"))
        else:
            self.path = Path(f"{storage.root}/.staging-{stage}-{uuid.uuid4().hex[:8]}")
            self.path.mkdir(parents=True)

    @contextmanager
    def phase(self, name: str, kind: str = "work") -> Iterator[None]:
        """Time a named phase; the seconds land in meta.json's `timings`, and the phase is a span of
        the timeline of kind `kind` ("start-up", "work" or "writing")."""
        t0 = time.time()
        try:
            yield
        finally:
            self.timings[name] = round(time.time() - t0, 3)
            self.span(name, kind, t0, time.time())

    def span(self, name: str, kind: str, start: float, end: float) -> None:
        """Add a span to the timeline (a phase measured elsewhere, e.g. inside a Ray Train worker);
        a later span that overlaps an earlier one takes its time from it (see nanochat/timeline.py)."""
        if kind not in SPAN_KINDS:
            raise ValueError(f"span kind {kind!r} is not one of {SPAN_KINDS}")
        self.spans.append({"name": name, "kind": kind, "start": round(start, 3), "end": round(end, 3)})

    def commit(self) -> dict[str, Any]:
        """Publish the output; meta.json is written last. Returns the meta written."""
        fs, final = self.storage.fs, self.storage.stage_path(self.stage)
        if self.storage.remote:
            from cluster.artifacts import upload_dir  # (it imports this module)

            upload_dir(self.path, self.storage.stage_uri(self.stage))  # everything; then the marker, below
            shutil.rmtree(self.path, ignore_errors=True)
        elif not self.in_place:
            old = None
            if self.storage.exists(final):
                old = f"{self.storage.root}/.old-{self.stage}-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)  # the previous output leaves only when the new one is whole
            os.replace(self.path, final)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        meta = {
            "stage": self.stage,
            "run": self.storage.run,
            "config": self.config,
            "git_commit": git_commit(),
            "versions": software_versions(),
            "started_at": self.started,
            "finished_at": time.time(),
            "duration_s": round(time.time() - self.started, 3),
            "timings": self.timings,
            "timeline": {"submitted_at": submitted_at(), "started_at": self.started, "spans": self.spans},
            "metrics": self.metrics,
            **self.extra,
        }
        write_text_atomic(fs, f"{final}/{META_FILE}", json.dumps(meta, indent=2, default=str))
        return meta

    def abort(self) -> None:
        """Drop a staged output after a failure (in-place outputs stay, marked incomplete)."""
        if not self.in_place or self.storage.remote:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class MetricsLog:
    """Appends one JSON object per line to `{stage}/metrics.jsonl`.

    Local disks append and flush each record. Object stores cannot append, so records are kept
    and the whole file is rewritten on `flush()` (every `flush_every` records and at close).
    """

    def __init__(self, storage: RunStorage, stage: str, flush_every: int = 50):
        self.storage = storage
        self.path = f"{storage.stage_path(stage)}/{METRICS_FILE}"
        self.flush_every = flush_every
        self._records: list[str] = []
        storage.fs.create_dir(storage.stage_path(stage), recursive=True)
        if storage.remote and storage.exists(self.path):
            self._records = _read_text(storage.fs, self.path).splitlines()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=float)
        if not self.storage.remote:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            return
        self._records.append(line)
        if len(self._records) % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        if self.storage.remote:
            write_text_atomic(self.storage.fs, self.path, "\n".join(self._records) + "\n")
