"""Report stage: the run's report card as Markdown with plots, from what every stage wrote.

    python -m jobs.report --preset tiny --run demo
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m jobs.report --preset tiny --run demo

Reads `{run}/<stage>/meta.json`, `{run}/<stage>/metrics.jsonl` and `{run}/evaluate/<stage>.json`
of every stage that exists (a missing one shows as "-") and writes `{run}/report/report.md` plus
PNG plots. No Ray work: it runs where it is submitted. It always rewrites the report (cheap),
so a rerun after later stages finished brings it up to date.
Inference section: the final model (the last complete of rl, sft, midtrain, pretrain) is loaded on
this node (CUDA if present) and measured by nanochat/inference_metrics.py; the figures also land in
meta.json's `metrics.inference` (the export stage's model card reads them). `inference: false` skips it.
"""

from __future__ import annotations

import json
import os
import platform
import sys

from pydantic import Field

from cluster.storage import RunStorage, git_commit, software_versions
from jobs.config import StageConfig, load_stage_config, stage_argparser
from nanochat.errors import entrypoint
from nanochat.report import STAGE_ORDER, RunRecord, make_plots, render_report


class ReportConfig(StageConfig):
    """The `report:` section of a preset."""

    hourly_rate: float = Field(3.0, ge=0,
                               description="price of one GPU-hour in dollars, for the cost estimate")
    inference: bool = Field(True, description="measure the final model's TTFT, time per token, tokens/s and "
                                              "peak memory with our engine")
    inference_batch_sizes: list[int] = Field([1, 8, 32], min_length=1, description="batch sizes measured")
    inference_prompt_tokens: int = Field(128, ge=1, description="prompt length of every measured request")
    inference_new_tokens: int = Field(64, ge=2, description="tokens generated per request")


FINAL_ORDER = ("rl", "sft", "midtrain", "pretrain")


def measure_final_model(storage: RunStorage, cfg: ReportConfig) -> dict | None:
    """Inference figures of the run's final model, or None when no stage exported one."""
    import time

    import torch

    from cluster.artifacts import localize, stage_model_uri
    from nanochat.checkpoint import load_model
    from nanochat.inference_metrics import measure_inference
    from nanochat.tokenizer import SPECIAL_TOKENS

    stage = next((s for s in FINAL_ORDER if storage.is_complete(s)
                  and storage.exists(f"{storage.stage_path(s)}/model/config.json")), None)
    if stage is None:
        return None
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(localize(stage_model_uri(storage, stage)), device)
    figures = measure_inference(model, batch_sizes=tuple(cfg.inference_batch_sizes),
                                prompt_tokens=cfg.inference_prompt_tokens,
                                new_tokens=cfg.inference_new_tokens,
                                special_from=model.config.vocab_size - len(SPECIAL_TOKENS))
    return {"stage": stage, **figures, "total_seconds": round(time.perf_counter() - t0, 2)}


def read_run(storage: RunStorage) -> RunRecord:
    """Everything the report needs, skipping stages that are missing or incomplete."""
    rec = RunRecord(run=storage.run)
    for stage in STAGE_ORDER:
        if storage.is_complete(stage):
            rec.metas[stage] = storage.read_meta(stage)
        rows = storage.read_metrics(stage)
        if rows:
            rec.metrics[stage] = rows
        path = f"{storage.stage_path('evaluate')}/{stage}.json"
        if storage.exists(path):
            with storage.fs.open_input_stream(path) as f:
                try:
                    rec.evaluations[stage] = json.loads(f.read().decode())
                except json.JSONDecodeError:
                    print(f"[report] {path} is corrupt; its stage shows as '-'", file=sys.stderr)
    return rec


def hardware() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            return f"{torch.cuda.device_count()} x {name}, {os.cpu_count()} CPUs"
    except Exception:
        pass
    return f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), no GPU"


@entrypoint
def main(argv: list[str] | None = None) -> int:
    args = stage_argparser("report", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_stage_config(ReportConfig, "report", args.preset, args.overrides)
    storage = RunStorage(args.run, args.storage)
    rec = read_run(storage)
    inference = measure_final_model(storage, cfg) if cfg.inference else None
    with storage.writer("report", cfg.model_dump()) as w:
        plots = make_plots(rec, w.path)
        text = render_report(rec, hourly_rate=cfg.hourly_rate, plots=plots, hardware=hardware(),
                             versions=software_versions(), git_commit=git_commit(), inference=inference)
        (w.path / "report.md").write_text(text)
        w.metrics["stages"] = len(rec.metas)
        if inference:
            w.metrics["inference"] = inference
        w.commit()
    print(text)
    print(f"[report] written to {storage.stage_uri('report')}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
