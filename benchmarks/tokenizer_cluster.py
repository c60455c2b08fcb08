"""Tokenizer training through the cluster stage, both of its paths, vs in one process.

Same text (the `tiny` preset's budget of the embedded pack), same vocab size, same machine, same
run. The stage's two paths, each the whole stage minus evaluation: "blocks" (read + crop + budget
in Ray Data, `count_chunks` in N parallel tasks, merge + train in one task) and "one task" (read,
count and train in one Ray task: what budgets up to `one_task_max_chars` take). The reference is
rustbpe's `train_from_iterator` in this process over the same documents. Merges must be identical.
The blocks path's fixed cost (its seconds minus the reference's) is what sets the threshold.

Run: PYTHONPATH=. python benchmarks/tokenizer_cluster.py [--workers 2] [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray

from cluster.storage import RunStorage
from cluster.text_data import budget_documents
from jobs.config import data_location, load_stage_config
from jobs.tokenizer import TokenizerConfig, run_tokenizer
from nanochat.data import dataset
from nanochat.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="counting tasks (blocks)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    args = p.parse_args()

    cfg = load_stage_config(TokenizerConfig, "tokenizer", "tiny",
                            [f"vocab_size={args.vocab_size}", f"min_blocks={args.workers}", "eval_chars=0"])
    data = data_location("tiny", None)
    train, _ = dataset.train_val_split(dataset.list_shards(data))

    t0 = time.perf_counter()
    docs = list(budget_documents(train, doc_cap=cfg.doc_cap, max_chars=cfg.max_chars))
    local = Tokenizer.train_from_iterator(docs, cfg.vocab_size)
    t_local = time.perf_counter() - t0
    mb = sum(len(d.encode()) for d in docs) / 1e6

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    for path, limit in (("one task", cfg.max_chars), ("blocks", 0)):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            meta = run_tokenizer(cfg.model_copy(update={"one_task_max_chars": limit}), RunStorage("bench", d),
                                 data)
            took = time.perf_counter() - t0
            merges = Tokenizer.load(RunStorage("bench", d).local_path("tokenizer")).core.get_merges()
            rows.append((path, meta, took, merges == local.core.get_merges()))
    ray.shutdown()

    print(f"\ntext: {mb:.1f} MB, {len(docs)} documents, vocab {cfg.vocab_size}")
    print("| path | seconds | MB/s | ratio vs one process | merges identical | phases (s) |")
    print("|---|---:|---:|---:|---|---|")
    print(f"| one process (train_from_iterator) | {t_local:.2f} | {mb / t_local:.2f} | 1.00x | - | - |")
    for path, meta, took, same in rows:
        c = meta["counting"]
        print(f"| stage, {path} ({c['tasks']} counting task(s)) | {took:.2f} | {mb / took:.2f} "
              f"| {t_local / took:.2f}x | {same} | {meta['timings']} |")
    fixed = rows[1][2] - t_local
    print(f"blocks path's fixed cost: {fixed:.1f} s = {fixed * mb / t_local:.0f} MB of one-process training "
          f"at {mb / t_local:.1f} MB/s")


if __name__ == "__main__":
    main()
