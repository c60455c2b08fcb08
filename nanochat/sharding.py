"""The sharding base of the optimizers (nanochat/adamw.py, nanochat/muon.py) and their checkpoint format.

Notable:
- No DDP: the optimizer reduces the gradients itself. Each parameter is owned by row ranges:
  AdamW splits every parameter along dim 0 into world_size contiguous chunks (rank r owns chunk r),
  Muon gives whole matrices to ranks. A rank keeps optimizer state only for what it owns.
- A step is: reduce_gradients() (average over ranks, keep only the owned part) -> optional
  global-norm clipping from the owned parts (exact, one scalar all_reduce; see nanochat/train.py)
  -> update the owned part -> share the updated weights (all_gather / broadcast).
- Checkpoints across world sizes: `optimizer_shard_state` saves this rank's state keyed by the
  parameter's index in the optimizer and the row range it covers; `load_optimizer_shards`
  reassembles each parameter's rows from all saved shards and keeps the part this rank owns now.
"""

from __future__ import annotations

from typing import Any

import torch

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
