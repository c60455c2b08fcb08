"""Our engine vs `transformers` generate on the same weights (a NanoChat directory), greedy decoding.

    PYTHONPATH=. python benchmarks/hf_generate.py [--depth 4] [--batches 1,8,32] [--prompt 128]
                                                 [--new 64] [--repeats 3] [--threads 2]

A random NanoChat model of nanochat's depth-derived shape (width 64 x depth, head_dim 64, vocabulary
4,096, as the tiny preset) is made by transformers itself (`NanoChatForCausalLM(config)`, its own
random init), saved with `save_pretrained`, and imported into our GPT through nanochat/hf_format.py:
both sides hold exactly the same float32 weights. For each batch size B, B random prompts of equal
length (no padding on either side) generate `--new` tokens greedily, with no stop token:
- ours: `nanochat.engine.Engine.generate` (KV cache slots, CPU prepacked linears);
- reference: `NanoChatForCausalLM.generate(do_sample=False)` (SDPA, its dynamic KV cache).
Tokens/s = B x new / wall time (prefill included), the median of `--repeats` runs, alternating
which side goes first. The first row of each side must be the same tokens (checked and printed).
Prints one table with the ratio ours / transformers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine, SamplingParams

    width, vocab = 64 * args.depth, 4096
    config = transformers.NanoChatConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=args.depth,
        num_attention_heads=width // 64, num_key_value_heads=width // 64, max_position_embeddings=1024,
        rms_norm_eps=torch.finfo(torch.float32).eps, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    theirs = transformers.NanoChatForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours, _ = load_model(d, "cpu")
    gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=args.new,
                                               eos_token_id=None, pad_token_id=0)
    params = SamplingParams(max_new_tokens=args.new, temperature=0.0)

    def run_ours(prompts: torch.Tensor) -> tuple[float, list[int]]:
        engine = Engine(ours, max_batch_size=len(prompts), max_seq_len=args.prompt + args.new,
                        max_prefill_tokens=prompts.numel())
        t0 = time.perf_counter()
        gens = engine.generate(prompts.tolist(), params)
        wall = time.perf_counter() - t0
        engine.close()
        return wall, gens[0].tokens

    def run_theirs(prompts: torch.Tensor) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  generation_config=gen_config)
        return time.perf_counter() - t0, out[0, args.prompt:].tolist()

    gen = torch.Generator().manual_seed(1)
    run_ours(torch.randint(1, vocab, (1, 8), generator=gen))  # warm-up both sides
    run_theirs(torch.randint(1, vocab, (1, 8), generator=gen))
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = torch.randint(1, vocab, (b, args.prompt), generator=gen)
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        same = True
        for r in range(args.repeats):
            order = ((("ours", run_ours), ("hf", run_theirs)) if r % 2 == 0
                     else (("hf", run_theirs), ("ours", run_ours)))
            first = {}
            for name, fn in order:
                wall, first[name] = fn(prompts)
                times[name].append(wall)
            same = same and first["ours"] == first["hf"]
        tps = {k: b * args.new / statistics.median(v) for k, v in times.items()}
        rows.append((b, tps["ours"], tps["hf"], tps["ours"] / tps["hf"], same))
    print(f"depth {args.depth} (width {width}, {ours.num_params():,} parameters), prompt {args.prompt}, "
          f"{args.new} new tokens, {args.threads} torch threads, median of {args.repeats}, "
          f"torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("| batch | ours tok/s | transformers generate tok/s | ours / transformers | same greedy tokens |")
    print("|---|---|---|---|---|")
    for b, o, h, ratio, same in rows:
        print(f"| {b} | {o:.0f} | {h:.0f} | {ratio:.2f}x | {'yes' if same else 'NO'} |")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
