"""Checkpoints of a training run and exported models, as plain files in a local directory
(pure torch; the cluster uploads and downloads the directories).

Training checkpoint (one directory per saved step; every rank writes its own files into it):
    model.pt              model state_dict (rank 0; weights are identical on all ranks)
    state.json            step, world size, model config, loop state (rank 0)
    optim_rank00000.pt    this rank's optimizer shards, one per optimizer (every rank)
    data_rank00000.json   this rank's data position (every rank)
A checkpoint is complete when state.json and the files of all `world_size` ranks are present
(`is_complete`); a loader never picks an incomplete one. The optimizer state is loaded with
`load_optimizer_shards`, which re-shards it for any world size.

Exported model (what later stages load with `load_model`):
    model.pt              state_dict
    config.json           {"model_config": GPTConfig fields, ...meta (step, val_bpb, ...)}
    tokenizer/            the tokenizer the model was trained with (copied by the exporter)
`load_model` and `load_weights` also read a directory in transformers' NanoChat format
(nanochat/hf_format.py: config.json with a model_type, safetensors, tokenizer.json), so every stage
that starts from an exported model can start from such a directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat.common import DistInfo, atomic_write
from nanochat.errors import NanochatError, NotFoundError
from nanochat.gpt import GPT, GPTConfig
from nanochat.sharding import ShardedOptimizer, load_optimizer_shards, optimizer_shard_state

MODEL_FILE = "model.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1


def optim_file(rank: int) -> str:
    return f"optim_rank{rank:05d}.pt"


def data_file(rank: int) -> str:
    return f"data_rank{rank:05d}.json"


class CheckpointError(NanochatError, ValueError):
    """A checkpoint that cannot be used: incomplete, or saved for another model."""


@dataclass(frozen=True)
class TrainingState:
    """What a training checkpoint says besides the tensors."""

    step: int  # optimizer steps completed
    world_size: int  # ranks of the run that saved it
    model_config: dict[str, Any]  # GPTConfig fields
    loop: dict[str, Any]  # loop state saved by the caller (e.g. elapsed training time)
    data: list[dict[str, Any]]  # each saved rank's data position, in rank order


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_training_checkpoint(
    directory: str | os.PathLike,
    model: GPT,
    optimizers: list[ShardedOptimizer],
    dist: DistInfo,
    *,
    step: int,
    data: dict[str, Any],
    loop: dict[str, Any] | None = None,
) -> None:
    """Write this rank's part of the checkpoint of `step` into `directory` (every rank calls it;
    rank 0 adds the model and state.json, written last)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    shards = [optimizer_shard_state(opt, dist) for opt in optimizers]
    _atomic_torch_save(shards, d / optim_file(dist.rank))
    _atomic_text(json.dumps({"rank": dist.rank, "world_size": dist.world_size, **data}),
                 d / data_file(dist.rank))
    if dist.is_main:
        _atomic_torch_save(model.state_dict(), d / MODEL_FILE)
        state = {"format": FORMAT, "step": step, "world_size": dist.world_size,
                 "model_config": asdict(model.config), "loop": loop or {}}
        _atomic_text(json.dumps(state, indent=1), d / STATE_FILE)


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """state.json of a training checkpoint (raises CheckpointError when missing)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint: {STATE_FILE} is missing")
    return json.loads(path.read_text())


def required_files(world_size: int) -> list[str]:
    """The completeness marker's rule: the files a checkpoint saved by `world_size` ranks must hold
    besides state.json (which names the world size). Storage-side checks (cluster/artifacts.py) use it."""
    return [MODEL_FILE] + [f(r) for r in range(world_size) for f in (optim_file, data_file)]


def is_complete(directory: str | os.PathLike) -> bool:
    """True when state.json, the model and every rank's files are present."""
    d = Path(directory)
    try:
        world = int(read_state(d)["world_size"])
    except (CheckpointError, json.JSONDecodeError, KeyError, ValueError):
        return False
    return all((d / n).is_file() for n in required_files(world))


def check_model_config(saved: dict[str, Any], config: GPTConfig, where: str) -> None:
    """Raise CheckpointError naming the fields when `config` differs from the saved one."""
    diff = {k: (v, getattr(config, k, None)) for k, v in saved.items() if getattr(config, k, None) != v}
    if diff:
        detail = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
        hint = (" (the tokenizer differs from the one the checkpoint was trained with)"
                if "vocab_size" in diff else "")
        raise CheckpointError(
            f"the checkpoint {where} was saved for another model ({detail}){hint}: use the same "
            "depth, sequence length and tokenizer, or start a fresh run"
        )


def load_training_checkpoint(
    directory: str | os.PathLike, model: GPT, optimizers: list[ShardedOptimizer], dist: DistInfo
) -> TrainingState:
    """Load weights and this rank's optimizer state (re-sharded from any saved world size) into
    `model` and `optimizers`; return the step, loop and data state."""
    d = Path(directory)
    if not is_complete(d):
        raise CheckpointError(f"{d} is not a complete checkpoint (files of some ranks are missing)")
    state = read_state(d)
    check_model_config(state["model_config"], model.config, str(d))
    weights = torch.load(d / MODEL_FILE, map_location=dist.device, weights_only=True, mmap=True)
    model.load_state_dict(weights)
    world = int(state["world_size"])
    saved = [torch.load(d / optim_file(r), map_location="cpu", weights_only=True, mmap=True)
             for r in range(world)]
    if any(len(s) != len(optimizers) for s in saved):
        raise CheckpointError(
            f"{d} holds state for another set of optimizers than the {len(optimizers)} given")
    for i, opt in enumerate(optimizers):
        load_optimizer_shards(opt, [s[i] for s in saved], dist)
    data = [json.loads((d / data_file(r)).read_text()) for r in range(world)]
    return TrainingState(int(state["step"]), world, state["model_config"], state.get("loop", {}), data)


def model_config_json(model_config: dict[str, Any], meta: dict[str, Any]) -> str:
    """Text of an exported model's config.json: the GPTConfig fields plus `meta` (step, val_bpb, ...)."""
    return json.dumps({"format": FORMAT, "model_config": model_config, **meta}, indent=1)


def write_model_config(directory: str | os.PathLike, model_config: dict[str, Any],
                       meta: dict[str, Any]) -> None:
    """Write config.json of an exported model into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_text(model_config_json(model_config, meta), d / CONFIG_FILE)


def save_model(directory: str | os.PathLike, model: GPT, meta: dict[str, Any] | None = None) -> None:
    """Export `model` (weights + config.json) into `directory` (tokenizer: copied by the caller)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(model.state_dict(), d / MODEL_FILE)
    write_model_config(d, asdict(model.config), meta or {})


def _hf(directory: Path) -> bool:
    """A transformers-format directory (no model.pt; config.json names a model_type)."""
    from nanochat import hf_format

    return not (directory / MODEL_FILE).is_file() and hf_format.is_hf_dir(directory)


def load_weights(directory: str | os.PathLike, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The state_dict of an exported model (ours or transformers' NanoChat format) on `device`."""
    d = Path(directory)
    if _hf(d):
        from nanochat import hf_format

        weights, _ = hf_format.load_hf_state_dict(d)
        return {k: v.to(device) for k, v in weights.items()}
    return torch.load(d / MODEL_FILE, map_location=device, weights_only=True)


def load_model(directory: str | os.PathLike, device: str | torch.device) -> tuple[GPT, dict[str, Any]]:
    """Load an exported model onto `device` (float32, eval mode); a transformers NanoChat directory
    is imported (nanochat/hf_format.py).

    Returns (model, meta): meta is config.json (model_config, step, val_bpb, ...) plus
    "tokenizer_dir", the tokenizer directory next to the weights (None if absent)."""
    d = Path(directory)
    if _hf(d):
        from nanochat import hf_format

        return hf_format.load_hf_model(d, device)
    if not (d / CONFIG_FILE).is_file() or not (d / MODEL_FILE).is_file():
        raise NotFoundError(
            f"no exported model at {d}: {CONFIG_FILE} and {MODEL_FILE} are needed (run the pretrain stage)"
        )
    meta = json.loads((d / CONFIG_FILE).read_text())
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also computes the rotary tables, which are not in the state_dict
    model.load_state_dict(torch.load(d / MODEL_FILE, map_location=device, weights_only=True, mmap=True))
    model.eval()
    tok = d / TOKENIZER_DIR
    meta["tokenizer_dir"] = str(tok) if tok.is_dir() else None
    return model, meta
