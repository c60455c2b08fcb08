"""Evaluation speed on one actor: CORE scoring and chat generation, before vs after issue 21's changes.

1. CORE scoring (the base-model evaluation's bulk): one forward pass per item over its choices. The
   reference computes the output layer at every position, as before; now the model is asked for
   the logits of the scored positions only (`GPT.forward(logits_at=...)`; the output layer of a
   4,096-token vocabulary is a quarter of the tiny model's FLOPs per token). Rows: the pack's 14
   CORE tasks, --core-items items each.
2. Chat generation: a chunk of generative items (GSM8K, greedy) and of format items (greedy, at most
   8 tokens); the reference runs every item on its own engine call, as before; now a chunk's
   generative items share decode steps (`nanochat.evals.chat.GENERATION_ROWS` rows) and its format
   items run one at a time on one engine (prefill-bound: batched, their prompts would be padded).
Both sides produce the same scores/answers (printed, and tested in tests/test_core_eval.py and
tests/test_chat_eval.py). Same model, items and thread count (1, as an evaluation actor); the sides
interleaved over --repeats runs; the best CPU time per side (process time, one thread: what the
wall time is on an idle core; this machine is shared, its wall times swing).

Models: --base DIR and --chat DIR (exported models with their tokenizers); by default the demo run's
`$NANOCHAT_HOME/runs/demo/pretrain/model` and `.../sft/model` when they exist, else the tiny
preset's shape (depth 4, width 256) with random weights and a 512-token tokenizer trained on 300
documents of the embedded pack (a random model rarely stops early: the longest generation case).

Run: PYTHONPATH=. python benchmarks/eval_speed.py [--core-items 16] [--items 24] [--format-items 100]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from nanochat.evals import chat as chat_eval
from nanochat.evals.harness import EvalState
from nanochat.tasks import eval_tasks


def load_state(model_dir: str | None, stage: str) -> tuple[EvalState, str]:
    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import Tokenizer

    home = Path(os.environ.get("NANOCHAT_HOME", Path.home() / ".cache" / "nanochat-ray"))
    demo = home / "runs" / "demo" / stage / "model"
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


def best_of(repeats: int, sides: dict[str, Callable[[], list]]) -> tuple[dict[str, float], dict[str, list]]:
    """Best CPU seconds (this process, all threads: on a shared machine steadier than wall time) and
    the output of each side, the sides interleaved `repeats` times."""
    best, outs = dict.fromkeys(sides, float("inf")), {}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.process_time()
            outs[name] = fn()
            best[name] = min(best[name], time.process_time() - t0)
    return best, outs


def core_rows(args: argparse.Namespace) -> None:
    from nanochat.evals.core import build_requests, score_requests
    from nanochat.evals.core_tasks import pack_core_tasks

    state, what = load_state(args.base, "pretrain")
    requests = [r for task in pack_core_tasks() for r in build_requests(task, args.core_items)]
    model = state.model
    every_position = replace(state, model=lambda idx: model(idx))  # no logits_at: the old path

    def scored(prepack: bool, st: EvalState) -> Callable[[], list]:
        def run() -> list:
            model.set_cpu_prepack(prepack)
            return score_requests(st, requests)
        return run

    sides = {"before": scored(False, every_position), "logits_at": scored(False, state),
             "now": scored(True, state)}
    labels = {"before": "every position, F.linear (before)", "logits_at": "scored positions, F.linear",
              "now": "scored positions, prepacked linears (now)"}
    best, outs = best_of(args.repeats, sides)
    print(f"\nCORE scoring: {what}; {len(requests)} items (14 tasks); torch threads 1; "
          f"best of {args.repeats}")
    print("| output layer at, linears | CPU s | items per CPU s | speed-up | same scores as before |\n"
          "|---|---:|---:|---:|---|")
    for name, label in labels.items():
        same = [r.score for r in outs[name]] == [r.score for r in outs["before"]]
        print(f"| {label} | {best[name]:.2f} | {len(requests) / best[name]:.1f} | "
              f"{best['before'] / best[name]:.2f}x | {'yes' if same else 'NO'} |")


def chat_rows(args: argparse.Namespace) -> None:
    state, what = load_state(args.chat, "sft")
    evals = eval_tasks(offline=True)
    gsm = chat_eval.chat_requests({"gsm8k": evals["gsm8k"]}, max_per_task=args.items)
    formats = chat_eval.format_requests(evals, args.format_items)
    greedy = chat_eval.SampleSettings(num_samples=1, max_new_tokens=args.max_new_tokens, temperature=0.0)
    cases = {"GSM8K, greedy": (chat_eval.SampleAnswers(greedy), gsm),
             "format": (chat_eval.check_format, formats)}
    print(f"\nChat generation: {what}; torch threads 1; {chat_eval.GENERATION_ROWS} rows together; "
          f"GSM8K up to {args.max_new_tokens} new tokens; best of {args.repeats}")
    print("| items | one at a time (CPU s) | together (CPU s) | speed-up | same answers |\n"
          "|---|---:|---:|---:|---|")
    for name, (fn, requests) in cases.items():
        best, outs = best_of(args.repeats, {
            "alone": lambda: [a for r in requests for a in fn(state, [r])],  # noqa: B023
            "together": lambda: fn(state, requests)})  # noqa: B023
        same = [a.texts for a in outs["alone"]] == [a.texts for a in outs["together"]]
        print(f"| {name} ({len(requests)}) | {best['alone']:.2f} | {best['together']:.2f} | "
              f"{best['alone'] / best['together']:.2f}x | {'yes' if same else 'NO'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="exported base model (CORE)")
    p.add_argument("--chat", default=None, help="exported chat model (generation)")
    p.add_argument("--core-items", type=int, default=16, help="items per CORE task (the demo: 64)")
    p.add_argument("--items", type=int, default=24, help="GSM8K items (the demo: 48 over 2 actors)")
    p.add_argument("--format-items", type=int, default=100, help="format items (the demo: 200 over 2)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--parts", default="core,chat", help="comma-separated: core, chat")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    if "core" in parts:
        core_rows(args)
    if "chat" in parts:
        chat_rows(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
