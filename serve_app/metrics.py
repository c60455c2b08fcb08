"""Prometheus metrics of the chat service, exported through Ray (`ray.serve.metrics`).

Names (Ray adds the `ray_` prefix on the metrics port, and Serve adds the deployment, replica
and application tags; every metric here also has `model`):

| name                                   | type      | meaning                                          |
|----------------------------------------|-----------|--------------------------------------------------|
| nanochat_serve_requests_total{status}  | counter   | HTTP requests answered, by status code           |
| nanochat_serve_ttft_seconds            | histogram | request arrival -> first token                   |
| nanochat_serve_inter_token_seconds     | histogram | gap between consecutive tokens of one choice     |
| nanochat_serve_tokens_per_second       | gauge     | tokens generated per second over the last second |
| nanochat_serve_batch_size              | gauge     | sequences in the engine's last step (0 when idle)|
| nanochat_serve_queue_depth             | gauge     | requests waiting for engine slots                |

A daemon thread refreshes the gauges every `interval_s`, so an idle replica reports 0 rather
than its last busy value. Created inside a replica (no work at import time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from serve_app.scheduler import StepRecord

_PROCESS_METRICS: ServeMetrics | None = None  # the replica's instance, for the ASGI middleware

TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]  # seconds
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]  # seconds


def process_metrics() -> ServeMetrics | None:
    """The ServeMetrics created last in this process (one replica per process), if any.

    Code that Serve pickles by value (the deployment class) and code imported normally (the
    FastAPI middleware) see different copies of module globals, but the same imported module."""
    return _PROCESS_METRICS


class ServeMetrics:
    """The service's metrics for one replica; thread-safe."""

    def __init__(self, interval_s: float = 1.0) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("nanochat_serve_requests_total",
                                description="HTTP requests answered, by status",
                                tag_keys=("model", "status"))
        self.ttft = Histogram("nanochat_serve_ttft_seconds", description="Time to first token (s)",
                              boundaries=TTFT_BUCKETS, tag_keys=("model",))
        self.itl = Histogram("nanochat_serve_inter_token_seconds",
                             description="Gap between tokens of a choice (s)",
                             boundaries=ITL_BUCKETS, tag_keys=("model",))
        self.tps = Gauge("nanochat_serve_tokens_per_second", description="Tokens generated per second",
                         tag_keys=("model",))
        self.batch = Gauge("nanochat_serve_batch_size", description="Sequences in the last engine step",
                           tag_keys=("model",))
        self.queue = Gauge("nanochat_serve_queue_depth", description="Requests waiting for engine slots",
                           tag_keys=("model",))
        self._lock = threading.Lock()
        self._tokens: dict[str, int] = {}  # tokens since the last refresh, per model
        self._batch: dict[str, tuple[int, float]] = {}  # (rows of the last step, its time)
        self._waiting: dict[str, Callable[[], int]] = {}
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="serve-metrics", daemon=True)
        self._thread.start()
        global _PROCESS_METRICS
        _PROCESS_METRICS = self

    def request(self, model: str, status: int) -> None:
        self.requests.inc(tags={"model": model or "-", "status": str(status)})

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": model})

    def inter_token(self, model: str, seconds: float) -> None:
        self.itl.observe(seconds, tags={"model": model})

    def watch(self, model: str, waiting: Callable[[], int]) -> Callable[[StepRecord, int], None]:
        """Track a model's queue; returns the scheduler's on_step hook."""
        with self._lock:
            self._waiting[model] = waiting
            self._tokens.setdefault(model, 0)

        def on_step(record: StepRecord, tokens: int) -> None:
            with self._lock:
                self._tokens[model] = self._tokens.get(model, 0) + tokens
                self._batch[model] = (len(record.rows), time.monotonic())

        return on_step

    def forget(self, model: str) -> None:
        """An unloaded model: its gauges go to 0 and the refresh loop stops reporting it."""
        with self._lock:
            self._waiting.pop(model, None)
            self._tokens.pop(model, None)
            self._batch.pop(model, None)
        for gauge in (self.tps, self.batch, self.queue):
            gauge.set(0, tags={"model": model})

    def close(self) -> None:
        self._stop.set()

    def _refresh_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                tokens, self._tokens = self._tokens, dict.fromkeys(self._tokens, 0)
                batch, waiting = dict(self._batch), dict(self._waiting)
            for model, count in tokens.items():
                self.tps.set(count / max(now - last, 1e-6), tags={"model": model})
                rows, when = batch.get(model, (0, 0.0))
                self.batch.set(rows if now - when < self._interval else 0, tags={"model": model})
                self.queue.set(waiting[model]() if model in waiting else 0, tags={"model": model})
            last = now
