"""Which training graphs this machine has compiled before: a warm inductor cache makes compiling cheap.

`torch.compile` on CPU costs ~40 s with an empty inductor cache and ~5 s when the cache already
holds the graphs (measured, nanochat/train.py's constants), and whether it pays back within a run
depends on which one applies. Inductor's own cache is keyed by internals; this ledger keys a
compiled training graph by what decides it: torch's version, the model's config, the micro-batch's
shape and dtype, the device type. It lives inside inductor's cache directory (per machine, per
user, gone when that cache is cleared, so it never claims a graph the cache lost):
`{inductor cache dir}/nanochat-compiled.json`, a JSON list of signatures.

The demo's midtraining and SFT train the pretrained model on micro-batches of the pretraining shape:
once pretraining compiled, their compile is the warm one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from nanochat.common import atomic_write

LEDGER_NAME = "nanochat-compiled.json"


def ledger_path() -> Path:
    """The ledger file, in inductor's cache directory (TORCHINDUCTOR_CACHE_DIR, else its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / LEDGER_NAME


def signature(model: torch.nn.Module, x: torch.Tensor, autocast: torch.dtype = torch.float32) -> str:
    """A short hash of what makes a compiled training graph reusable (`autocast`: the dtype the
    forward runs under; float32: none)."""
    config = getattr(model, "config", None)
    described = {
        "torch": torch.__version__,
        "model": type(model).__name__,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
        "shape": list(x.shape),
        "dtype": str(x.dtype),
        "device": x.device.type,
        **({} if autocast == torch.float32 else {"autocast": str(autocast)}),  # older entries had none
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # absent or unreadable: nothing is known to be compiled
    return data if isinstance(data, list) else []


def was_compiled(sig: str) -> bool:
    """Whether a graph of this signature was compiled on this machine (its inductor cache is warm)."""
    return sig in _read(ledger_path())


def record_compiled(sig: str) -> None:
    """Note that a graph of this signature is now in the inductor cache (atomic; a lost race between
    two ranks only costs the next run a cold estimate)."""
    path = ledger_path()
    known = _read(path)
    if sig in known:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(known + [sig])))
    except OSError:
        pass  # a read-only cache directory: the rule just stays on its cold estimate
