"""Export stage: a trained stage's model as a Hugging Face `transformers` NanoChat directory.

    python -m jobs.export --run demo --stage sft --out ./nanochat-demo-sft
    python -m jobs.export --preset tiny --run demo                       # pipeline stage: {run}/export/
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m jobs.export --preset tiny --run demo

Reads `{run}/<stage>/model/` (local, `s3://` or `gs://` storage; `--stage auto` takes the last
complete of rl, sft, midtrain, pretrain) with the tokenizer beside it (else `{run}/tokenizer/`),
and the numbers of `{run}/evaluate/<stage>.json` and the report's inference figures for the model
card. Writes the directory of nanochat/hf_format.py (config.json, safetensors, generation config,
tokenizer.json with the chat template, README.md): with `--out` into that directory (a local path,
or an `s3://`/`gs://` URI it uploads to), else as the stage output `{run}/export/` with meta.json
last. `AutoModelForCausalLM.from_pretrained(DIR)` and `transformers serve` load it offline; every
stage that starts from an exported model (midtrain/SFT `init_from`, RL/evaluate `model_dir`, serve
`model_uri`) also accepts it. No Ray work and no `transformers` import: it runs where it is submitted.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from cluster.artifacts import find_model, load_tokenizer, localize, upload_dir
from cluster.storage import RunStorage, is_remote
from jobs.config import StageConfig, load_stage_config, stage_argparser
from nanochat import hf_format
from nanochat.checkpoint import load_model
from nanochat.errors import NanochatError, entrypoint
from nanochat.report import evaluation_bpb

STAGE = "export"
FINAL_ORDER = ("rl", "sft", "midtrain", "pretrain")


class ExportConfig(StageConfig):
    """The `export:` section of a preset."""

    stage: Literal["auto", "pretrain", "midtrain", "sft", "rl"] = Field(
        "auto", description="which stage's model to export; auto: the last complete of rl, sft, midtrain, "
                            "pretrain")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32",
                                                             description="dtype of the saved weights")
    max_shard_mb: int = Field(5000, ge=1,
                              description="safetensors shard size limit in MB (above it: shards + index)")


class ExportError(NanochatError, ValueError):
    """A run that has nothing to export, or an output that cannot be written."""


def source_stage(storage: RunStorage, wanted: str) -> str:
    """The stage whose model is exported; ExportError naming what to run first."""
    candidates = FINAL_ORDER if wanted == "auto" else (wanted,)
    for stage in candidates:
        if storage.is_complete(stage) and storage.exists(f"{storage.stage_path(stage)}/model/config.json"):
            return stage
    what = "any of " + ", ".join(FINAL_ORDER) if wanted == "auto" else f"the {wanted} stage"
    raise ExportError(f"run {storage.run!r} has no complete exported model from {what}: run that stage first")


def card_numbers(storage: RunStorage, stage: str) -> list[tuple[str, str]]:
    """(metric, value) rows for the model card: the stage's evaluation and the report's inference figures."""
    rows: list[tuple[str, str]] = []
    path = f"{storage.stage_path('evaluate')}/{stage}.json"
    if storage.exists(path):
        with storage.fs.open_input_stream(path) as f:
            ev = json.loads(f.read().decode())
        if evaluation_bpb(ev) is not None:
            rows.append(("bits per byte on the validation documents", f"{evaluation_bpb(ev):.4f}"))
        core = ev.get("core") or {}
        if core.get("metric") is not None:
            rows.append((core.get("label", "CORE"), f"{core['metric']:.4f}"))
        chat = ev.get("chat") or {}
        for task, res in sorted((chat.get("tasks") or {}).items()):
            if res.get("accuracy") is not None:
                rows.append((task, f"{res['accuracy']:.4f}"))
        for key, label in (("chatcore", "ChatCORE"), ("format_rate", "chat format rate")):
            if chat.get(key) is not None:
                rows.append((label, f"{chat[key]:.4f}"))
    if storage.is_complete("report"):
        inf = storage.read_meta("report").get("metrics", {}).get("inference") or {}
        if inf.get("stage") == stage:
            for b, m in inf.get("batches", {}).items():
                rows.append((f"our engine, batch {b}: TTFT / time per token / tokens/s ({inf.get('device')})",
                             f"{m['ttft_ms']:.1f} ms / {m['tpot_ms']:.2f} ms / {m['tokens_per_s']:.1f}"))
            rows.append(("peak memory while measuring",
                         f"{inf.get('peak_memory_mib')} MiB ({inf.get('memory_kind')})"))
    return rows


def export_run(storage: RunStorage, cfg: ExportConfig, out: Path) -> dict[str, Any]:
    """Write the export of `cfg.stage` into the local directory `out`; returns what meta.json records."""
    stage = source_stage(storage, cfg.stage)
    ref = find_model(storage, stage)  # errors say which stage to run first
    model_uri = ref.model
    model, meta = load_model(localize(model_uri), "cpu")
    tokenizer = load_tokenizer(ref.tokenizer)
    info = {"stage": stage, "step": meta.get("step"), "run": storage.run, "source": model_uri}
    files = hf_format.save_hf(out, model, tokenizer, chat=stage != "pretrain", meta=info,
                              numbers=card_numbers(storage, stage), dtype=cfg.dtype,
                              max_shard_bytes=cfg.max_shard_mb * 1000**2)
    return {**info, "files": files, "num_params": model.num_params()}


@entrypoint
def main(argv: list[str] | None = None) -> int:
    p = stage_argparser(STAGE, __doc__.splitlines()[0])
    p.add_argument("--stage", default=None,
                   help="auto|pretrain|midtrain|sft|rl (overrides the config's stage)")
    p.add_argument("--out", default=None,
                   help="output directory or s3:// / gs:// URI (default: {run}/export/)")
    args = p.parse_args(argv)
    overrides = args.overrides + ([f"stage={args.stage}"] if args.stage else [])
    cfg = load_stage_config(ExportConfig, STAGE, args.preset, overrides)
    storage = RunStorage(args.run, args.storage)
    if args.out:
        if is_remote(args.out):
            local = Path(tempfile.mkdtemp(prefix="nanochat-export-"))
            try:
                info = export_run(storage, cfg, local)
                upload_dir(local, args.out)
                where = args.out
            finally:
                shutil.rmtree(local, ignore_errors=True)
        else:
            info = export_run(storage, cfg, Path(args.out).expanduser())
            where = str(Path(args.out).expanduser().resolve())
    else:
        if storage.is_complete(STAGE) and not args.force:
            print(f"export of run {args.run} is complete ({storage.stage_uri(STAGE)}); --force to redo it")
            return 0
        with storage.writer(STAGE, cfg.model_dump()) as w:
            info = export_run(storage, cfg, w.path)
            w.extra.update(info)
            w.commit()
        where = storage.stage_uri(STAGE)
    print(f"[export] {info['stage']} model of run {args.run} ({info['num_params']:,} parameters) "
          f"written to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
