"""Training metrics exported through Ray's metrics system (Prometheus endpoint of every node).

`PretrainMetrics(run, stage)` holds Gauges for the numbers of the last logged step and a Counter of
tokens trained, tagged with the run id and the training stage (pretrain, midtrain or sft: the
chat stages run the same trainer, so they share the metric names). Rank 0 of the Train worker group records them after each
logged step; Ray's metrics agent on the node exports them at
`http://<node>:<metrics-export-port>/metrics` (the local cluster's `LocalCluster.metrics_port`),
where Prometheus and the dashboard's Grafana panels scrape them. Ray adds the `ray_` prefix:

    ray_nanochat_pretrain_tokens_per_sec{run="demo", stage="pretrain", ...} 10342.0

Metric objects are created when `PretrainMetrics` is built (in the worker), never at import.
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge

PREFIX = "nanochat_pretrain_"
GAUGES = {  # metrics.jsonl key -> description (name: PREFIX + key)
    "step": "optimizer steps completed",
    "loss": "training loss (nats per token), mean over ranks",
    "val_bpb": "validation bits per byte at the last evaluation",
    "tokens_per_sec": "training tokens per second over all workers",
    "mfu_percent": "model FLOPs utilisation in percent of the devices' bf16 peak",
    "data_wait_frac": "share of the step spent waiting for the next batch (0..1)",
    "lr_multiplier": "learning-rate multiplier of the schedule",
}


class PretrainMetrics:
    """Ray Gauges/Counter for one run's training stage (create it in the process that records)."""

    def __init__(self, run: str, stage: str = "pretrain") -> None:
        tags = {"run": run, "stage": stage}
        self.gauges = {}
        for key, description in GAUGES.items():
            gauge = Gauge(PREFIX + key, description=description, tag_keys=("run", "stage"))
            gauge.set_default_tags(tags)
            self.gauges[key] = gauge
        self.tokens = Counter(PREFIX + "tokens_total", description="tokens trained (this attempt)",
                              tag_keys=("run", "stage"))
        self.tokens.set_default_tags(tags)

    def record(self, metrics: dict[str, Any], tokens: int = 0) -> None:
        """Set every gauge whose key is in `metrics` with a number; add `tokens` to the counter."""
        for key, gauge in self.gauges.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                gauge.set(float(value))
        if tokens > 0:
            self.tokens.inc(float(tokens))
