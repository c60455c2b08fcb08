"""Muon ("MomentUm Orthogonalized by Newton-Schulz") for the transformer's weight matrices,
sharded over ranks by whole matrices (ZeRO-2 style, no DDP).

Notable:
- Update: Nesterov momentum (buf = lerp(buf, g, 1 - momentum); u = lerp(g, buf, momentum)),
  then u is replaced by an approximately orthogonal matrix with the same row/column spaces
  (5 quintic Newton-Schulz steps in `ns_dtype`: the stage's training dtype, so bf16 in bf16 training
  on a GPU or a native-bf16 CPU, float32 in float32 training; default bf16 on CUDA), scaled
  by sqrt(max(1, rows / cols)) and applied with the group's lr. No weight decay (as in the seed).
  Same-shape matrices are orthogonalised together, as one stack (a transformer has a handful of
  shapes, so one batched matmul replaces one per layer).
- Momentum warmup (0.85 -> 0.95 over 300 steps) is done by the training loop through
  group["momentum"] (nanochat/schedule.py).
- Distributed: every matrix has one owner rank (largest matrices first, each to the rank with the
  least work so far). Gradients are summed onto the owner (torch.distributed.reduce, which gloo
  and NCCL both have), the owner alone keeps the momentum buffer and orthogonalises, then
  broadcasts the new weights. State checkpoints reuse nanochat/sharding.py's shard format, with each
  owned matrix saved as its full row range.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist

from nanochat.common import DistInfo
from nanochat.sharding import ShardedOptimizer

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): chosen to push singular values into
# roughly [0.7, 1.2] quickly rather than to converge exactly to 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def ns_dtype(device: torch.device) -> torch.dtype:
    """The Newton-Schulz iteration's default dtype: bf16 on CUDA, float32 elsewhere. A training stage
    whose precision is bf16 passes bf16 on CPU too (native there with AVX512-BF16 or AMX: ~2x the
    float32 speed on the demo's matrices, and the iteration tolerates it; nanochat/common.py)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of g (rows, cols) by Newton-Schulz; or of each
    matrix of a stack g (n, rows, cols), in one batched iteration (one matmul per step for all n).

    Runs in `dtype`, by default `ns_dtype(g.device)`; the result has that dtype."""
    if g.dim() not in (2, 3):
        raise ValueError(f"orthogonalize needs a matrix or a stack of matrices, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(dtype or ns_dtype(g.device))
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT  # iterate on the wide orientation: X X^T is the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (..., rows, rows)
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if transposed else x


def _balanced_owners(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank per matrix: largest first, each to the least-loaded rank (deterministic)."""
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += sizes[i]
    return owners


class Muon(ShardedOptimizer):
    """Muon over 2-D parameters; each matrix's state and update live on one owner rank."""

    def __init__(
        self,
        params: Any,
        *,
        dist: DistInfo | None = None,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        """`ns_dtype`: the Newton-Schulz dtype; None: `ns_dtype(device)` of each matrix."""
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        self.ns_dtype = ns_dtype
        super().__init__(params, defaults, dist or DistInfo())
        indexed = self.indexed_params()
        for index, _, p in indexed:
            if p.dim() != 2:
                raise ValueError(
                    f"Muon parameter {index} has shape {tuple(p.shape)}; Muon only takes 2-D "
                    "matrices: give embeddings, norms and biases to AdamW"
                )
        self._owners = _balanced_owners([p.numel() for _, _, p in indexed], self.dist.world_size)

    def owner(self, index: int) -> int:
        """Rank that owns matrix `index` (its momentum buffer and its update)."""
        return self._owners[index]

    def owned_rows(self, index: int, p: torch.Tensor) -> tuple[int, int]:
        return (0, p.shape[0]) if self.owner(index) == self.dist.rank else (0, 0)

    def _reduce(self) -> dict[int, torch.Tensor]:
        ws = self.dist.world_size
        pending = []
        for index, _, p in self.indexed_params():
            g = self._grad_or_zeros(p)
            if g is None:
                continue
            if ws == 1:
                pending.append((index, g, None))
                continue
            owner = self.owner(index)
            work = torch_dist.reduce(g, dst=owner, op=torch_dist.ReduceOp.SUM, async_op=True)
            pending.append((index, g, work))
        owned = {}
        for index, g, work in pending:
            if work is not None:
                work.wait()
            if self.owner(index) == self.dist.rank:
                owned[index] = g.div_(ws) if ws > 1 else g
        return owned

    def _update(self, grads: dict[int, torch.Tensor]) -> None:
        """Momentum per matrix, then one batched Newton-Schulz per group of same-shape matrices (a
        transformer has a handful of shapes: the tiny model's 24 matrices make 3 stacks), then the steps."""
        params = {index: (group, p) for index, group, p in self.indexed_params()}
        batches: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for index, g in grads.items():
            group, p = params[index]
            update = self._momentum(group, p, g)
            key = (tuple(update.shape), update.dtype, update.device, group["ns_steps"])
            batches.setdefault(key, []).append((index, update))
        for (_, _, _, ns_steps), items in batches.items():
            ortho = orthogonalize(torch.stack([u for _, u in items]), ns_steps, self.ns_dtype)
            for (index, _), update in zip(items, ortho.unbind(0), strict=True):
                group, p = params[index]
                scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                p.data.add_(update.to(p.dtype), alpha=-group["lr"] * scale)
        if self.dist.is_distributed:
            works = [torch_dist.broadcast(p.data, src=self.owner(index), async_op=True)
                     for index, (_, p) in params.items()]
            for work in works:
                work.wait()

    def _momentum(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Update matrix p's momentum buffer with its averaged gradient g; return the update to
        orthogonalise (Nesterov: the gradient pulled toward the new buffer)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(g, 1.0 - momentum)
        return g.lerp(buf, momentum) if group["nesterov"] else buf
