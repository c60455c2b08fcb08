"""Tokenizer stage: count BPE chunks of the training text across the cluster, train merges on one node.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.tokenizer --preset tiny --run demo
    python -m jobs.tokenizer --preset micro --run r1 --set vocab_size=1024   # directly

Sized to the text: a budget of at most `one_task_max_chars` is read, counted and trained in one
Ray task (Ray Data's start-up alone costs more than counting such a text); a larger one is spread:
1. Ray Data reads the training shards (all but the last), crops each document to `doc_cap`
   characters and takes documents until `max_chars` (cluster/text_data.py);
2. every block is counted by rustbpe (`count_chunks`, parallel, GIL released) in its own Ray task;
   the per-block chunk-count tables (Arrow) stay in the object store;
3. one task on one node merges the tables (in Rust) and trains the merges.
Both paths take the same documents and give identical merges (tests/test_tokenizer_stage.py).
Then evaluation: bytes per token on the validation shard and on fixed texts, against GPT-2/GPT-4
when tiktoken can load them.
Output `{run}/tokenizer/`: the tokenizer files (nanochat/tokenizer.py), `tokenizer.json` for HF
`tokenizers`, `meta.json` (vocab size, characters seen, seconds per phase, compression).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from cluster.storage import RunStorage
from jobs.config import StageConfig, data_location, load_stage_config, stage_argparser
from nanochat.data import dataset
from nanochat.errors import entrypoint

# Below this budget one task reads, counts and trains: rustbpe counts ~25 MB/s in one process (its
# counting is already multi-threaded), so 250M characters take about as long as the block path's fixed
# cost (Ray Data start-up, reads, one task per block: ~10 s on 2 cores); above it, blocks spread the
# counting over the cluster's nodes and keep each task's text in bounds (benchmarks/tokenizer_cluster.py).
ONE_TASK_MAX_CHARS = 250_000_000


class TokenizerConfig(StageConfig):
    """What the tokenizer stage reads and trains."""

    data: str | None = Field(None, description="shard directory or s3://, gs:// prefix; default: the "
                                               "preset's data source")
    vocab_size: int = Field(65536, ge=265, description="tokens in all: 256 bytes + merges + 9 special tokens")
    max_chars: int = Field(2_000_000_000, gt=0,
                           description="characters of training text to count (whole documents)")
    doc_cap: int = Field(10_000, gt=0, description="each document is cropped to this many characters")
    min_blocks: int = Field(2, ge=1,
                            description="count in at least this many blocks, each in its own Ray task")
    one_task_max_chars: int = Field(ONE_TASK_MAX_CHARS, ge=0,
                                    description="budgets (max_chars) up to this many characters are read, "
                                                "counted and trained in one Ray task instead of Ray Data "
                                                "blocks (0: always blocks)")
    count_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each counting task")
    train_cpus: float = Field(1.0, gt=0, description="CPUs reserved by the merge-training task")
    pattern: str | None = Field(None, description="pre-tokenizer split regex; default: GPT-4's with 1-2 "
                                                  "digit numbers")
    eval_chars: int = Field(5_000_000, ge=0,
                            description="characters of the validation shard used for bytes/token")


def _count_block(batch: pa.Table, pattern: str | None) -> pa.Table:
    from nanochat.tokenizer import count_chunks

    return count_chunks(batch[dataset.TEXT_COLUMN], pattern)


def _train_merges(count_tables: list, vocab_size: int, pattern: str | None) -> dict[str, bytes]:
    """Runs in one Ray task: merge the block counts, train, return the saved tokenizer files."""
    import ray

    from nanochat.tokenizer import Tokenizer

    tables = ray.get(count_tables)
    tok = Tokenizer.train_from_counts(tables, vocab_size, pattern)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def _train_one_task(shards: list[str], doc_cap: int, max_chars: int, vocab_size: int,
                    pattern: str | None) -> tuple[dict[str, bytes], int, int]:
    """Runs in one Ray task: the budgeted documents (cluster/text_data.py's definition), trained in
    this process; returns (the saved tokenizer files, documents, characters)."""
    from cluster.text_data import budget_documents
    from nanochat.tokenizer import Tokenizer

    docs = list(budget_documents(shards, doc_cap=doc_cap, max_chars=max_chars))
    n_chars = sum(map(len, docs))
    if n_chars == 0:
        raise ValueError(f"no text to train on: the shards {shards[:3]} hold no non-empty documents")
    tok = Tokenizer.train_from_iterator(docs, vocab_size, pattern)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}, len(docs), n_chars


def evaluate_tokenizer(tok, val_shards: list[str], eval_chars: int) -> dict:
    """Bytes per token on the validation text and fixed texts, with the references available."""
    from nanochat.evals.compression import SAMPLE_TEXTS, compression_report, load_reference_encodings

    texts = dict(SAMPLE_TEXTS)
    if eval_chars > 0 and val_shards:
        from cluster.text_data import budget_documents

        texts["validation"] = "".join(budget_documents(val_shards, doc_cap=10**9, max_chars=eval_chars))
    references, note = load_reference_encodings()
    report = compression_report({"ours": tok.core.encode, **references}, texts)
    return {"bytes_per_token": report, "references": note}


def run_tokenizer(cfg: TokenizerConfig, storage: RunStorage, data: str) -> dict:
    """Run the stage on the connected Ray cluster; returns the meta written."""
    import ray

    from nanochat.evals.compression import format_report
    from nanochat.tokenizer import Tokenizer

    shards = dataset.list_shards(data)
    train, val = dataset.train_val_split(shards)
    if not train:
        raise dataset.ShardError(f"no training shards under {data}: need at least 2 shards "
                                 "(the last is validation)")
    with storage.writer("tokenizer", {**cfg.model_dump(), "data": data}) as w:
        if cfg.max_chars <= cfg.one_task_max_chars:
            with w.phase("train"):
                task = ray.remote(num_cpus=cfg.train_cpus)(_train_one_task)
                try:
                    files, n_docs, n_chars = ray.get(task.remote(train, cfg.doc_cap, cfg.max_chars,
                                                                 cfg.vocab_size, cfg.pattern))
                except ray.exceptions.RayTaskError as e:  # "no text to train on" as the error it is
                    raise (e.cause if isinstance(e.cause, ValueError) else e) from None
            counting = {"path": "one task", "tasks": 1, "blocks": 1, "count_tables": 0}
        else:
            from cluster.text_data import map_stage_counts, read_budgeted_text  # imports Ray Data: seconds

            with w.phase("read"):
                text, n_docs, n_chars = read_budgeted_text(train, doc_cap=cfg.doc_cap,
                                                           max_chars=cfg.max_chars,
                                                           min_blocks=cfg.min_blocks)
            with w.phase("count"):
                counted = text.map_batches(_count_block, fn_kwargs={"pattern": cfg.pattern},
                                           batch_format="pyarrow", batch_size=None,
                                           num_cpus=cfg.count_cpus).materialize()
                refs = counted.to_arrow_refs()
                tasks, blocks = map_stage_counts(counted.stats(), "count_block")
            with w.phase("train"):
                train_task = ray.remote(num_cpus=cfg.train_cpus)(_train_merges)
                files = ray.get(train_task.remote(refs, cfg.vocab_size, cfg.pattern))
            counting = {"path": "blocks", "tasks": tasks, "blocks": blocks, "count_tables": len(refs)}
        with w.phase("write", "writing"):
            for name, blob in files.items():
                (w.path / name).write_bytes(blob)
            tok = Tokenizer.load(w.path)
            tok.export_hf(w.path / "tokenizer.json")
        with w.phase("evaluate"):
            evaluation = evaluate_tokenizer(tok, val, cfg.eval_chars)
        w.metrics.update({"vocab_size": tok.vocab_size, "documents": n_docs, "chars": n_chars,
                          "val_bytes_per_token":
                              evaluation["bytes_per_token"].get("validation", {}).get("ours")})
        w.extra["counting"] = counting
        w.extra["evaluation"] = evaluation
        meta = w.commit()
    print(format_report(evaluation["bytes_per_token"]))
    print(f"references: {evaluation['references']}")
    return meta


@entrypoint
def main(argv: list[str] | None = None) -> int:
    args = stage_argparser("tokenizer", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_stage_config(TokenizerConfig, "tokenizer", args.preset, args.overrides)
    storage = RunStorage(args.run, args.storage)
    if storage.is_complete("tokenizer") and not args.force:
        print(f"tokenizer of run {args.run} is complete ({storage.stage_uri('tokenizer')}); "
              "--force reruns it")
        return 0
    data = data_location(args.preset, cfg.data)
    import ray

    ray.init(log_to_driver=True)
    meta = run_tokenizer(cfg, storage, data)
    print(f"tokenizer: vocab {meta['metrics']['vocab_size']}, {meta['metrics']['chars']:,} chars, "
          f"counted in {meta['counting']['path']} ({meta['counting']['tasks']} task(s), "
          f"{meta['counting']['blocks']} block(s)), "
          f"phases {meta['timings']} -> {storage.stage_uri('tokenizer')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
