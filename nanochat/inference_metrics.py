"""Inference figures of a model through our own engine, for the report card: TTFT, time per output
token, tokens/s at several batch sizes, peak memory.

`measure_inference(model, ...)` runs, for each batch size B, B prompts of `prompt_tokens` random
ordinary tokens (seeded, so every run feeds the same ids) through `nanochat.engine.Engine` with
greedy decoding and no stop tokens, so every row makes exactly `new_tokens` tokens. One untimed
warm-up request runs first (CPU weight prepacking, CUDA kernels). Per batch size:
- ttft_ms: mean over rows of the time from submitting the batch to that row's first token (all
  prompts are prefilled in one step, so this is the batched prefill's latency);
- tpot_ms: mean over rows of (last token time - first token time) / (new_tokens - 1);
- tokens_per_s: B x new_tokens / the batch's wall time (prefill included).
Peak memory: on CUDA the allocator's peak over the measurement (torch.cuda.max_memory_allocated);
on CPU the process's peak resident set (getrusage), which covers everything the process held
before too. Nothing here knows about runs or storage (jobs/report.py calls it).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

from nanochat.engine import Engine, SamplingParams

DEFAULT_BATCH_SIZES = (1, 8, 32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _one_batch(model: Any, prompts: list[list[int]], new_tokens: int,
               device: torch.device) -> dict[str, float]:
    engine = Engine(model, max_batch_size=len(prompts), max_seq_len=len(prompts[0]) + new_tokens,
                    max_prefill_tokens=len(prompts) * len(prompts[0]))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    try:
        _sync(device)
        t0 = time.perf_counter()
        for row, _ in engine.stream(prompts, params):
            _sync(device)
            now = time.perf_counter()
            first.setdefault(row, now)
            last[row] = now
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    rows = len(prompts)
    ttft = sum(first[r] - t0 for r in range(rows)) / rows
    tpot = sum((last[r] - first[r]) / max(1, new_tokens - 1) for r in range(rows)) / rows
    return {"ttft_ms": 1000 * ttft, "tpot_ms": 1000 * tpot, "tokens_per_s": rows * new_tokens / wall,
            "wall_s": wall}


def measure_inference(model: Any, *, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                      prompt_tokens: int = 128, new_tokens: int = 64, special_from: int | None = None,
                      seed: int = 0) -> dict[str, Any]:
    """The figures described in the module docstring, as a JSON-ready dict:
    {"batches": {B: {ttft_ms, tpot_ms, tokens_per_s, wall_s}}, "peak_memory_mib", "memory_kind",
     "device", "dtype", "prompt_tokens", "new_tokens", "seconds"}.
    special_from: the first special-token id (prompts use ids below it); default the whole vocabulary."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
    if prompt_tokens < 1 or new_tokens < 2:
        raise ValueError(f"need prompt_tokens >= 1 and new_tokens >= 2, got {prompt_tokens} and {new_tokens}")
    if prompt_tokens + new_tokens > model.config.sequence_len * 10:
        raise ValueError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} is beyond the model's "
                         "rotary tables (10 x sequence_len)")
    param = next(model.parameters())
    device = param.device
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    high = special_from or model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # warm-up
    _one_batch(model, [torch.randint(0, high, (prompt_tokens,), generator=gen).tolist()], 2, device)
    batches = {}
    for b in batch_sizes:
        prompts = torch.randint(0, high, (b, prompt_tokens), generator=gen).tolist()
        batches[str(b)] = {k: round(v, 3) for k, v in _one_batch(model, prompts, new_tokens, device).items()}
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "CUDA allocator peak"
    else:
        peak, kind = _peak_rss_mib(), "process peak RSS"
    return {"batches": batches, "peak_memory_mib": round(peak, 1), "memory_kind": kind, "device": str(device),
            "dtype": str(param.dtype).removeprefix("torch."), "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "seconds": round(time.perf_counter() - t_start, 2)}
