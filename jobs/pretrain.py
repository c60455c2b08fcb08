"""Stage `pretrain`: train the base GPT on Ray Train with Ray Data, resumable, into {run}/pretrain/.

    python -m jobs.pretrain --preset micro --run R [--storage S] [--set depth=4 ...] [--force]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m jobs.pretrain --preset tiny --run demo

Reads {run}/tokenizer/ (or `tokenizer=`), the shards named by `data`, and writes Ray Train's
checkpoints, metrics.jsonl, the exported model {run}/pretrain/model/ and meta.json (last).
Relaunching an incomplete run resumes from its last checkpoint, on any number of workers;
a complete run is skipped unless --force (which starts over). See cluster/train.py.
"""

from __future__ import annotations

import sys
from dataclasses import fields

import ray
from pydantic import Field, model_validator

from cluster.storage import RunStorage
from cluster.train import TrainSpec, run_pretrain
from jobs.config import TrainingConfig, data_location, load_stage_config, stage_argparser
from nanochat.errors import entrypoint


class PretrainConfig(TrainingConfig):
    """Pretraining settings; `depth` derives the rest as in the seed."""

    data: str | None = Field(None, description="directory or s3:// / gs:// prefix of the parquet shards (the last "
                                                "one is the validation shard); default: the preset's data section")
    tokenizer: str | None = Field(None, description="tokenizer directory URI; default: this run's tokenizer stage output")
    depth: int = Field(20, ge=1, description="the one dial: layers; width = 64 x depth, heads = width / head_dim")
    head_dim: int = Field(128, ge=2, description="channels per attention head (128 in the seed; smaller for CPU models)")
    sequence_len: int = Field(2048, ge=1, description="context length in tokens of each training row")
    norm_eps: float | None = Field(None, gt=0, description="RMSNorm epsilon; None: the activations' dtype's machine "
                                                         "epsilon (the seed's); chat stages copy an imported model's")
    device_batch_size: int = Field(32, ge=1, description="rows per forward/backward on each worker")
    total_batch_tokens: int = Field(524_288, ge=1, description="tokens per optimizer step over all workers; "
                                                            "gradient accumulation makes up the difference")
    num_iterations: int = Field(-1, description="horizon in optimizer steps if > 0 (first rule that is set wins)")
    flops_budget: float = Field(-1.0, description="horizon from a training FLOPs budget if > 0")
    target_param_data_ratio: float = Field(20.0, description="horizon: tokens per parameter (20 = Chinchilla, as the seed)")
    embedding_lr: float = Field(0.2, gt=0, description="AdamW lr of the token embedding (scaled by (width/768)^-0.5)")
    unembedding_lr: float = Field(0.004, gt=0, description="AdamW lr of the lm_head (scaled by (width/768)^-0.5)")
    matrix_lr: float = Field(0.02, gt=0, description="Muon lr of the transformer matrices")
    seed: int = Field(42, description="seed of the model initialisation (identical on every worker)")
    eval_every: int = Field(250, description="steps between validation bits-per-byte evaluations (<= 0: end only)")
    eval_tokens: int = Field(20 * 524_288, ge=1, description="validation tokens per evaluation")
    checkpoint_every: int = Field(1000, description="steps between checkpoints (<= 0: end only); a failure loses "
                                                "at most this many steps")
    tokenizer_actors: int = Field(1, ge=1, description="Ray Data tokenizer actors per worker")
    tokenizer_actor_cpus: float = Field(0.25, gt=0, description="CPUs reserved by each tokenizer actor (fractional "
                                                             "so they fit beside the Train workers)")
    prefetch_batches: int = Field(4, ge=0, description="micro-batches Ray Data prepares ahead of each worker")
    metrics_interval_s: float = Field(10.0, ge=1, description="seconds between the workers' pushes of loss, "
                                                               "tokens/s, MFU... to the Prometheus exporter "
                                                               "(Ray's default: 10)")

    @model_validator(mode="after")
    def _heads_divide(self) -> PretrainConfig:
        width = 64 * self.depth
        if width % self.head_dim or self.head_dim % 2:
            raise ValueError(f"depth {self.depth} gives width {width}, which does not split into heads of "
                             f"head_dim {self.head_dim}: pick a depth whose 64 x depth divides by head_dim, or "
                             "another (even) head_dim")
        return self


@entrypoint
def main(argv: list[str] | None = None) -> int:
    args = stage_argparser("pretrain", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_stage_config(PretrainConfig, "pretrain", args.preset, args.overrides)
    storage = RunStorage(args.run, args.storage)
    if storage.is_complete("pretrain") and not args.force:
        print(f"pretrain of run {args.run} is complete ({storage.stage_uri('pretrain')}); --force to redo it")
        return 0
    spec = TrainSpec(**cfg.model_dump(include={f.name for f in fields(TrainSpec)}))
    if not ray.is_initialized():
        ray.init()
    meta = run_pretrain(spec, storage, data=data_location(args.preset, cfg.data), tokenizer=cfg.tokenizer,
                        config={"preset": args.preset, **cfg.model_dump()}, force=args.force)
    m = meta["metrics"]
    print(f"pretrain done: step {m['final_step']}, val bpb {m['val_bpb']:.4f}, {m['tokens']:,} tokens, "
          f"model at {meta['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
