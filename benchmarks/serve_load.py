"""Serving load benchmark: our Ray Serve app vs HuggingFace `transformers serve --continuous-batching`.

    PYTHONPATH=. python benchmarks/serve_load.py [--clients 1,4,16,32] [--tokens 64] [--rounds 2]
                                                [--repeats 3] [--threads 2] [--only ours|hf]

Both serve the same shape of random model on 127.0.0.1 only; both are started first, then the
levels run one service at a time, alternating ours/hf (and the order) per repeat, so a change in
the machine's background load hits both alike; each level reports the median over `--repeats`:
- ours: the exported random GPT (6 layers x 384 wide, 6 heads, vocab 8,192; nanochat's
  architecture) behind serve_app on a fresh local Ray cluster (its own ports and temp dir);
- reference: a random `LlamaForCausalLM` with the same layers, width, heads and vocabulary
  (SwiGLU width 1,024 = 8/3 x 384, so its MLP has the same FLOPs as nanochat's 4x ReLU^2 MLP)
  and the same tokenizer (exported as tokenizer.json), served by `transformers serve
  --continuous-batching` on CPU in a subprocess.
Each level runs C concurrent streaming clients; each client sends `--rounds` requests one after
another to `/v1/completions` with the same prompt and a fixed output length (end of sequence
ignored: `ignore_eos` for ours, no eos token in the Llama's generation config). Measured on the
client: throughput = completion tokens (from `usage`) / wall time of the level; TTFT = request
start -> first text chunk; inter-token latency = gaps between consecutive text chunks (chunks per
token is printed to show that a chunk is one token for both). Torch threads are the same for both
(`--threads`; the load generator shares the same cores). Prints one table with ratios vs HF.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT = "Ka lo mi ne ru sa ti vo ze pa. Qu da fe gi ho ju be co wy xi an el in os um."
N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ = 6, 384, 6, 8192, 1024


@dataclass
class Level:
    service: str
    clients: int
    tokens: int  # completion tokens over all requests
    chunks: int  # text chunks over all requests
    wall_s: float
    ttft: list[float]  # seconds, one per request
    itl: list[float]  # seconds, every gap between text chunks
    errors: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- the load generator ------------------------------------------------------------------------


async def sse_chunks(response: Any) -> AsyncIterator[dict]:
    """The JSON chunks of a server-sent-events response (aiohttp), up to `data: [DONE]`."""
    buf = b""
    async for data in response.content.iter_any():
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            line = event.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def one_request(session, url: str, body: dict, ttft: list, itl: list) -> tuple[int, int]:
    """Stream one completion; returns (completion tokens, text chunks)."""
    t0 = time.perf_counter()
    last = None
    tokens = chunks = 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for chunk in sse_chunks(r):
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.append(now - last)
                last = now
                chunks += 1
    return tokens, chunks


async def run_level(service: str, url: str, model: str, clients: int, rounds: int, max_tokens: int,
                    extra: dict) -> Level:
    import aiohttp

    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    ttft: list[float] = []
    itl: list[float] = []
    totals = [0, 0, 0]  # tokens, chunks, errors

    async def client(session) -> None:
        for _ in range(rounds):
            try:
                tokens, chunks = await one_request(session, url, body, ttft, itl)
                totals[0] += tokens
                totals[1] += chunks
            except Exception as e:  # noqa: BLE001 - counted and shown, the level goes on
                totals[2] += 1
                print(f"  [{service} c={clients}] request failed: {e}", file=sys.stderr)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return Level(service, clients, totals[0], totals[1], wall, ttft, itl, totals[2])


def median_level(runs: list[Level]) -> Level:
    """The repeats of one level: throughput of the median repeat, latencies pooled over all."""
    mid = sorted(runs, key=lambda lv: lv.tok_s)[len(runs) // 2]
    return Level(mid.service, mid.clients, mid.tokens, mid.chunks, mid.wall_s,
                 [t for lv in runs for t in lv.ttft], [t for lv in runs for t in lv.itl],
                 sum(lv.errors for lv in runs))


# ---- the two services --------------------------------------------------------------------------


def make_models(root: Path) -> tuple[Path, Path]:
    """Our random checkpoint and the random Llama of the same shape with the same tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from nanochat.tokenizer import Tokenizer
    from serve_app.testing import write_random_checkpoint

    ours = write_random_checkpoint(root / "nanochat", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD,
                                   vocab_size=VOCAB, sequence_len=SEQ)
    hf_dir = root / "llama"
    tok = Tokenizer.load(ours / "tokenizer")
    tok.export_hf(root / "tokenizer.json")
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), bos_token="<|bos|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=N_EMBD, intermediate_size=8 * N_EMBD // 3,
                         num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD,
                         max_position_embeddings=SEQ, tie_word_embeddings=False,
                         bos_token_id=tok.get_bos_token_id(), eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.get_bos_token_id(), eos_token_id=None,
                                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    model.save_pretrained(hf_dir)
    hf_tok.save_pretrained(hf_dir)
    return ours, hf_dir


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so the `finally` blocks run: stop Ray and the HF server."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@contextlib.contextmanager
def our_service(ckpt: Path, args, root: Path) -> Iterator[tuple[str, str, dict]]:
    """serve_app on a fresh local Ray cluster; yields (completions URL, model, extra body fields)."""
    from cluster.local import LocalCluster

    os.environ.pop("RAY_ADDRESS", None)
    # Ray's memory monitor counts every process on the machine; on a shared box it killed the Serve
    # controller and proxy mid-run. This cluster lives for the benchmark only: turn the monitor off.
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    for attempt in range(3):  # on an overloaded machine the raylet may time out waiting for its agent
        cluster = LocalCluster.isolated(num_cpus=4, temp_dir=str(root / f"ray{attempt}"),
                                        state_file=str(root / "ray.json"))
        try:
            cluster.start()
            break
        except RuntimeError as e:
            cluster.stop()
            if attempt == 2:
                raise
            print(f"  local Ray cluster did not start ({str(e).splitlines()[0]}); retrying", file=sys.stderr)
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray
    from ray import serve

    from serve_app.app import deploy
    from serve_app.config import ServeConfig

    try:
        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": repo}}, log_to_driver=False)
        exit_on_sigterm()  # ray.init installs a SIGTERM handler that dumps a stack and skips our cleanups
        config = ServeConfig(models=[{"name": "nanochat-base", "model_uri": str(ckpt), "kind": "base"}],
                             port=free_port(), num_cpus=1, torch_threads=args.threads, max_seq_len=SEQ,
                             max_batch_size=max(args.clients), max_waiting=4 * max(args.clients),
                             max_ongoing_requests=4 * max(args.clients))
        url = deploy(config)
        yield f"{url}/v1/completions", "nanochat-base", {"ignore_eos": True}
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.stop()


@contextlib.contextmanager
def hf_service(hf_dir: Path, args, root: Path) -> Iterator[tuple[str, str, dict]]:
    """`transformers serve --continuous-batching` in a subprocess (its log in a file, never a pipe
    nobody reads: a full pipe would block the server)."""
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if cli is None:
        raise SystemExit("the `transformers` CLI is missing: pip install 'transformers[serving]'")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [cli, "serve", str(hf_dir), "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32"]
    with open(root / "hf_serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
            yield f"http://127.0.0.1:{port}/v1/completions", str(hf_dir), {}
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_all(services: dict[str, tuple[str, str, dict]], args) -> list[Level]:
    """Warm each service up, then every level: `repeats` times, one service at a time, alternating order."""
    for name, (url, model, extra) in services.items():
        asyncio.run(run_level(name, url, model, 1, 1, 8, extra))  # model load, first allocations
    levels = []
    for c in args.clients:
        runs: dict[str, list[Level]] = {name: [] for name in services}
        for r in range(args.repeats):
            for name in (list(services) if r % 2 == 0 else list(services)[::-1]):
                url, model, extra = services[name]
                level = asyncio.run(run_level(name, url, model, c, args.rounds, args.tokens, extra))
                print(f"  {name:5s} clients={c:3d} repeat {r}: {level.tok_s:8.1f} tok/s, "
                      f"TTFT p50 {1000 * pct(level.ttft, .5):7.1f} ms, errors {level.errors}",
                      file=sys.stderr)
                runs[name].append(level)
        levels += [median_level(v) for v in runs.values()]
    return levels


def print_table(levels: list[Level]) -> None:
    hf = {lv.clients: lv for lv in levels if lv.service == "hf"}
    print(f"{'service':8s} {'clients':>7s} {'tok/s':>9s} {'vs hf':>6s} {'TTFT p50':>9s} {'TTFT p95':>9s} "
          f"{'ITL p50':>8s} {'ITL p95':>8s} {'chunk/tok':>9s} {'errors':>6s}")
    for lv in sorted(levels, key=lambda x: (x.clients, x.service != "ours")):
        ref = hf.get(lv.clients)
        ratio = f"{lv.tok_s / ref.tok_s:5.2f}x" if ref and ref.tok_s else "   -  "
        ms = [1000 * pct(v, q) for v, q in ((lv.ttft, .5), (lv.ttft, .95), (lv.itl, .5), (lv.itl, .95))]
        print(f"{lv.service:8s} {lv.clients:7d} {lv.tok_s:9.1f} {ratio:>6s} {ms[0]:7.1f}ms {ms[1]:7.1f}ms "
              f"{ms[2]:6.1f}ms {ms[3]:6.1f}ms {lv.chunks / max(lv.tokens, 1):9.2f} {lv.errors:6d}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32])
    p.add_argument("--tokens", type=int, default=64, help="completion tokens per request (eos ignored)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--repeats", type=int, default=3, help="runs of each level per service (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each service")
    p.add_argument("--only", choices=["ours", "hf"], default=None, help="benchmark one service only")
    args = p.parse_args(argv)
    exit_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="serve-load-", dir="/tmp"))
    try:
        ours_dir, hf_dir = make_models(root)
        with contextlib.ExitStack() as stack:
            services = {}
            if args.only in (None, "ours"):
                services["ours"] = stack.enter_context(our_service(ours_dir, args, root))
            if args.only in (None, "hf"):
                services["hf"] = stack.enter_context(hf_service(hf_dir, args, root))
            levels = run_all(services, args)
        print(f"\nmodel: {N_LAYER} layers x {N_EMBD}, {N_HEAD} heads, vocab {VOCAB}; "
              f"{args.tokens} tokens per request, "
              f"{args.rounds} requests per client, median of {args.repeats} repeats, "
              f"{args.threads} torch threads, "
              f"{os.cpu_count()} CPUs")
        print_table(levels)
        ours = {lv.clients: lv for lv in levels if lv.service == "ours"}
        hf = {lv.clients: lv for lv in levels if lv.service == "hf"}
        for c in sorted(set(ours) & set(hf)):
            print(f"clients={c}: throughput {ours[c].tok_s / hf[c].tok_s:.2f}x hf, TTFT p50 "
                  f"{statistics.median(ours[c].ttft) / statistics.median(hf[c].ttft):.2f}x hf")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
