"""AdamW for the embedding and the lm_head, sharded over ranks ZeRO-2 style, plus the sharding
machinery it shares with Muon (nanochat/muon.py).

Notable:
- No DDP: the optimizer reduces the gradients itself. Each parameter is owned by row ranges:
  AdamW splits every parameter along dim 0 into world_size contiguous chunks (rank r owns chunk r),
  Muon gives whole matrices to ranks. A rank keeps optimizer state only for what it owns.
- A step is: reduce_gradients() (average over ranks, keep only the owned part) -> optional
  global-norm clipping from the owned parts (exact, one scalar all_reduce; see nanochat/train.py)
  -> update the owned part -> share the updated weights (all_gather / broadcast).
- Collectives: reduce_scatter_tensor + all_gather_into_tensor when the backend has them (NCCL;
  gloo on recent torch builds). Some gloo builds lack reduce_scatter: the first step probes it
  once and falls back to all_reduce + slice and a list all_gather (same numbers, more traffic).
  Reductions use SUM then divide, because gloo has no AVG on older builds.
- Rows that do not split evenly (dim 0 not divisible by world_size) are zero-padded for the
  collectives; chunks are ceil(rows / world_size) rows, so the last rank may own fewer.
- Checkpoints across world sizes: `optimizer_shard_state` saves this rank's state keyed by the
  parameter's index in the optimizer and the row range it covers; `load_optimizer_shards`
  reassembles each parameter's rows from all saved shards and keeps the part this rank owns now.
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

Group = dict[str, Any]


class ShardedOptimizer(torch.optim.Optimizer):
    """Base for optimizers that own row ranges of parameters and reduce their own gradients.

    Subclasses define `owned_rows`, `_reduce` (returns the averaged owned gradient slices) and
    `_update` (applies them and shares the new weights)."""

    def __init__(self, params: Any, defaults: dict[str, Any], dist: DistInfo) -> None:
        super().__init__(params, defaults)
        self.dist = dist
        self._owned_grads: dict[int, torch.Tensor] | None = None  # index -> averaged grad rows

    def indexed_params(self) -> list[tuple[int, Group, torch.Tensor]]:
        """(stable index, group, param) in group order: the keys used by shard checkpoints."""
        out, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((index, group, p))
                index += 1
        return out

    def owned_rows(self, index: int, p: torch.Tensor) -> tuple[int, int]:
        """Row range [start, stop) of parameter `index` whose state and update this rank owns."""
        raise NotImplementedError

    def _reduce(self) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def _update(self, grads: dict[int, torch.Tensor]) -> None:
        raise NotImplementedError

    def _grad_or_zeros(self, p: torch.Tensor) -> torch.Tensor | None:
        if p.grad is not None:
            return p.grad
        return torch.zeros_like(p) if self.dist.is_distributed else None

    def reduce_gradients(self) -> None:
        """Average gradients over ranks, keeping this rank's owned rows (idempotent per step)."""
        if self._owned_grads is None:
            self._owned_grads = self._reduce()

    def owned_grad_sq_sum(self) -> torch.Tensor:
        """Sum of squares (float32 scalar) of the owned averaged gradients; summed over ranks it
        is the squared global gradient norm, since owned parts never overlap."""
        self.reduce_gradients()
        assert self._owned_grads is not None
        grads = list(self._owned_grads.values())
        device = grads[0].device if grads else torch.device(self.dist.device)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            total = total + g.float().pow(2).sum()
        return total

    def scale_owned_grads(self, factor: torch.Tensor | float) -> None:
        """Multiply the owned averaged gradients by `factor` (gradient clipping)."""
        self.reduce_gradients()
        assert self._owned_grads is not None
        for g in self._owned_grads.values():
            g.mul_(factor)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Reduce (if not done yet), update the owned rows, share the new weights."""
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure")
        self.reduce_gradients()
        assert self._owned_grads is not None
        self._update(self._owned_grads)
        self._owned_grads = None
        # updates and collectives write through p.data, which PyTorch does not count as modifying
        # p: bump the version counters so caches keyed on them (nanochat/gpt.py PackedWeight) see it
        torch.autograd.graph.increment_version([p for _, _, p in self.indexed_params()])


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


def optimizer_shard_state(opt: ShardedOptimizer, dist: DistInfo) -> dict[str, Any]:
    """This rank's optimizer state as a plain dict of CPU tensors, for a checkpoint.

    Layout: {"optimizer": class name, "world_size", "rank", "params": {index: {"shape": [...],
    "rows": [start, stop], "state": {name: tensor of the owned rows | number}}}}."""
    params: dict[int, dict[str, Any]] = {}
    for index, _, p in opt.indexed_params():
        start, stop = opt.owned_rows(index, p)
        state = opt.state.get(p, {})
        if stop <= start or not state:
            continue
        saved = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in state.items()}
        params[index] = {"shape": list(p.shape), "rows": [start, stop], "state": saved}
    return {
        "optimizer": type(opt).__name__,
        "world_size": dist.world_size,
        "rank": dist.rank,
        "params": params,
    }


def _assemble_rows(pieces: list[dict[str, Any]], start: int, stop: int, index: int) -> dict[str, Any]:
    """Build the state of rows [start, stop) of one parameter from saved pieces covering them."""
    state: dict[str, Any] = {}
    covered = torch.zeros(stop - start, dtype=torch.bool)
    for piece in pieces:
        lo, hi = piece["rows"]
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            continue
        covered[a - start : b - start] = True
        for name, value in piece["state"].items():
            if not torch.is_tensor(value) or value.dim() == 0:
                state.setdefault(name, value)
                continue
            if name not in state:
                state[name] = value.new_zeros((stop - start, *value.shape[1:]))
            state[name][a - start : b - start] = value[a - lo : b - lo]
    if not bool(covered.all()):
        raise ValueError(
            f"optimizer shards do not cover rows {start}..{stop} of parameter {index}: "
            "pass the shards of ALL ranks of the saved run to load_optimizer_shards"
        )
    return state


def load_optimizer_shards(opt: ShardedOptimizer, shards: list[dict[str, Any]], dist: DistInfo) -> None:
    """Rebuild this rank's optimizer state from every shard saved by a run of any world size."""
    if opt.dist != dist:
        raise ValueError(f"load_optimizer_shards: optimizer was built for {opt.dist}, called with {dist}")
    kinds = {shard["optimizer"] for shard in shards}
    if kinds != {type(opt).__name__}:
        raise ValueError(f"shards are for {sorted(kinds)}, cannot load them into {type(opt).__name__}")
    saved_world = {shard["world_size"] for shard in shards}
    if len(saved_world) != 1 or len(shards) != next(iter(saved_world)):
        raise ValueError(
            f"got {len(shards)} shards from world sizes {sorted(saved_world)}: pass exactly one "
            "shard per rank of the saved run"
        )
    opt.state.clear()
    for index, _, p in opt.indexed_params():
        pieces = [shard["params"][index] for shard in shards if index in shard["params"]]
        if not pieces:
            continue  # saved before this parameter had any state (e.g. step 0)
        if pieces[0]["shape"] != list(p.shape):
            raise ValueError(
                f"parameter {index} has shape {list(p.shape)} but the checkpoint saved "
                f"{pieces[0]['shape']}: the model config must match the saved run"
            )
        start, stop = opt.owned_rows(index, p)
        if stop <= start:
            continue
        state = _assemble_rows(pieces, start, stop, index)
        opt.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in state.items()}
