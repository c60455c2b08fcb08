"""Stage configuration: pydantic models filled from a preset YAML plus `--set key=value` overrides.

Every stage has one config class (`extra="forbid"`, a description on every field). A preset is
`jobs/presets/<name>.yaml` with one section per stage (the section name is the stage name):

    tokenizer:
      vocab_size: 512
    pretrain:
      depth: 2

`load_stage_config(TokenizerConfig, "tokenizer", "micro", ["vocab_size=1024"])` validates the
section merged with the overrides; unknown keys, wrong types and unknown presets are errors that
name the key, the preset and the file. The resolved config is saved in the stage's meta.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.specs import Schedule, WorkerGroup
from nanochat.errors import ConfigError  # re-exported: jobs import it from here
from nanochat.schedule import FINAL_LR_FRAC, GRAD_CLIP, WARMDOWN_RATIO, WARMUP_RATIO, LearningRates

PRESET_DIR = Path(__file__).resolve().parent / "presets"

C = TypeVar("C", bound=BaseModel)


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


_SEED_LRS = LearningRates()  # the seed's optimizer settings; the only place their numbers are written


class OptimizerSettings(StageConfig):
    """The optimizer settings every stage that trains shares (pretrain, midtrain, sft, rl)."""

    embedding_lr: float = Field(_SEED_LRS.embedding_lr, gt=0,
                                description="AdamW lr of the token embedding (scaled by (width/768)^-0.5)")
    unembedding_lr: float = Field(_SEED_LRS.unembedding_lr, gt=0,
                                  description="AdamW lr of the lm_head (scaled by (width/768)^-0.5)")
    matrix_lr: float = Field(_SEED_LRS.matrix_lr, gt=0, description="Muon lr of the transformer matrices")
    weight_decay: float = Field(_SEED_LRS.weight_decay, ge=0, description="AdamW weight decay")

    def learning_rates(self) -> LearningRates:
        return LearningRates(self.embedding_lr, self.unembedding_lr, self.matrix_lr, self.weight_decay)


class TrainingConfig(OptimizerSettings):
    """The settings every Ray Train stage (pretrain, midtrain, sft) shares: optimizer, schedule, the
    worker group. `schedule()` and `worker_group()` are their only conversions to cluster/specs.py's specs."""

    device_batch_size: int = Field(32, ge=1, description="rows per forward/backward on each worker")
    num_iterations: int = Field(-1,
                                description="horizon in optimizer steps if > 0 (else the stage's own rule)")
    grad_clip: float = Field(GRAD_CLIP, description="max global gradient norm; <= 0 disables clipping")
    warmup_ratio: float = Field(WARMUP_RATIO, ge=0, le=1,
                                description="fraction of steps with linear lr warmup")
    warmdown_ratio: float = Field(WARMDOWN_RATIO, ge=0, le=1,
                                  description="fraction of steps at the end with linear lr decay")
    final_lr_frac: float = Field(FINAL_LR_FRAC, ge=0, le=1,
                                 description="lr multiplier reached at the end of the warmdown")
    log_every: int = Field(1, ge=1, description="steps between metrics records and progress lines")
    eval_every: int = Field(250, description="steps between validation evaluations (<= 0: end only)")
    checkpoint_every: int = Field(1000, description="steps between checkpoints (<= 0: end only); a failure "
                                                    "loses at most this many steps")
    compile: bool | None = Field(None, description="torch.compile the model; null: on CUDA, and on CPU when "
                                                   "the run is long enough to pay the compile back "
                                                   "(nanochat/train.py)")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="what a training step multiplies in: bfloat16 (autocast of forward and backward, "
                            "and Muon's Newton-Schulz) or float32; auto: bfloat16 where bf16 matmuls are "
                            "native (GPUs; CPUs with AVX512-BF16 or AMX), else float32. Validation bpb is "
                            "measured alike either way (float32 on CPU)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on GPU clusters); with "
                                                  "min_workers, the most the run grows to")
    min_workers: int | None = Field(
        None, ge=1, description="elastic training: the fewest workers the run goes on with when hosts are "
                                "lost (null: exactly num_workers); total_batch_tokens must divide for "
                                "every size between")
    resize_check_s: float = Field(
        60.0, gt=0, description="elastic training: seconds between Ray Train's checks for capacity to grow "
                                "back to num_workers")
    max_preemptions: int = Field(
        -1, ge=-1, description="restarts after spot preemptions (node drains with reason PREEMPTION), "
                               "counted apart from max_failures (-1: unlimited)")
    preemption_poll_every: int = Field(
        1, ge=0, description="steps between polls for a preemption notice; on one every worker saves a "
                             "checkpoint at once (0: never poll)")
    async_checkpoints: bool = Field(
        False, description="regular checkpoints upload in the background while training goes on (the last "
                           "one and a preemption's are synchronous)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker; on CPU also torch's thread count")
    use_gpu: bool = Field(False, description="give each worker one GPU and train in bf16 on it")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint after "
                                                    "failures (-1: unlimited)")
    checkpoints_to_keep: int = Field(2, ge=1, description="most recent checkpoints kept in storage")
    storage_is_shared: bool = Field(False, description="the local storage path is a shared filesystem (NFS) "
                                                       "mounted at the same path on every node; required for "
                                                       "a local path on a multi-node cluster")
    metrics_interval_s: float = Field(10.0, ge=1, description="seconds between the workers' pushes of loss, "
                                                               "tokens/s, MFU... to the Prometheus exporter "
                                                               "(Ray's default: 10)")

    @model_validator(mode="after")
    def _worker_range(self) -> TrainingConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers {self.min_workers} > num_workers {self.num_workers}: the elastic "
                             "range is (min_workers, num_workers)")
        return self

    def schedule(self) -> Schedule:
        return Schedule(grad_clip=self.grad_clip, warmup_ratio=self.warmup_ratio,
                        warmdown_ratio=self.warmdown_ratio, final_lr_frac=self.final_lr_frac,
                        log_every=self.log_every, eval_every=self.eval_every,
                        checkpoint_every=self.checkpoint_every, compile=self.compile,
                        precision=self.precision)

    def worker_group(self) -> WorkerGroup:
        return WorkerGroup(num_workers=self.num_workers, min_workers=self.min_workers,
                           resize_check_s=self.resize_check_s, cpus_per_worker=self.cpus_per_worker,
                           use_gpu=self.use_gpu, max_failures=self.max_failures,
                           max_preemptions=self.max_preemptions,
                           preemption_poll_every=self.preemption_poll_every,
                           async_checkpoints=self.async_checkpoints,
                           checkpoints_to_keep=self.checkpoints_to_keep,
                           storage_is_shared=self.storage_is_shared,
                           metrics_interval_s=self.metrics_interval_s)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(preset: str) -> dict[str, Any]:
    """The whole preset file as a dict of stage sections."""
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(available_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must be a mapping of stage sections")
    return data


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`["a=1", "b.c=x"]` → `{"a": 1, "b": {"c": "x"}}`; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def merge_sections(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = (merge_sections(merged[k], v)
                     if isinstance(v, dict) and isinstance(merged.get(k), dict) else v)
    return merged


def load_stage_config(cls: type[C], stage: str, preset: str, overrides: list[str] | None = None) -> C:
    """Validate the preset's `stage` section plus overrides against the stage's config class."""
    section = load_preset(preset).get(stage) or {}
    values = merge_sections(section, parse_overrides(overrides))
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid {stage} config (preset {preset!r} + overrides): {problems}") from None


def data_location(preset: str, explicit: str | None) -> str:
    """Where a stage reads shards: its config's `data`, else the preset's `data.uri`, else the
    directory of the preset's data source (embedded pack or downloaded FineWeb)."""
    if explicit:
        return explicit
    from nanochat.data.dataset import get_source

    section = load_preset(preset).get("data") or {}
    return section.get("uri") or str(get_source(section.get("source", "embedded")).directory)


def stage_argparser(stage: str, description: str) -> argparse.ArgumentParser:
    """The arguments every stage accepts: --preset, --run, --storage, --set, --force."""
    p = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", description=description)
    p.add_argument("--preset", default="micro", help="preset name in jobs/presets/ (default: micro)")
    p.add_argument("--run", required=True,
                   help="run id: the directory under the storage that holds all stages")
    p.add_argument("--storage", default=None,
                   help="local dir, s3:// or gs:// prefix (default: $NANOCHAT_HOME/runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun even if the stage output is complete")
    return p
