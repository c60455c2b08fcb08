"""Small shared pieces of the core: who this process is in a distributed run, which device and
dtype to compute in, and seeding.

Notable:
- `DistInfo` is the one way distributed facts reach the core (rank, world size, device). It is
  built by the caller from what set up the process group (Ray Train's context, the RL learner
  actors); the core never calls init_process_group.
- `compute_dtype`: bf16 autocast on CUDA, plain float32 on CPU (evaluation, inference);
  `training_dtype`: a training stage's `precision` setting, whose "auto" also trains in bf16 on a
  CPU that multiplies bf16 natively (`native_bf16`: AVX512-BF16 or AMX); `agreed_precision` resolves
  "auto" once for all ranks of a run.

Nothing here runs at import time.
"""

from __future__ import annotations

import functools
import os
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) training run."""

    rank: int = 0  # global rank of this process, 0..world_size-1
    world_size: int = 1  # number of processes taking part in the run
    local_rank: int = 0  # rank on this node (picks the GPU index on multi-GPU nodes)
    device: str = "cpu"  # torch device string this process computes on, e.g. "cuda:0"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"DistInfo(rank={self.rank}, world_size={self.world_size}) is impossible: "
                "need world_size >= 1 and 0 <= rank < world_size"
            )

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes shared files (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when collectives are needed (more than one process)."""
        return self.world_size > 1


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Write a file so readers see the old content or the new, never half of it: `write(tmp)` fills a
    temporary sibling, which is then renamed over `path` (removed if `write` fails). Every file the
    core writes goes through here; cluster/storage.py and cluster/artifacts.py do the same for storage."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def autodetect_device() -> str:
    """Return "cuda" when a GPU is visible, else "cpu" (MPS is not a supported training target)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles), so a bf16 matmul
    runs at about twice the float32 rate instead of being emulated (slower than float32)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def native_bf16(device: str | torch.device) -> bool:
    """True where bf16 matmuls are native: GPUs from Ampere on (not emulated, as on a V100 or T4), and
    CPUs with AVX512-BF16 or AMX."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return kind == "cpu" and cpu_has_native_bf16()


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype matmuls run in: bfloat16 (via autocast) on CUDA, float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


PRECISIONS = ("auto", "float32", "bfloat16")  # a training stage's `precision` setting


def training_dtype(precision: str | None, device: str | torch.device) -> torch.dtype:
    """The dtype a training step's matmuls run in (autocast, and Muon's Newton-Schulz) for a stage's
    `precision`: None: `compute_dtype(device)`; "auto": bfloat16 where bf16 matmuls are native
    (`native_bf16`: GPUs, CPUs with AVX512-BF16 or AMX), else float32; "float32", "bfloat16": as named
    (bfloat16 on a CPU without native bf16 runs, emulated, slower than float32)."""
    if precision is None:
        return compute_dtype(device)
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if precision in PRECISIONS:
        return getattr(torch, precision)
    raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def agreed_precision(precision: str | None, device: str | torch.device, world_size: int) -> str | None:
    """A stage's `precision` as every rank of the run will train it: "auto" becomes "bfloat16" only if
    every rank's device multiplies bf16 natively, else "float32" (ranks on CPUs or GPUs of different
    kinds must not train in different dtypes; a resume onto other node kinds may switch every rank at
    once, and the metrics' `dtype` shows it); other values pass through, validated. With
    world_size > 1 and "auto" it is a collective (MIN over the ranks): every rank calls it, in the
    same place."""
    if precision != "auto":
        training_dtype(precision, device)
        return precision
    native = native_bf16(device)
    if world_size > 1:
        import torch.distributed as tdist

        flag = torch.tensor([int(native)], device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        native = bool(flag.item())
    return "bfloat16" if native else "float32"


def autocast_context(device: str | torch.device, dtype: torch.dtype | None = None) -> torch.autocast:
    """Autocast to `dtype` (None: `compute_dtype(device)`: bf16 on CUDA); a disabled (no-op) autocast
    for float32."""
    device_type = torch.device(device).type
    dtype = dtype or compute_dtype(device)
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)


def peak_bf16_flops(device: str | torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one device for MFU, or None when unknown (CPU, other GPUs).

    989e12 is the H100 SXM datasheet figure (without sparsity); the H200 has the same compute."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        return 989e12
    return None


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (all devices) for a reproducible run."""
    random.seed(seed)
    torch.manual_seed(seed)
