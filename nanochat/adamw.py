"""AdamW for the embedding and the lm_head, sharded over ranks ZeRO-2 style (on the sharding base
of nanochat/sharding.py, which Muon shares).

Notable:
- AdamW splits every parameter along dim 0 into world_size contiguous chunks (rank r owns chunk
  r) and keeps optimizer state only for its chunks; a step reduces the gradients (keeping the
  owned part), updates the owned rows and all-gathers the updated weights.
- Collectives: reduce_scatter_tensor + all_gather_into_tensor when the backend has them (NCCL;
  gloo on recent torch builds). Some gloo builds lack reduce_scatter: the first step probes it
  once and falls back to all_reduce + slice and a list all_gather (same numbers, more traffic).
  Reductions use SUM then divide, because gloo has no AVG on older builds.
- Rows that do not split evenly (dim 0 not divisible by world_size) are zero-padded for the
  collectives; chunks are ceil(rows / world_size) rows, so the last rank may own fewer.
- A parameter without a gradient is skipped on a single process; in a distributed run it counts
  as a zero gradient so that every rank issues the same collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist

from nanochat.common import DistInfo
from nanochat.sharding import Group, ShardedOptimizer


class AdamW(ShardedOptimizer):
    """AdamW (decoupled weight decay) whose state and update are split along dim 0 over ranks."""

    def __init__(
        self,
        params: Any,
        *,
        dist: DistInfo | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.8, 0.95),
        eps: float = 1e-10,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, dist or DistInfo())
        self._tensor_collectives: bool | None = None  # None until probed on the first step

    def _chunk(self, p: torch.Tensor) -> int:
        return math.ceil(p.shape[0] / self.dist.world_size)

    def owned_rows(self, index: int, p: torch.Tensor) -> tuple[int, int]:
        chunk = self._chunk(p)
        start = min(p.shape[0], self.dist.rank * chunk)
        return start, min(p.shape[0], start + chunk)

    def _padded(self, t: torch.Tensor) -> torch.Tensor:
        """t padded with zero rows to world_size * chunk rows (no copy when it divides)."""
        rows = self._chunk(t) * self.dist.world_size
        if rows == t.shape[0]:
            return t
        out = t.new_zeros((rows, *t.shape[1:]))
        out[: t.shape[0]] = t
        return out

    def _probe_tensor_collectives(self, grad: torch.Tensor) -> torch.Tensor | None:
        """Try reduce_scatter_tensor once; remember whether the backend supports it."""
        padded = self._padded(grad)
        out = padded.new_empty((self._chunk(grad), *grad.shape[1:]))
        try:
            torch_dist.reduce_scatter_tensor(out, padded, op=torch_dist.ReduceOp.SUM)
        except (RuntimeError, NotImplementedError, ValueError):
            self._tensor_collectives = False
            return None
        self._tensor_collectives = True
        return out

    def _reduce(self) -> dict[int, torch.Tensor]:
        ws = self.dist.world_size
        grads: dict[int, torch.Tensor] = {}
        for index, _, p in self.indexed_params():
            g = self._grad_or_zeros(p)
            if g is not None:
                grads[index] = g
        if ws == 1:
            return grads
        pending: list[tuple[int, torch.Tensor, Any]] = []
        for index, g in grads.items():
            if self._tensor_collectives is None:
                probed = self._probe_tensor_collectives(g)
                if probed is not None:
                    pending.append((index, probed, None))
                    continue
            if self._tensor_collectives:
                padded = self._padded(g)
                out = padded.new_empty((self._chunk(g), *g.shape[1:]))
                work = torch_dist.reduce_scatter_tensor(
                    out, padded, op=torch_dist.ReduceOp.SUM, async_op=True
                )
            else:
                out = g.clone()  # full gradient summed over ranks, sliced below
                work = torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM, async_op=True)
            pending.append((index, out, work))
        owned: dict[int, torch.Tensor] = {}
        params = {index: p for index, _, p in self.indexed_params()}
        for index, out, work in pending:
            if work is not None:
                work.wait()
            start, stop = self.owned_rows(index, params[index])
            if not self._tensor_collectives:
                out = out[start:stop]
            owned[index] = out[: stop - start].div_(ws)
        return owned

    def _update(self, grads: dict[int, torch.Tensor]) -> None:
        gathers = []
        for index, group, p in self.indexed_params():
            if index not in grads:
                continue
            start, stop = self.owned_rows(index, p)
            if stop > start:
                self._adamw_rows(group, p, p.data[start:stop], grads[index])
            if self.dist.is_distributed:
                gathers.append(self._share_rows(index, p))
        for finish in gathers:
            finish()

    def _adamw_rows(self, group: Group, p: torch.Tensor, rows: torch.Tensor, g: torch.Tensor) -> None:
        """One AdamW update of the owned `rows` view of p with averaged gradient rows `g`."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(rows)
            state["exp_avg_sq"] = torch.zeros_like(rows)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, t = group["lr"], state["step"]
        rows.mul_(1.0 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(g, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (state["exp_avg_sq"] / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
        rows.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1**t))

    def _share_rows(self, index: int, p: torch.Tensor) -> Callable[[], None]:
        """Start gathering every rank's updated rows into p; return a function that finishes."""
        ws, chunk = self.dist.world_size, self._chunk(p)
        start, stop = self.owned_rows(index, p)
        mine = p.data.new_zeros((chunk, *p.shape[1:]))  # (chunk, ...) padded with zero rows
        mine[: stop - start] = p.data[start:stop]
        in_place = chunk * ws == p.shape[0] and p.data.is_contiguous()
        target = p.data if in_place else p.data.new_empty((chunk * ws, *p.shape[1:]))
        if self._tensor_collectives:
            work = torch_dist.all_gather_into_tensor(target, mine, async_op=True)
        else:
            work = torch_dist.all_gather(list(target.chunk(ws)), mine, async_op=True)

        def finish() -> None:
            work.wait()
            if not in_place:
                p.data.copy_(target[: p.shape[0]])

        return finish
