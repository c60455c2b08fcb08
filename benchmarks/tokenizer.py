"""Tokenizer benchmark: rustbpe against the references, same text, vocab size, machine and run.

1. training throughput (MB of text per second over the whole training, counting included):
   rustbpe `Tokenizer.from_iterator` vs HF `tokenizers` (BPE + BpeTrainer, pre-tokenizer = Split with
   the same pattern + ByteLevel, i.e. the layout of `Tokenizer.export_hf`);
2. batch encode throughput on the validation text: rustbpe `encode_batch` vs a `tiktoken.Encoding`
   built from rustbpe's mergeable ranks and pattern (`encode_ordinary_batch`), both with the same
   thread count; the ids must be identical on the whole validation text (checked, printed).

Text: `--data DIR` (parquet shards with a `text` column; the last shard is validation, the rest
training), or `--text-file F` (last 10% of lines = validation); by default the embedded pack
(~/.cache/nanochat-ray/data/embedded) or, without it, the installed Python standard library's
sources. Thread counts are fixed for all three libraries before they start (default 2).

Run: PYTHONPATH=. python benchmarks/tokenizer.py [--data DIR] [--vocab-size 8192] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

EMBEDDED = (Path(os.environ.get("NANOCHAT_HOME", Path.home() / ".cache" / "nanochat-ray"))
            / "data" / "embedded")


def load_parquet(directory: Path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    shards = sorted(directory.glob("*.parquet"))
    if len(shards) < 2:
        raise SystemExit(f"{directory} needs at least 2 parquet shards (training + validation), "
                         f"found {len(shards)}")
    read = [pq.read_table(s, columns=["text"])["text"].to_pylist() for s in shards]
    return [t for shard in read[:-1] for t in shard], read[-1]


def load_text_file(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    docs = ["".join(lines[i:i + 50]) for i in range(0, len(lines), 50)]  # 50-line documents
    cut = max(1, len(docs) * 9 // 10)
    return docs[:cut], docs[cut:]


def load_stdlib(max_bytes: int = 20_000_000) -> tuple[list[str], list[str]]:
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    cut = len(docs) * 9 // 10
    return docs[:cut], docs[cut:]


def mb(texts: list[str]) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Fastest of `repeat` runs (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def train_hf(texts: list[str], vocab_size: int, pattern: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="directory of parquet shards with a `text` column")
    ap.add_argument("--text-file", type=Path, help="a UTF-8 text file instead of shards")
    ap.add_argument("--vocab-size", type=int, default=8192, help="tokens including the 256 bytes")
    ap.add_argument("--threads", type=int, default=2, help="threads for every library")
    ap.add_argument("--repeat", type=int, default=5, help="encode runs per library (best is kept)")
    args = ap.parse_args()
    # Thread pools read these when first used: set before any of the libraries starts one.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # rustbpe's global pool (training)
    os.environ["RAYON_RS_NUM_THREADS"] = str(args.threads)  # HF tokenizers
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    import tiktoken

    import rustbpe

    if args.text_file:
        source, (train, val) = str(args.text_file), load_text_file(args.text_file)
    elif args.data or EMBEDDED.is_dir():
        d = args.data or EMBEDDED
        source, (train, val) = str(d), load_parquet(d)
    else:
        source, (train, val) = "Python stdlib sources", load_stdlib()
    pattern = rustbpe.DEFAULT_PATTERN
    print(f"text: {source}: training {mb(train):.1f} MB ({len(train)} docs), validation {mb(val):.1f} MB "
          f"({len(val)} docs); vocab size {args.vocab_size}; threads: rustbpe {args.threads} (rayon), "
          f"HF tokenizers {args.threads} (RAYON_RS_NUM_THREADS), tiktoken {args.threads} (num_threads)")

    rows = []
    t_hf, hf = best_time(lambda: train_hf(train, args.vocab_size, pattern), 1)
    t_rs, tok = best_time(lambda: rustbpe.Tokenizer.from_iterator(iter(train), args.vocab_size), 1)
    t_count, counts = best_time(lambda: rustbpe.count_chunks(train), 1)
    t_merge, _ = best_time(lambda: rustbpe.Tokenizer.from_counts(counts, args.vocab_size), 1)
    rows.append(("train", "HF tokenizers BpeTrainer (reference)", t_hf, mb(train) / t_hf, 1.0))
    rows.append(("train", "rustbpe from_iterator", t_rs, mb(train) / t_rs, t_hf / t_rs))
    print(f"rustbpe training split: count_chunks {t_count:.2f} s ({len(counts)} distinct chunks), "
          f"merges {t_merge:.2f} s; HF vocab {hf.get_vocab_size()}, rustbpe vocab {tok.vocab_size}")

    enc = tiktoken.Encoding("rustbpe", pat_str=tok.get_pattern(),
                            mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={})
    t_tk, ids_tk = best_time(lambda: enc.encode_ordinary_batch(val, num_threads=args.threads), args.repeat)
    t_rb, ids_rb = best_time(lambda: tok.encode_batch(val, num_threads=args.threads), args.repeat)
    t_rb1, _ = best_time(lambda: tok.encode_batch(val, num_threads=1), args.repeat)
    t_tk1, _ = best_time(lambda: enc.encode_ordinary_batch(val, num_threads=1), args.repeat)
    rows.append(("encode", f"tiktoken encode_ordinary_batch, {args.threads} threads (reference)", t_tk,
                 mb(val) / t_tk, 1.0))
    rows.append(("encode", f"rustbpe encode_batch, {args.threads} threads", t_rb, mb(val) / t_rb,
                 t_tk / t_rb))
    rows.append(("encode", "tiktoken encode_ordinary_batch, 1 thread", t_tk1, mb(val) / t_tk1, t_tk / t_tk1))
    rows.append(("encode", "rustbpe encode_batch, 1 thread", t_rb1, mb(val) / t_rb1, t_tk / t_rb1))

    print("\n| task | implementation | seconds | MB/s | ratio vs reference |\n|---|---|---:|---:|---:|")
    for task, name, secs, rate, ratio in rows:
        print(f"| {task} | {name} | {secs:.3f} | {rate:.1f} | {ratio:.2f}x |")
    identical = ids_rb == ids_tk
    n_tokens = sum(map(len, ids_rb))
    print(f"\nids identical to tiktoken on the whole validation text: {'yes' if identical else 'NO'} "
          f"({n_tokens} tokens, {mb(val) * 1e6 / max(n_tokens, 1):.2f} bytes/token)")
    if not identical:
        raise SystemExit("rustbpe and tiktoken disagree on the validation text")


if __name__ == "__main__":
    main()
