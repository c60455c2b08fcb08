"""Chat evaluation's generation: items decoded together vs one item at a time, on one evaluation actor.

What an evaluation actor does with a chunk of generative items (GSM8K, sampled answers) and of
format items (greedy, at most 8 tokens): before issue 21's batching every item ran on its own
engine call (batch of one prompt or its k samples); now a chunk's items share decode steps
(`nanochat.evals.chat.GENERATION_ROWS` rows). The reference is the old way, reproduced by calling
the same functions on one item at a time (the answers are the same: checked here, and in
tests/test_chat_eval.py). Same model, same items, same thread count (1, as an evaluation actor),
the two sides interleaved over --repeats runs; best wall time per side.

Model: --model DIR (an exported model with its tokenizer, e.g. a demo run's
`$NANOCHAT_HOME/runs/demo/sft/model`); without it, the demo run's SFT model if present, else the
tiny preset's shape (depth 4, width 256) with random weights and a 512-token tokenizer trained on
300 documents of the embedded pack (a random model rarely stops early: the longest case).

Run: PYTHONPATH=. python benchmarks/chat_eval.py [--model DIR] [--items 24] [--format-items 100]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import torch

from nanochat.evals import chat as chat_eval
from nanochat.evals.harness import EvalState
from nanochat.tasks import eval_tasks


def load_state(model_dir: str | None) -> tuple[EvalState, str]:
    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import Tokenizer

    home = Path(os.environ.get("NANOCHAT_HOME", Path.home() / ".cache" / "nanochat-ray"))
    demo = home / "runs" / "demo" / "sft" / "model"
    if model_dir is None and demo.is_dir():
        model_dir = str(demo)
    if model_dir is not None:
        model, meta = load_model(model_dir, "cpu")
        tok = Tokenizer.load(meta["tokenizer_dir"])
        return EvalState(model, tok, "cpu", model.config.sequence_len), model_dir
    from jobs.datapack import build_embedded_pack
    from nanochat.data.dataset import iter_documents, list_shards
    from nanochat.gpt import GPT, GPTConfig

    docs = list(itertools.islice(iter_documents(list_shards(build_embedded_pack())[:1]), 300))
    tok = Tokenizer.train_from_iterator(docs, vocab_size=512)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(4, tok.vocab_size, 256, head_dim=64))
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.05)
    model.eval()
    return EvalState(model, tok, "cpu", 256), "random depth-4 x 256 (vocab 512)"


def timed(fn) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--items", type=int, default=24, help="GSM8K items (the demo: 48 over 2 actors)")
    p.add_argument("--format-items", type=int, default=100, help="format items (the demo: 200 over 2)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    state, what = load_state(args.model)
    evals = eval_tasks(offline=True)
    gsm = chat_eval.chat_requests({"gsm8k": evals["gsm8k"]}, max_per_task=args.items)
    formats = chat_eval.format_requests(evals, args.format_items)
    greedy = chat_eval.SampleSettings(num_samples=1, max_new_tokens=args.max_new_tokens, temperature=0.0)
    sampler = chat_eval.SampleAnswers(greedy)
    cases = {"GSM8K, greedy": (sampler, gsm), "format": (chat_eval.check_format, formats)}
    print(f"model: {what}; torch threads 1; {len(gsm)} GSM8K items (max {args.max_new_tokens} new tokens), "
          f"{len(formats)} format items; {chat_eval.GENERATION_ROWS} rows together; best of {args.repeats}")
    print("| items | one at a time (s) | together (s) | speed-up | same answers |\n|---|---:|---:|---:|---|")
    for name, (fn, requests) in cases.items():
        best = {"alone": float("inf"), "together": float("inf")}
        outs = {}
        for _ in range(args.repeats):
            t, outs["alone"] = timed(lambda: [a for r in requests for a in fn(state, [r])])  # noqa: B023
            best["alone"] = min(best["alone"], t)
            t, outs["together"] = timed(lambda: fn(state, requests))  # noqa: B023
            best["together"] = min(best["together"], t)
        same = [a.texts for a in outs["alone"]] == [a.texts for a in outs["together"]]
        print(f"| {name} ({len(requests)}) | {best['alone']:.2f} | {best['together']:.2f} | "
              f"{best['alone'] / best['together']:.2f}x | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
