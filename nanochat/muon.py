"""Muon ("MomentUm Orthogonalized by Newton-Schulz") for the transformer's weight matrices,
sharded over ranks by whole matrices (ZeRO-2 style, no DDP).

Notable:
- Update: Nesterov momentum (buf = lerp(buf, g, 1 - momentum); u = lerp(g, buf, momentum)),
  then u is replaced by an approximately orthogonal matrix with the same row/column spaces
  (5 quintic Newton-Schulz steps, bf16 on CUDA, float32 elsewhere), scaled by
  sqrt(max(1, rows / cols)) and applied with the group's lr. No weight decay (as in the seed).
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


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of g (rows, cols) by Newton-Schulz.

    Runs in bf16 on CUDA (fast, the iteration tolerates it) and float32 elsewhere."""
    if g.dim() != 2:
        raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.mT  # iterate on the wide orientation: X X^T is the smaller Gram matrix
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (rows, rows)
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
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
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
        broadcasts = []
        for index, group, p in self.indexed_params():
            if index in grads:
                self._muon_matrix(group, p, grads[index])
            if self.dist.is_distributed:
                broadcasts.append(torch_dist.broadcast(p.data, src=self.owner(index), async_op=True))
        for work in broadcasts:
            work.wait()

    def _muon_matrix(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor) -> None:
        """One Muon update of matrix p with its averaged gradient g (same shape)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(g, 1.0 - momentum)
        update = g.lerp(buf, momentum) if group["nesterov"] else buf
        update = orthogonalize(update, group["ns_steps"])
        scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
        p.data.add_(update.to(p.dtype), alpha=-group["lr"] * scale)
