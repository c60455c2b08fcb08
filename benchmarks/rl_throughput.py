"""Benchmark: RL rollout tokens/s with 1 vs 2 rollout actors, and the cost of a weight sync per step.

    python -m benchmarks.rl_throughput [--depth 4] [--prompts 8] [--group 8] [--max-new-tokens 32]
                                       [--rounds 3] [--address auto]

Builds a stand-in starting model (nanochat's init: uniform sampling, so every completion runs to
max_new_tokens and both settings generate the same number of tokens) and a small tokenizer in a
temporary run, then with cluster/rl.py's RLRun on the toy task:
1. rollouts of the same prompts, seeds and token counts with 1 and with 2 rollout actors (1 CPU and
   1 torch thread each); tokens/s = generated tokens / wall time from dispatch to the last result;
2. the weight sync of one step (learner -> every actor) and its check (checksums + probe log-probs),
   through the object store and through a gloo broadcast group.
The reference of each ratio is named in its table: 1 actor, and the object-store sync.
Starts its own local Ray instance (--num-cpus logical CPUs) unless --address is given.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from cluster.rl import RLRun
from cluster.specs import RLSpec
from cluster.storage import RunStorage
from jobs.config import load_stage_config
from jobs.rl import RLConfig
from nanochat.checkpoint import save_model
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

CORPUS = ["The sea is wide and the moon is bright over the small town by the river.",
          "Write a few words, then end your answer with a word. Tell me about music and books."] * 8


def stand_in_model(root: Path, depth: int, vocab: int, sequence_len: int) -> str:
    """An exported model + tokenizer at root/bench/sft/model; returns its path."""
    dest = root / "bench" / "sft" / "model"
    tok = Tokenizer.train_from_iterator(CORPUS, vocab_size=vocab)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, vocab_size=tok.vocab_size, sequence_len=sequence_len,
                                     head_dim=64))
    model.init_weights()
    save_model(dest, model, {"step": 0})
    tok.save(dest / "tokenizer")
    return str(dest)


def measure(spec: RLSpec, root: Path, model: str, rounds: int) -> dict[str, list[float]]:
    """Rollout rounds (tokens, seconds) and sync/check seconds of one RLRun."""
    out: dict[str, list[float]] = {"tokens": [], "wall_s": [], "sync_s": [], "verify_s": []}
    storage = RunStorage("bench", str(root))
    with RLRun(spec, storage, model_uri=model, tokenizer_uri=f"{model}/tokenizer", ray_metrics=False) as run:
        run.start()
        run.gather(run.launch("train", run.step_items(0), 0, spec.group_size))  # warm-up: first calls, caches
        for r in range(rounds):
            t0 = time.perf_counter()
            got = run.gather(run.launch("train", run.step_items(r + 1), 1000 * r, spec.group_size))
            out["wall_s"].append(time.perf_counter() - t0)
            out["tokens"].append(got.tokens)
            sync = run.sync()
            out["sync_s"].append(sync["sync_s"])
            out["verify_s"].append(sync["verify_s"])
    shutil.rmtree(root / "bench" / "rl", ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (width 64 x depth, heads of 64)")
    p.add_argument("--vocab", type=int, default=300,
                   help="tokenizer vocabulary (the small corpus allows <= 333)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per round")
    p.add_argument("--group", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per setting (after one warm-up)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local cluster")
    p.add_argument("--address", default=None, help="connect to this cluster instead of starting one")
    args = p.parse_args(argv)
    ray.init(address=args.address or "local", num_cpus=None if args.address else args.num_cpus,
             log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="rl-bench-"))
    try:
        model = stand_in_model(root, args.depth, args.vocab, sequence_len=256)
        def spec(*more: str) -> RLSpec:  # the micro preset's RL, as a user would override it
            overrides = ["task=toy", "num_steps=1", f"examples_per_step={args.prompts}",
                         f"group_size={args.group}", f"max_new_tokens={args.max_new_tokens}", "top_k=0",
                         "rollout_cpus=1.0", "learner_cpus=1.0",
                         "sandbox_actors=0", f"rollout_slots={args.prompts * args.group}", "max_seq_len=null",
                         "eval_every=0", "checkpoint_every=0", *more]
            return load_stage_config(RLConfig, "rl", "micro", overrides).to_spec(cluster_gpus=0)

        runs = {k: measure(spec(f"num_rollout_actors={k}"), root, model, args.rounds) for k in (1, 2)}
        runs["broadcast"] = measure(spec("num_rollout_actors=2", "weight_sync=broadcast"), root, model,
                                    args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()

    print(f"\nrollouts: depth {args.depth}, {args.prompts} prompts x {args.group} samples x "
          f"{args.max_new_tokens} tokens per round, median of {args.rounds} rounds (reference: 1 actor)")
    print("| rollout actors | tokens/round | wall s | tokens/s | ratio |")
    print("|---|---|---|---|---|")
    rate = {k: statistics.median(t / s for t, s in zip(runs[k]["tokens"], runs[k]["wall_s"], strict=True))
            for k in (1, 2)}
    for k in (1, 2):
        print(f"| {k} | {int(statistics.median(runs[k]['tokens']))} "
              f"| {statistics.median(runs[k]['wall_s']):.3f} "
              f"| {rate[k]:,.0f} | {rate[k] / rate[1]:.2f}x |")
    print("\nweight sync per step to 2 actors, median (reference: object store)")
    print("| sync | sync ms | check ms | total ms | ratio |")
    print("|---|---|---|---|---|")
    total = {}
    for name, key in (("object store", 2), ("broadcast (gloo)", "broadcast")):
        s, v = statistics.median(runs[key]["sync_s"]) * 1e3, statistics.median(runs[key]["verify_s"]) * 1e3
        total[name] = s + v
        print(f"| {name} | {s:.1f} | {v:.1f} | {s + v:.1f} | {total[name] / total['object store']:.2f}x |")


if __name__ == "__main__":
    main()
