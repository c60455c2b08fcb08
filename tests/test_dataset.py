"""Tests for nanochat/data/dataset.py: shard format, listing, validation, reading, and the FineWeb-Edu download.

Run: PYTHONPATH=. python -m pytest tests/test_dataset.py -q
No network needed: downloads go to a local HTTP server; the real-source test only checks the
offline failure (it is skipped on a machine that can reach huggingface.co).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.data import dataset
from nanochat.data.dataset import (
    DownloadError,
    ShardError,
    SourceUnavailableError,
    download_fineweb,
    fetch_file,
    get_source,
    iter_documents,
    iter_row_groups,
    list_shards,
    nanochat_home,
    train_val_split,
    validate_shard,
    write_shards,
)


def _docs(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} {i}: " + "é" * (i % 7) for i in range(n)]


@pytest.fixture
def written_pack(tmp_path: Path) -> tuple[list[Path], list[str], list[str]]:
    train, val = _docs(2500), _docs(300, "val")
    return write_shards(train, val, tmp_path / "pack", docs_per_shard=2048), train, val


def test_write_shards_format(written_pack):
    paths, train, val = written_pack
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    for path in paths:
        parquet = pq.ParquetFile(path)
        assert parquet.schema_arrow.names == ["text"]
        assert parquet.schema_arrow.field("text").type == pa.string()
    first = pq.ParquetFile(paths[0]).metadata
    assert [first.row_group(i).num_rows for i in range(first.num_row_groups)] == [1024, 1024]
    assert pq.ParquetFile(paths[1]).metadata.num_rows == 2500 - 2048
    listed = list_shards(paths[0].parent)
    train_shards, val_shards = train_val_split(listed)
    assert val_shards == [str(paths[-1])]
    assert list(iter_documents(train_shards)) == train
    assert list(iter_documents(val_shards)) == val


def test_write_shards_needs_both_splits(tmp_path):
    with pytest.raises(ValueError, match="validation"):
        write_shards(["a"], [], tmp_path)
    with pytest.raises(ValueError, match="training"):
        write_shards([], ["a"], tmp_path)


def test_ranks_split_row_groups_and_resume(written_pack):
    paths, train, _ = written_pack
    names = [str(p) for p in paths[:2]]
    rank0, rank1 = (list(iter_documents(names, rank=r, world_size=2)) for r in (0, 1))
    assert sorted(rank0 + rank1) == sorted(train)
    assert not set(rank0) & set(rank1)
    resumed = [(g.shard_index, g.row_group) for g in iter_row_groups(names, start=(0, 1))]
    assert resumed == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="rank 2"):
        next(iter_documents(names, rank=2, world_size=2))


def test_list_shards_local_and_uri(written_pack, tmp_path):
    paths, _, _ = written_pack
    (paths[0].parent / "shard_00009.parquet.part").write_bytes(b"partial")
    assert list_shards(paths[0].parent) == [str(p) for p in paths]
    uri = paths[0].parent.as_uri()  # file:// goes through pyarrow.fs.FileSystem.from_uri like s3:// and gs://
    assert list_shards(uri) == [p.as_uri() for p in paths]
    assert validate_shard(list_shards(uri)[0]).num_documents == 2048
    with pytest.raises(FileNotFoundError, match="--source embedded"):
        list_shards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        list_shards(tmp_path / "empty")
    with pytest.raises(ValueError, match="at least 2 shards"):
        train_val_split([str(paths[0])])


def test_validate_shard_names_a_corrupt_file(written_pack, tmp_path):
    paths, _, _ = written_pack
    info = validate_shard(paths[0], full=True)
    assert (info.num_documents, info.num_row_groups) == (2048, 2)
    truncated = tmp_path / "shard_truncated.parquet"
    truncated.write_bytes(paths[0].read_bytes()[:-100])
    with pytest.raises(ShardError, match="shard_truncated.parquet"):
        validate_shard(truncated)
    wrong = tmp_path / "wrong_column.parquet"
    pq.write_table(pa.table({"content": ["x"]}), wrong)
    with pytest.raises(ShardError, match="wrong_column.parquet.*'text'"):
        validate_shard(wrong)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        validate_shard(tmp_path / "missing.parquet")


def test_sources_and_home(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    assert nanochat_home() == tmp_path
    assert get_source("embedded").directory == tmp_path / "data" / "embedded"
    assert get_source("fineweb").directory == tmp_path / "data" / "fineweb"
    with pytest.raises(ValueError, match="unknown data source 'wikipedia'.*embedded, fineweb"):
        get_source("wikipedia")
    monkeypatch.delenv("NANOCHAT_HOME")
    assert nanochat_home() == Path.home() / ".cache" / "nanochat-ray"


# ----------------------------------------------------------------------------- downloads


class _ShardServer:
    """A local HTTP server with Range support that can cut the first response of a file in half."""

    def __init__(self, files: dict[str, bytes], *, cut_first: bool = False, honour_range: bool = True):
        self.files, self.cut_first, self.honour_range = files, cut_first, honour_range
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(200 if self.path in server.files else 404)
                self.end_headers()

            def do_GET(self):
                data = server.files.get(self.path)
                server.requests.append((self.path, self.headers.get("Range")))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range") and server.honour_range:
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                first = sum(1 for p, _ in server.requests if p == self.path) == 1
                body = data[start:]
                self.wfile.write(body[: len(body) // 2] if server.cut_first and first else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shard_bytes(tmp_path) -> bytes:
    return write_shards(_docs(3000), _docs(10), tmp_path / "src")[0].read_bytes()


@pytest.mark.parametrize("honour_range", [True, False])
def test_fetch_resumes_a_cut_download(tmp_path, shard_bytes, honour_range):
    server = _ShardServer({"/shard_00000.parquet": shard_bytes}, cut_first=True, honour_range=honour_range)
    try:
        final = tmp_path / "shard_00000.parquet"
        fetch_file(f"{server.url}/shard_00000.parquet", final, retries=3, backoff_s=0.01)
    finally:
        server.close()
    assert final.read_bytes() == shard_bytes
    assert not final.with_name(final.name + ".part").exists()
    assert server.requests[0][1] is None
    assert server.requests[1][1] == f"bytes={len(shard_bytes) // 2}-"  # the retry asked only for the rest


def test_fetch_gives_up_on_404_at_once(tmp_path):
    server = _ShardServer({})
    try:
        with pytest.raises(DownloadError, match="HTTP 404"):
            fetch_file(f"{server.url}/shard_00000.parquet", tmp_path / "x.parquet", retries=3, backoff_s=0.01)
    finally:
        server.close()
    assert len(server.requests) == 1


def test_download_fineweb_fetches_train_and_val_then_resumes(tmp_path, shard_bytes):
    files = {f"/shard_{i:05d}.parquet": shard_bytes for i in (0, 1, 1822)}
    server = _ShardServer(files)
    try:
        template = server.url + "/shard_{index:05d}.parquet"
        got = download_fineweb(2, tmp_path, workers=2, url_template=template)
        assert [p.name for p in got] == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
        assert train_val_split(list_shards(tmp_path))[1] == [str(tmp_path / "shard_01822.parquet")]
        seen = len(server.requests)
        (tmp_path / "shard_00001.parquet").write_bytes(b"broken")  # a corrupt leftover is fetched again
        download_fineweb(2, tmp_path, url_template=template)
        assert [p for p, _ in server.requests[seen:]] == ["/shard_00001.parquet"]
    finally:
        server.close()
    with pytest.raises(ValueError, match="num_shards"):
        download_fineweb(0, tmp_path)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(30)
def test_unreachable_server_fails_fast_naming_the_embedded_pack(tmp_path):
    template = f"http://127.0.0.1:{_closed_port()}/shard_{{index:05d}}.parquet"
    with pytest.raises(SourceUnavailableError, match="python -m jobs.data --source embedded"):
        download_fineweb(1, tmp_path, url_template=template)
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(30)
def test_real_fineweb_offline_error(tmp_path):
    """The real HuggingFace address, on a machine without access to it (as this project's CI)."""
    try:
        dataset.check_reachable(dataset.fineweb_shard_url(0), timeout=5.0)
        pytest.skip("huggingface.co is reachable here: the offline failure cannot be observed")
    except SourceUnavailableError:
        pass
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="huggingface.co.*--source embedded"):
        download_fineweb(3, tmp_path / "fineweb")
    print(f"offline failure after {time.monotonic() - started:.2f} s")
