"""Structured-output benchmark on CPU: the per-token mask cost of three grammar libraries on our
vocabulary, and what constrained rows cost the free rows of a mixed engine batch.

1. mask cost: the tokenizer is trained on the embedded data pack to --vocab tokens (byte-level
   BPE + nanochat's 9 special tokens). For each JSON schema below, a fixed valid document is
   encoded with it; each library compiles the schema once (compact JSON, no free whitespace),
   then for every token of the document computes the packed bitmask of allowed next tokens and
   consumes the token; --passes walks (fresh matcher each) per document. Printed: compile time
   (first pass, wall), median / p90 / mean CPU microseconds of the calling thread per mask
   (`time.thread_time`: on a shared machine waiting for a core is not counted; every library
   computes the mask in the calling thread), and the median's ratio to llguidance.
   llguidance is what the service uses (serve_app/grammar.py); outlines-core and xgrammar are
   optional (`pip install .[grammar-bench]`) and skipped when missing.
2. mixed batch: a random GPT (--layers x --width, the tokenizer's vocabulary) decodes 16 rows
   for --tokens new tokens, EOS ignored, temperature 1, fixed seeds; once with 16 free rows, once
   with 12 free rows + 4 rows constrained by the "nested" schema's grammar; a constrained row
   whose document is complete starts a fresh one (so every step of it computes a real JSON mask,
   as a server whose finished constrained requests are replaced). The 12 free rows make the same
   tokens in both runs (asserted); their tokens per second of wall time and per CPU-second of the
   process are compared: the reference is the all-free run. One warm-up run of each, then best of
   --repeats, interleaved. One torch thread by default: on an oversubscribed machine, OpenMP
   threads that wait for each other burn CPU time and make both figures noise. The mask time
   (fill + apply, thread CPU time) per constrained row-step inside the engine is printed too.

Run: PYTHONPATH=. python benchmarks/structured_outputs.py [--vocab 32768] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pyarrow.parquet as pq
import torch

from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

DOCS = {  # name -> (schema, a valid document)
    "nested": ({"type": "object", "additionalProperties": False,
                "required": ["user", "active"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                 "properties": {"name": {"type": "string", "maxLength": 32},
                                "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
        "active": {"type": "boolean"}}},
        {"user": {"name": "Rosalind of the Forest of Arden", "age": 19}, "active": True}),
    "array_enum": ({"type": "object", "additionalProperties": False,
                    "required": ["tags", "color"], "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "color": {"enum": ["red", "green", "blue"]}}},
        {"tags": ["the", "quality of mercy", "is not strained", "it droppeth"], "color": "green"}),
    "free_text": ({"type": "object", "additionalProperties": False, "required": ["text"],
                   "properties": {"text": {"type": "string"}}},
                  {"text": "To be, or not to be, that is the question: whether 'tis nobler in the mind "
                           "to suffer the slings and arrows of outrageous fortune, "
                           "or to take arms against a sea of troubles."}),
}
SPECIAL_COUNT = 9


def train_tokenizer(vocab: int, docs: int) -> Tokenizer:
    from jobs.datapack import build_embedded_pack

    shard = sorted(build_embedded_pack().glob("shard_*.parquet"))[0]
    texts = pq.read_table(shard, columns=["text"])["text"].to_pylist()[:docs]
    return Tokenizer.train_from_iterator(texts, vocab)


# ---- 1. mask cost per library ------------------------------------------------------------------


def bench_llguidance(tok: Tokenizer, schema: dict, tokens: list[int]) -> tuple[float, list[float]]:
    from serve_app.grammar import GrammarCompiler

    compiler = GrammarCompiler(tok, (tok.encode_special("<|assistant_end|>"),))  # per model, not per schema
    t0 = time.perf_counter()
    grammar = compiler.json_schema(schema)
    c = grammar.constraint()
    compile_s = time.perf_counter() - t0
    words = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    times = []
    for t in tokens:
        t0 = time.thread_time()
        c.fill_bitmask(words)
        times.append(time.thread_time() - t0)
        c.accept(t)
    assert c.error is None and c.accepting, c.error
    return compile_s, times


def bench_xgrammar(tok: Tokenizer, schema: dict, tokens: list[int]) -> tuple[float, list[float]]:
    import xgrammar as xgr

    vocab = [b for b, _ in tok.core.get_mergeable_ranks()] + [b""] * SPECIAL_COUNT
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                             stop_token_ids=[tok.encode_special("<|assistant_end|>")])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for t in tokens:
        t0 = time.thread_time()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.thread_time() - t0)
        assert matcher.accept_token(t), f"xgrammar refused token {t}"
    return compile_s, times


def bench_outlines(tok: Tokenizer, schema: dict, tokens: list[int]) -> tuple[float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    eos = tok.encode_special("<|assistant_end|>")
    mapping: dict[bytes, list[int]] = {}
    for i, (b, _) in enumerate(tok.core.get_mergeable_ranks()):
        mapping.setdefault(b, []).append(i)
    vocabulary = Vocabulary(eos, mapping)
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=""), vocabulary)
    guide = Guide(index)
    compile_s = time.perf_counter() - t0
    words = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    times = []
    for t in tokens:
        t0 = time.thread_time()
        guide.write_mask_into(words.data_ptr(), words.numel(), 4)
        times.append(time.thread_time() - t0)
        guide.advance(t)
    return compile_s, times


LIBRARIES = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines-core": bench_outlines}


def mask_costs(tok: Tokenizer, passes: int) -> dict[str, float]:
    print(f"\n1. mask cost per token, vocabulary {tok.vocab_size}, {passes} walks per document "
          "(compile = schema -> matcher, the vocabulary prepared once beforehand)")
    print(f"{'schema':<12} {'library':<14} {'tokens':>6} {'compile ms':>11} {'median us':>10} "
          f"{'p90 us':>8} {'mean us':>8} {'median vs llguidance':>21}")
    ours: dict[str, float] = {}
    for name, (schema, doc) in DOCS.items():
        tokens = tok.encode(json.dumps(doc, separators=(",", ":")))
        for lib, bench in LIBRARIES.items():
            try:
                compile_s, times = bench(tok, schema, tokens)
                for _ in range(passes - 1):
                    times += bench(tok, schema, tokens)[1]
            except ImportError:
                print(f"{name:<12} {lib:<14} (not installed: pip install .[grammar-bench])")
                continue
            except Exception as e:  # noqa: BLE001 - a library that cannot run this schema is reported, not fatal
                print(f"{name:<12} {lib:<14} failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            median_us, mean_us = 1e6 * statistics.median(times), 1e6 * statistics.fmean(times)
            p90 = 1e6 * sorted(times)[int(0.9 * (len(times) - 1))]
            if lib == "llguidance":
                ours[name] = median_us
            ratio = f"{median_us / ours[name]:.2f}x" if name in ours else "-"
            print(f"{name:<12} {lib:<14} {len(tokens):>6} {1000 * compile_s:>11.1f} {median_us:>10.1f} "
                  f"{p90:>8.1f} {mean_us:>8.1f} {ratio:>21}")
    return ours


# ---- 2. mixed batch ----------------------------------------------------------------------------


def mixed_batch(tok: Tokenizer, layers: int, width: int, new_tokens: int, repeats: int) -> None:
    from serve_app.grammar import GrammarCompiler

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=1024, vocab_size=tok.vocab_size, n_layer=layers, n_head=width // 64,
                       n_kv_head=width // 64, n_embd=width)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2 * width**-0.5)  # varied logits (init zeroes lm_head)
    model.eval()
    grammar = GrammarCompiler(tok, (tok.encode_special("<|assistant_end|>"),)).json_schema(DOCS["nested"][0])

    class Cycling:
        """A grammar row that starts a fresh document when one is complete (see the docstring)."""

        def __init__(self) -> None:
            self.c = grammar.constraint()

        def fill_bitmask(self, words: torch.Tensor) -> None:
            if self.c.matcher.is_stopped():
                self.c = grammar.constraint()
            self.c.fill_bitmask(words)

        def accept(self, token: int) -> None:
            self.c.accept(token)
    prompts = [tok.encode(f"Scene {i}. Enter the ghost of Hamlet's father.", prepend="<|bos|>")
               for i in range(16)]
    mask_times: list[float] = []

    def run(constrained: int) -> tuple[float, list[list[int]]]:
        engine = Engine(model, max_batch_size=16, max_seq_len=1024)
        inner = engine._constrain

        def timed(logits, slots):  # the mask fill + apply of each step, for the per-row cost
            t0 = time.thread_time()
            out = inner(logits, slots)
            if any(s.constraint is not None for s in slots):
                mask_times.append((time.thread_time() - t0) / constrained)
            return out

        engine._constrain = timed
        free = []
        for i, p in enumerate(prompts):
            params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i)
            if i < 16 - constrained:
                free.append(engine.add_request(p, params))
            else:
                engine.add_group(p, params, [Cycling()])
        t0, c0 = time.perf_counter(), time.process_time()
        while engine.has_unfinished():
            engine.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, [engine.result(s).tokens for s in free]

    best = {k: [float("inf"), float("inf")] for k in (0, 4)}  # wall, cpu
    tokens = {}
    run(0), run(4)  # warm-up: oneDNN weight packing, first-call allocations
    mask_times.clear()
    for _ in range(repeats):
        for constrained in (0, 4):
            wall, cpu, toks = run(constrained)
            best[constrained] = [min(best[constrained][0], wall), min(best[constrained][1], cpu)]
            tokens[constrained] = toks
    assert tokens[4] == tokens[0][:12], "free rows changed when neighbours were constrained"
    free_tokens = 12 * new_tokens
    print(f"\n2. mixed batch: GPT {layers} x {width}, vocab {tok.vocab_size}, 16 rows, "
          f"{new_tokens} new tokens, temperature 1 (best of {repeats})")
    print(f"{'batch':<26} {'wall s':>8} {'free tok/s':>11} {'ratio':>7} {'cpu s':>8} "
          f"{'free tok/cpu-s':>15} {'ratio':>7}")
    for k, label in ((0, "16 free (reference)"), (4, "12 free + 4 constrained")):
        wall, cpu = best[k]
        print(f"{label:<26} {wall:>8.2f} {free_tokens / wall:>11.1f} {best[0][0] / wall:>7.3f} {cpu:>8.2f} "
              f"{free_tokens / cpu:>15.1f} {best[0][1] / cpu:>7.3f}")
    print(f"mask fill + apply inside the engine: {1e6 * statistics.median(mask_times):.1f} us "
          f"per constrained row-step (median of {len(mask_times)} steps)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--docs", type=int, default=4000, help="documents of the pack to train the tokenizer on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--passes", type=int, default=5, help="walks of each document per library")
    ap.add_argument("--skip-mixed", action="store_true", help="only the mask-cost table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = train_tokenizer(args.vocab, args.docs)
    print(f"tokenizer: {tok.vocab_size} tokens trained on {args.docs} pack documents in "
          f"{time.perf_counter() - t0:.1f} s; torch threads {args.threads}")
    mask_costs(tok, args.passes)
    if not args.skip_mixed:
        mixed_batch(tok, args.layers, args.width, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
