"""Multi-turn chat benchmark: prefix reuse and chunked prefill, ours vs
`transformers serve --continuous-batching`.

    PYTHONPATH=. python benchmarks/serve_multiturn.py                        # default sizes, a few minutes
    PYTHONPATH=. python benchmarks/serve_multiturn.py --clients 1,4,16,32    # the issue's full sizes
        [--turns 3] [--system-tokens 1000] [--user-tokens 40] [--tokens 32] [--threads 2]
        [--parts second,multiturn,join,ttft] [--chunk 128] [--join-chunks 0,32,128] [--join-repeats 2]

One exported model serves both sides: a random GPT (6 layers x 384, 6 heads, vocab 8,192,
sequence length 2,048; nanochat's architecture) written by `write_random_checkpoint` and
exported with `nanochat.hf_format.save_hf`, the directory `transformers` loads as
NanoChatForCausalLM. Everything talks to 127.0.0.1 only; the load generator (aiohttp, this
process) shares the machine's cores with the servers. Parts:
- second: one conversation with a fresh system prompt of `--system-tokens`: TTFT of turn 1 and
  turn 2 and turn 2's `usage.prompt_tokens_details.cached_tokens` (3 conversations, medians).
- multiturn: C clients at once, each holding a conversation of `--turns` turns (the shared system
  prompt + its own user turns; each turn re-sends the whole history with the replies as text).
  TTFT p50/p95 (request -> first content chunk), inter-token latency p50/p95 (gaps between
  content chunks) and tok/s (completion tokens from `usage` / the level's wall time). Services:
  ours with prefix reuse, ours without (`prefix_cache_mb=0`), and transformers serve with its
  defaults but for its KV cache's memory (`--hf-memory-percent`); the order rotates per level;
  one run per level. Ratios are vs transformers serve.
- join: in-process engine, no HTTP: 16 streams decode, then a 2,000-token prompt joins. The
  streams' inter-token p95 before the join and over the gaps that overlap the long prompt's
  prefill, and its TTFT, for each `--join-chunks` value (0 = chunking off). By default timed in
  CPU time of one torch thread (`--join-clock cpu`): on a machine shared with other work the wall
  time of a step swung 10x between repeats; the CPU time is what the wall time is on an idle core.
- ttft: one request at a time to our service (reuse off, so the prompt is prefilled) vs the same
  prompt on an Engine in this process with the same weights and threads: what the HTTP, Serve and
  streaming path adds to the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.serve_load import exit_on_sigterm, free_port, pct, sse_chunks, wait_http

N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ = 6, 384, 6, 8192, 2048
NAME = "nanochat-chat"


@dataclass
class Turn:
    ttft: float | None  # None: the reply was empty (the end of the turn came first)
    itl: list[float]
    tokens: int
    prompt_tokens: int
    cached_tokens: int | None
    text: str
    start: float = 0.0  # time.monotonic() (one clock for every process of the machine)
    first_at: float | None = None


@dataclass
class Level:
    service: str
    clients: int
    wall_s: float = 0.0
    turns: list[Turn] = field(default_factory=list)
    errors: int = 0

    @property
    def tok_s(self) -> float:
        return sum(t.tokens for t in self.turns) / self.wall_s if self.wall_s else float("nan")

    def ms(self, what: str, q: float) -> float:
        values = ([t.ttft for t in self.turns if t.ttft is not None] if what == "ttft"
                  else [g for t in self.turns for g in t.itl])
        return 1000 * pct(values, q)


# ---- text -----------------------------------------------------------------------------------------


def words(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """Pseudo-word text of about n_tokens tokens of `tokenizer`."""
    from serve_app.testing import SYLLABLES

    text = ""
    while len(tokenizer.encode(text)) < n_tokens:
        text += " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
                         for _ in range(max(4, (n_tokens - len(tokenizer.encode(text))) // 2))) + ". "
    return text.strip()


# ---- the load generator ---------------------------------------------------------------------------


async def chat_turn(session, url: str, model: str, messages: list[dict], max_tokens: int) -> Turn:
    """Stream one chat completion; returns its timing, usage and text."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 1.0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    first = last = None
    itl: list[float] = []
    text, usage = [], {}
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
        async for chunk in sse_chunks(r):
            if chunk.get("usage"):
                usage = chunk["usage"]
            delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
            if delta.get("content"):
                now = time.monotonic()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
                text.append(delta["content"])
    details = usage.get("prompt_tokens_details") or {}
    # a random model may sample the end of its turn first: an empty reply, no first token to time
    return Turn(None if first is None else first - t0, itl, usage.get("completion_tokens", len(text)),
                usage.get("prompt_tokens", 0), details.get("cached_tokens"), "".join(text), t0, first)


async def conversation(session, url: str, model: str, system: str, users: list[str], max_tokens: int,
                       level: Level) -> None:
    messages = [{"role": "system", "content": system}]
    for user in users:
        messages.append({"role": "user", "content": user})
        try:
            turn = await chat_turn(session, url, model, messages, max_tokens)
        except Exception as e:  # noqa: BLE001 - counted and shown; the conversation stops
            level.errors += 1
            print(f"  [{level.service} c={level.clients}] turn failed: {e}", file=sys.stderr)
            return
        level.turns.append(turn)
        messages.append({"role": "assistant", "content": turn.text})


async def run_level(service: str, url: str, model: str, clients: int, system: str, users: list[list[str]],
                    max_tokens: int) -> Level:
    import aiohttp

    level = Level(service, clients)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(session, url, model, system, users[c], max_tokens, level)
                               for c in range(clients)))
        level.wall_s = time.perf_counter() - t0
    return level


# ---- the model and the services --------------------------------------------------------------------


def make_model(root: Path) -> Path:
    """A random checkpoint exported in the transformers NanoChat format (both sides load it)."""
    from nanochat.checkpoint import load_model
    from nanochat.hf_format import save_hf
    from nanochat.tokenizer import Tokenizer
    from serve_app.testing import write_random_checkpoint

    ckpt = write_random_checkpoint(root / "nanochat", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD,
                                   vocab_size=VOCAB, sequence_len=SEQ)
    model, meta = load_model(ckpt, "cpu")
    save_hf(root / "hf", model, Tokenizer.load(meta["tokenizer_dir"]), chat=True,
            meta={"source": "benchmarks/serve_multiturn.py (random weights)"})
    return root / "hf"


@contextlib.contextmanager
def our_services(model_dir: Path, args, root: Path) -> Iterator[dict[str, tuple[str, str]]]:
    """serve_app twice on one fresh local Ray cluster: /reuse (prefix cache on) and /noreuse (off)."""
    from cluster.local import LocalCluster

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # see serve_load.py: a shared box trips it
    cluster = LocalCluster.isolated(num_cpus=4, temp_dir=str(root / "ray"), state_file=str(root / "ray.json"))
    cluster.start()
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray
    from ray import serve

    from serve_app.app import deploy
    from serve_app.config import ServeConfig

    try:
        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": repo}}, log_to_driver=False)
        exit_on_sigterm()
        port, most = free_port(), max(max(args.clients), 2)
        urls = {}
        for name, cache_mb in (("reuse", 256), ("noreuse", 0)):
            config = ServeConfig(models=[{"name": NAME, "model_uri": str(model_dir), "kind": "chat",
                                          "tool_use": False}],
                                 app_name=name, route_prefix=f"/{name}", port=port, num_cpus=1,
                                 torch_threads=args.threads, max_seq_len=SEQ, max_batch_size=most,
                                 max_waiting=4 * most, max_ongoing_requests=4 * most,
                                 prefix_cache_mb=cache_mb, prefill_chunk_tokens=args.chunk)
            urls[f"ours-{name}"] = (f"{deploy(config)}/v1/chat/completions", NAME)
        yield urls
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.stop()


@contextlib.contextmanager
def hf_service(model_dir: Path, args, root: Path) -> Iterator[tuple[str, str]]:
    """`transformers serve --continuous-batching` (its defaults) in a subprocess, log in a file."""
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if cli is None:
        raise SystemExit("the `transformers` CLI is missing: pip install 'transformers[serving]'")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    # its other settings are its defaults; on CPU the default KV cache takes 60% of the free RAM (13.7 GB
    # here, which got another process OOM-killed on this shared box), so the benchmark caps it
    cmd = [cli, "serve", str(model_dir), "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--cb-max-memory-percent", str(args.hf_memory_percent)]
    with open(root / "hf_serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
            yield f"http://127.0.0.1:{port}/v1/chat/completions", str(model_dir)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---- parts -----------------------------------------------------------------------------------------


def part_second(services: dict, tokenizer, args) -> None:
    """Turn 2 vs turn 1 of one conversation with a fresh long system prompt."""
    print(f"\n== second turn vs first ({args.system_tokens}-token system prompt, 1 client, "
          "3 conversations) ==")
    print(f"{'service':14s} {'turn-1 TTFT':>12s} {'turn-2 TTFT':>12s} {'ratio':>6s} {'prompt-2':>9s} "
          f"{'cached-2':>9s}")
    for name, (url, model) in services.items():
        firsts, seconds, cached, prompt = [], [], [], []
        for k in range(3):
            rng = random.Random(f"second/{name}/{k}")
            system = f"[{name} {k}] " + words(tokenizer, args.system_tokens, rng)  # never seen before
            level = asyncio.run(run_level(name, url, model, 1, system,
                                          [[words(tokenizer, args.user_tokens, rng) for _ in range(2)]],
                                          args.tokens))
            if len(level.turns) == 2 and None not in (level.turns[0].ttft, level.turns[1].ttft):
                firsts.append(level.turns[0].ttft)
                seconds.append(level.turns[1].ttft)
                cached.append(level.turns[1].cached_tokens)
                prompt.append(level.turns[1].prompt_tokens)
        if not firsts:
            print(f"{name:14s} failed")
            continue
        t1, t2 = 1000 * statistics.median(firsts), 1000 * statistics.median(seconds)
        c = "-" if None in cached else str(int(statistics.median(cached)))
        print(f"{name:14s} {t1:10.1f}ms {t2:10.1f}ms {t2 / t1:5.2f}x {int(statistics.median(prompt)):9d} "
              f"{c:>9s}")


def part_multiturn(services: dict, tokenizer, args) -> None:
    rng = random.Random("multiturn")
    system = words(tokenizer, args.system_tokens, rng)
    users = [[words(tokenizer, args.user_tokens, rng) for _ in range(args.turns)]
             for _ in range(max(args.clients))]
    levels: list[Level] = []
    names = list(services)
    for i, c in enumerate(args.clients):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            url, model = services[name]
            lv = asyncio.run(run_level(name, url, model, c, f"[{name}] " + system, users, args.tokens))
            print(f"  {name:14s} clients={c:3d}: {lv.tok_s:7.1f} tok/s, "
                  f"TTFT p50 {lv.ms('ttft', .5):7.1f} ms, errors {lv.errors}", file=sys.stderr, flush=True)
            levels.append(lv)
    print(f"\n== multi-turn: {args.turns} turns per client, system prompt {args.system_tokens} tokens, "
          f"user turns {args.user_tokens}, {args.tokens} tokens per reply; ratios vs hf "
          "(TTFT: lower is better) ==")
    print(f"{'service':14s} {'clients':>7s} {'tok/s':>8s} {'vs hf':>6s} {'TTFT p50':>9s} {'vs hf':>6s} "
          f"{'TTFT p95':>9s} {'ITL p50':>8s} {'ITL p95':>8s} {'cached/prompt':>13s} {'errors':>6s}")
    hf = {lv.clients: lv for lv in levels if lv.service == "hf"}
    for lv in sorted(levels, key=lambda x: (x.clients, x.service)):
        ref = hf.get(lv.clients)
        tput = f"{lv.tok_s / ref.tok_s:5.2f}x" if ref and ref.turns else "  -   "
        ttft = f"{lv.ms('ttft', .5) / ref.ms('ttft', .5):5.2f}x" if ref and ref.turns else "  -   "
        known = [t for t in lv.turns if t.cached_tokens is not None]
        share = (f"{sum(t.cached_tokens for t in known) / max(1, sum(t.prompt_tokens for t in known)):13.2f}"
                 if known else f"{'-':>13s}")
        print(f"{lv.service:14s} {lv.clients:7d} {lv.tok_s:8.1f} {tput:>6s} {lv.ms('ttft', .5):7.1f}ms "
              f"{ttft:>6s} {lv.ms('ttft', .95):7.1f}ms {lv.ms('itl', .5):6.1f}ms {lv.ms('itl', .95):6.1f}ms "
              f"{share} {lv.errors:6d}")


def part_join(model_dir: Path, args) -> None:
    """16 streams decode; a 2,000-token prompt joins; chunking off vs on (in-process engine)."""
    import torch

    from nanochat.checkpoint import load_model

    # clock "cpu": one torch thread and its CPU time (time.thread_time), which is what the wall time would
    # be on an idle core and does not count the time other processes hold the core; "wall": args.threads
    torch.set_num_threads(1 if args.join_clock == "cpu" else args.threads)
    clock = time.thread_time if args.join_clock == "cpu" else time.perf_counter
    model, _ = load_model(model_dir, "cpu")
    model.eval()
    g = torch.Generator().manual_seed(0)
    stream_prompts = [torch.randint(0, VOCAB, (200,), generator=g).tolist() for _ in range(16)]
    long_prompt = torch.randint(0, VOCAB, (2000,), generator=g).tolist()
    print("\n== a 2,000-token prompt joins 16 decoding streams (engine in-process; ITL over the gaps "
          f"that overlap its prefill; clock: {args.join_clock}, {torch.get_num_threads()} torch threads) ==")
    print(f"{'chunk':>6s} {'ITL p95 before':>15s} {'ITL p95 during':>15s} {'growth':>7s} {'long TTFT':>10s} "
          f"{'vs off':>7s} {'steps':>6s}")
    runs: dict[int, list[tuple[float, float, float, int]]] = {c: [] for c in args.join_chunks}
    for _ in range(args.join_repeats):  # the chunk sizes take turns, so the machine's load hits all alike
        for chunk in args.join_chunks:
            runs[chunk].append(join_once(model, stream_prompts, long_prompt, chunk, clock))
    ttft_off = None
    for chunk, rs in runs.items():
        b, d, ttft, steps = (statistics.median(r[i] for r in rs) for i in range(4))
        if chunk == 0:
            ttft_off = ttft
        vs = f"{ttft / ttft_off:6.2f}x" if ttft_off else "   -   "
        print(f"{chunk or 'off':>6} {1000 * b:13.1f}ms {1000 * d:13.1f}ms {d / b:6.2f}x {1000 * ttft:8.1f}ms "
              f"{vs:>7s} {int(steps):6d}")


def join_once(model, stream_prompts: list[list[int]], long_prompt: list[int], chunk: int, clock) -> tuple:
    """(streams' ITL p95 before the join, over the gaps overlapping the prefill, long TTFT, its steps)."""
    from nanochat.engine import Engine, SamplingParams

    engine = Engine(model, max_batch_size=17, max_seq_len=SEQ, prefill_chunk_tokens=chunk)
    streams = [engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=1000))
               for p in stream_prompts]
    last: dict[int, float] = {}
    before, gaps = [], []  # gaps: (start, end) of every stream's inter-token gap after the join
    for _ in range(12):  # prefill the streams, then settle into decoding
        engine.step()
        now = clock()
        for s in streams:
            if s in last:
                before.append(now - last[s])
            last[s] = now
    before = before[-16 * 8:]  # the last 8 decode steps
    t_join = clock()
    long = engine.add_request(long_prompt, SamplingParams(temperature=0, max_new_tokens=2))
    t_first, steps = None, 0
    while t_first is None or any(last[s] < t_first for s in streams):
        outs = engine.step()
        steps += t_first is None
        now = clock()
        for o in outs:
            if o.slot == long:
                t_first = t_first or now
            elif o.slot in last:
                gaps.append((last[o.slot], now))
                last[o.slot] = now
    during = [b - a for a, b in gaps if b > t_join and a < t_first]
    return pct(before, .95), pct(during, .95), t_first - t_join, steps


def part_ttft(url: str, model_dir: Path, tokenizer, args) -> None:
    """Service TTFT vs the engine's own for one request (reuse off: the prompt is prefilled)."""
    import torch

    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    model, _ = load_model(model_dir, "cpu")
    engine = Engine(model.eval(), max_batch_size=2, max_seq_len=SEQ)
    print("\n== first token: the service (HTTP, Serve, streaming) vs the engine in-process, "
          "one request at a time; the service's time split at its prefill step "
          "(the scheduler's step log, same monotonic clock) ==")
    print(f"{'prompt':>7s} {'engine TTFT':>12s} {'service TTFT':>13s} {'ratio':>6s} {'added':>8s} "
          f"{'in: to step':>12s} {'step':>8s} {'out: to client':>15s}")
    import aiohttp

    base = url.rsplit("/v1/", 1)[0]

    async def one(messages: list[dict]) -> tuple[Turn, dict | None]:
        async with aiohttp.ClientSession() as session:
            turn = await chat_turn(session, url, NAME, messages, 2)
            async with session.get(f"{base}/debug/steps", params={"model": NAME, "last": "8"}) as r:
                steps = (await r.json()).get("steps", []) if r.status == 200 else []
        first = [st for st in steps if st["kind"] == "prefill" and turn.start <= st["start"]]
        return turn, first[0] if first else None

    for n_tokens in (100, 1000):
        eng_t, svc_t, split = [], [], []
        for k in range(5):
            rng = random.Random(f"ttft/{n_tokens}/{k}")
            messages = [{"role": "user", "content": words(tokenizer, n_tokens, rng)}]
            turn, step = asyncio.run(one(messages))
            if turn.ttft is not None:  # None: the reply was empty
                svc_t.append(turn.ttft)
                if step is not None:
                    end = step["start"] + step["duration_ms"] / 1000
                    split.append((step["start"] - turn.start, step["duration_ms"] / 1000,
                                  turn.first_at - end))
            prompt = tokenizer.render_for_completion({"messages": messages})
            t0 = time.perf_counter()
            slot = engine.add_request(prompt, SamplingParams(temperature=1.0, max_new_tokens=2))
            while not engine.step():
                pass
            eng_t.append(time.perf_counter() - t0)
            engine.remove(slot)
        e, s = 1000 * statistics.median(eng_t), 1000 * statistics.median(svc_t)
        parts = [f"{1000 * statistics.median(x[i] for x in split):9.1f}ms" if split else f"{'-':>11s}"
                 for i in range(3)]
        print(f"{n_tokens:7d} {e:10.1f}ms {s:11.1f}ms {s / e:5.2f}x {s - e:6.1f}ms {parts[0]:>12s} "
              f"{parts[1]:>8s} {parts[2]:>15s}")


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=ints, default=[1, 4],
                   help="concurrent conversations per level (full: 1,4,16,32)")
    p.add_argument("--turns", type=int, default=3, help="turns per conversation")
    p.add_argument("--system-tokens", type=int, default=1000, help="tokens of the shared system prompt")
    p.add_argument("--user-tokens", type=int, default=40, help="tokens of each user turn")
    p.add_argument("--tokens", type=int, default=32, help="max tokens per reply")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of each service and of the engine parts")
    p.add_argument("--chunk", type=int, default=128, help="our prefill_chunk_tokens (0 = off)")
    p.add_argument("--join-chunks", type=ints, default=[0, 32, 128],
                   help="chunk sizes of the join part (the README's table: 0,32,64,128,256)")
    p.add_argument("--join-clock", choices=["cpu", "wall"], default="cpu",
                   help="join part: 1 torch thread timed by its CPU time (robust to a shared machine), "
                        "or wall time")
    p.add_argument("--join-repeats", type=int, default=2,
                   help="runs of each chunk size in the join part (median)")
    p.add_argument("--parts", default="second,multiturn,join,ttft",
                   help="which parts to run, comma-separated")
    p.add_argument("--no-hf", action="store_true", help="leave transformers serve out")
    p.add_argument("--hf-memory-percent", type=float, default=0.1,
                   help="transformers serve's --cb-max-memory-percent (its CPU default, 0.6 of free RAM, "
                        "is too much for a shared machine; 0.1 still holds every conversation of 32 clients)")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"second", "multiturn", "join", "ttft"}:
        p.error(f"unknown parts {sorted(parts - {'second', 'multiturn', 'join', 'ttft'})}")
    exit_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="serve-multiturn-", dir="/tmp"))
    try:
        from nanochat.tokenizer import Tokenizer

        model_dir = make_model(root)
        tokenizer = Tokenizer.load(model_dir)
        print(f"model: {N_LAYER} layers x {N_EMBD}, {N_HEAD} heads, vocab {VOCAB}, context {SEQ}; "
              f"{args.threads} torch threads per service; our prefill chunk {args.chunk}; "
              f"{os.cpu_count()} CPUs (load generator on them too)")
        if "join" in parts:
            part_join(model_dir, args)
        if parts & {"second", "multiturn", "ttft"}:
            with contextlib.ExitStack() as stack:
                services = dict(stack.enter_context(our_services(model_dir, args, root)))
                if not args.no_hf:
                    services["hf"] = stack.enter_context(hf_service(model_dir, args, root))
                for url, model in services.values():  # model load, first allocations
                    asyncio.run(run_level("warm", url, model, 1, "warm up", [["hello"]], 4))
                if "ttft" in parts:
                    part_ttft(services["ours-noreuse"][0], model_dir, tokenizer, args)
                if "second" in parts:
                    part_second(services, tokenizer, args)
                if "multiturn" in parts:
                    part_multiturn(services, tokenizer, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
