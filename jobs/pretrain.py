"""Stage `pretrain`: train the base GPT on Ray Train with Ray Data, resumable, into {run}/pretrain/.

    python -m jobs.pretrain --preset micro --run R [--storage S] [--set depth=4 ...] [--force]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m jobs.pretrain --preset tiny --run demo

Reads {run}/tokenizer/ (or `tokenizer=`), the shards named by `data`, and writes Ray Train's
checkpoints, metrics.jsonl, the exported model {run}/pretrain/model/ and meta.json (last).
Relaunching an incomplete run resumes from its last checkpoint, on any number of workers;
a complete run is skipped unless --force (which starts over). See cluster/pretrain.py and
cluster/train.py.
"""

from __future__ import annotations

import sys

import ray
from pydantic import Field, model_validator

from cluster.pretrain import run_pretrain
from cluster.specs import PretrainSpec, ShardReading, TrainSpec
from cluster.storage import RunStorage
from jobs.config import TrainingConfig, data_location, load_stage_config, stage_argparser
from nanochat.errors import entrypoint


class PretrainConfig(TrainingConfig):
    """Pretraining settings; `depth` derives the rest as in the seed."""

    data: str | None = Field(None, description="directory or s3:// / gs:// prefix of the parquet shards "
                                               "(the last one is the validation shard); default: the "
                                               "preset's data section")
    tokenizer: str | None = Field(None, description="tokenizer directory URI; default: this run's "
                                                    "tokenizer stage output")
    depth: int = Field(20, ge=1,
                       description="the one dial: layers; width = 64 x depth, heads = width / head_dim")
    head_dim: int = Field(128, ge=2,
                          description="channels per attention head (128 in the seed; smaller for CPU models)")
    sequence_len: int = Field(2048, ge=1, description="context length in tokens of each training row")
    norm_eps: float | None = Field(None, gt=0,
                                   description="RMSNorm epsilon; None: the activations' dtype's machine "
                                               "epsilon (the seed's); chat stages copy an imported model's")
    total_batch_tokens: int = Field(524_288, ge=1, description="tokens per optimizer step over all workers; "
                                                            "gradient accumulation makes up the difference")
    flops_budget: float = Field(-1.0, description="horizon from a training FLOPs budget if > 0")
    target_param_data_ratio: float = Field(20.0, description="horizon: tokens per parameter (20 = "
                                                             "Chinchilla, as the seed)")
    seed: int = Field(42, description="seed of the model initialisation (identical on every worker)")
    eval_tokens: int = Field(20 * 524_288, ge=1, description="validation tokens per evaluation")
    tokenizer_actors: int = Field(1, ge=1, description="Ray Data tokenizer actors per worker")
    tokenizer_actor_cpus: float = Field(0.25, gt=0, description="CPUs reserved by each tokenizer actor "
                                                                "(fractional so they fit beside the Train "
                                                                "workers)")
    prefetch_batches: int = Field(4, ge=0, description="micro-batches Ray Data prepares ahead of each worker")

    @model_validator(mode="after")
    def _heads_divide(self) -> PretrainConfig:
        width = 64 * self.depth
        if width % self.head_dim or self.head_dim % 2:
            raise ValueError(f"depth {self.depth} gives width {width}, which does not split into heads of "
                             f"head_dim {self.head_dim}: pick a depth whose 64 x depth divides by "
                             "head_dim, or another (even) head_dim")
        return self

    def to_spec(self, preset: str) -> PretrainSpec:
        """The run's spec; `data` defaults to the preset's data section (jobs/config.py's data_location)."""
        train = TrainSpec(depth=self.depth, head_dim=self.head_dim, sequence_len=self.sequence_len,
                          norm_eps=self.norm_eps, device_batch_size=self.device_batch_size,
                          total_batch_tokens=self.total_batch_tokens, num_iterations=self.num_iterations,
                          flops_budget=self.flops_budget,
                          target_param_data_ratio=self.target_param_data_ratio,
                          seed=self.seed, lrs=self.learning_rates(), schedule=self.schedule(),
                          group=self.worker_group())
        reading = ShardReading(eval_tokens=self.eval_tokens, tokenizer_actors=self.tokenizer_actors,
                               tokenizer_actor_cpus=self.tokenizer_actor_cpus,
                               prefetch_batches=self.prefetch_batches)
        return PretrainSpec(train=train, reading=reading, data=data_location(preset, self.data),
                            tokenizer=self.tokenizer)


@entrypoint
def main(argv: list[str] | None = None) -> int:
    args = stage_argparser("pretrain", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_stage_config(PretrainConfig, "pretrain", args.preset, args.overrides)
    storage = RunStorage(args.run, args.storage)
    if storage.is_complete("pretrain") and not args.force:
        print(f"pretrain of run {args.run} is complete ({storage.stage_uri('pretrain')}); --force to redo it")
        return 0
    spec = cfg.to_spec(args.preset)
    if not ray.is_initialized():
        ray.init()
    meta = run_pretrain(spec, storage, config={"preset": args.preset, **cfg.model_dump()}, force=args.force)
    m = meta["metrics"]
    print(f"pretrain done: step {m['final_step']}, val bpb {m['val_bpb']:.4f}, {m['tokens']:,} tokens, "
          f"model at {meta['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
