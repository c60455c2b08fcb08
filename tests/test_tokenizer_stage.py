"""The tokenizer stage on the local cluster: distributed counting equals one process, the one-task
path (small budgets) gives the same merges as the blocks path; bad input."""

from __future__ import annotations

import pytest

from cluster.storage import RunStorage
from cluster.text_data import _budget_count, budget_documents, map_stage_counts
from jobs.config import ConfigError, load_stage_config
from jobs.tokenizer import TokenizerConfig, run_tokenizer
from nanochat.data import dataset
from nanochat.tokenizer import Tokenizer


def test_budget_takes_whole_documents_up_to_the_crossing_one():
    import numpy as np

    lengths = np.array([5, 5, 5, 5])
    assert _budget_count(lengths, 10) == 2
    assert _budget_count(lengths, 11) == 3
    assert _budget_count(lengths, 1000) == 4
    assert _budget_count(np.array([], dtype=int), 10) == 0


def test_stats_parser_reads_tasks_and_blocks():
    stats = ("Operator 1 ReadParquet: 2 tasks executed, 2 blocks produced in 1s\n"
             "Operator 3 MapBatches(count_block): 3 tasks executed, 3 blocks produced in 2s\n")
    assert map_stage_counts(stats, "count_block") == (3, 3)
    assert map_stage_counts(stats, "nothing") == (0, 0)


def test_vocab_below_bytes_plus_specials_is_refused():
    with pytest.raises(ConfigError, match="vocab_size"):
        load_stage_config(TokenizerConfig, "tokenizer", "micro", ["vocab_size=200"])


@pytest.mark.cluster
def test_cluster_counts_in_parallel_and_equals_single_process(ray_cluster, embedded_pack, tmp_path):
    cfg = load_stage_config(TokenizerConfig, "tokenizer", "micro", ["eval_chars=20000", "one_task_max_chars=0"])
    storage = RunStorage("tok", str(tmp_path))
    meta = run_tokenizer(cfg, storage, str(embedded_pack))
    assert meta["counting"]["tasks"] >= 2 and meta["counting"]["blocks"] >= 2, meta["counting"]
    assert storage.is_complete("tokenizer")
    for phase in ("read", "count", "train", "evaluate"):
        assert phase in meta["timings"]
    cluster_tok = Tokenizer.load(storage.local_path("tokenizer"))
    assert cluster_tok.vocab_size == cfg.vocab_size

    train, _ = dataset.train_val_split(dataset.list_shards(str(embedded_pack)))
    docs = list(budget_documents(train, doc_cap=cfg.doc_cap, max_chars=cfg.max_chars))
    assert sum(map(len, docs)) == meta["metrics"]["chars"] and len(docs) == meta["metrics"]["documents"]
    local_tok = Tokenizer.train_from_iterator(docs, cfg.vocab_size)
    assert cluster_tok.core.get_merges() == local_tok.core.get_merges()
    assert (storage.local_path("tokenizer") / "tokenizer.json").is_file()


@pytest.mark.cluster
def test_a_small_budget_is_trained_in_one_task_with_the_merges_of_the_blocks_path(ray_cluster, embedded_pack,
                                                                                 tmp_path):
    metas, merges = {}, {}
    for path, limit in (("one task", "2000000"), ("blocks", "0")):  # micro's budget: 2M characters
        cfg = load_stage_config(TokenizerConfig, "tokenizer", "micro", ["eval_chars=0", f"one_task_max_chars={limit}"])
        storage = RunStorage(path.replace(" ", "-"), str(tmp_path))
        metas[path] = run_tokenizer(cfg, storage, str(embedded_pack))
        merges[path] = Tokenizer.load(storage.local_path("tokenizer")).core.get_merges()
    one, blocks = metas["one task"], metas["blocks"]
    assert one["counting"]["path"] == "one task" and "read" not in one["timings"]
    assert blocks["counting"]["path"] == "blocks" and blocks["counting"]["tasks"] >= 2
    assert len(merges["one task"]) == 512 - 256 - 9 and merges["one task"] == merges["blocks"]
    for key in ("documents", "chars"):
        assert one["metrics"][key] == blocks["metrics"][key]


@pytest.mark.cluster
def test_empty_corpus_is_a_clear_error_and_writes_nothing(ray_cluster, tmp_path):
    data = tmp_path / "empty"
    dataset.write_shards(["", ""], ["validation text"], data, docs_per_shard=10)
    cfg = load_stage_config(TokenizerConfig, "tokenizer", "micro")
    storage = RunStorage("tok", str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="no text to train on"):
        run_tokenizer(cfg, storage, str(data))
    assert not storage.is_complete("tokenizer")
    assert not list((tmp_path / "runs" / "tok").glob(".staging-*"))
