"""Schedules and horizon arithmetic for training, as plain functions of the step.

Notable:
- lr multiplier: linear warmup, constant, then linear warmdown to final_lr_frac (the seed's
  default is no warmup and the last 20% of steps decaying to 0). Optimizers multiply it into each
  group's "initial_lr".
- Muon momentum: 0.85 -> 0.95 linearly over the first 300 steps, then constant.
- Learning rates: `LearningRates`, the seed's per-group lrs and weight decay (GPT.setup_optimizers
  builds the optimizers from them; every stage config takes its defaults from here).
- Horizon: steps from an explicit count, a FLOPs budget, or a tokens-per-parameter ratio (20 is
  Chinchilla's); gradient accumulation from the total batch in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

# The seed's schedule, written once: the core's LoopConfig and lr_multiplier and the stage configs in
# jobs/config.py take their defaults from here.
WARMUP_RATIO = 0.0  # no warmup
WARMDOWN_RATIO = 0.2  # the last 20% of the steps decay linearly ...
FINAL_LR_FRAC = 0.0  # ... to 0
GRAD_CLIP = 1.0  # max global gradient norm (<= 0: no clipping)


@dataclass(frozen=True)
class LearningRates:
    """The optimizer settings of `GPT.setup_optimizers`; the defaults are the seed's (the stage
    configs in jobs/ take theirs from here). AdamW lrs were tuned at width 768 and are scaled by
    (n_embd / 768)^-0.5 when the optimizers are built; Muon's is used as it is."""

    embedding_lr: float = 0.2  # AdamW, token embedding
    unembedding_lr: float = 0.004  # AdamW, lm_head
    matrix_lr: float = 0.02  # Muon, the transformer blocks' matrices
    weight_decay: float = 0.0  # AdamW

    def scaled(self, frac: float) -> LearningRates:
        """All three lrs times `frac` (weight decay unchanged): the chat stages' and RL's init_lr_frac."""
        return LearningRates(self.embedding_lr * frac, self.unembedding_lr * frac, self.matrix_lr * frac,
                             self.weight_decay)


def lr_multiplier(
    step: int,
    num_steps: int,
    warmup_ratio: float = WARMUP_RATIO,
    warmdown_ratio: float = WARMDOWN_RATIO,
    final_lr_frac: float = FINAL_LR_FRAC,
) -> float:
    """Multiplier of the initial lr at `step` (0-based) of a run of `num_steps` steps."""
    warmup = round(warmup_ratio * num_steps)
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown  # 1 -> 0 over the warmdown
    return progress + (1.0 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum at `step`: linear from `start` to `end` over `warmup_steps`, then `end`."""
    frac = 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


def grad_accum_steps(total_batch_tokens: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that all ranks together see total_batch_tokens."""
    per_pass = device_batch_size * seq_len * world_size  # tokens in one forward/backward of all ranks
    if per_pass <= 0 or total_batch_tokens % per_pass:
        raise ValueError(
            f"total_batch_tokens {total_batch_tokens} is not a multiple of device_batch_size "
            f"{device_batch_size} x seq_len {seq_len} x world_size {world_size} = {per_pass}; "
            "change the total batch or the device batch size"
        )
    return total_batch_tokens // per_pass


def num_steps_from(
    *,
    total_batch_tokens: int,
    num_params: int,
    flops_per_token: int,
    num_iterations: int = -1,
    flops_budget: float = -1.0,
    target_param_data_ratio: float = 20.0,
) -> int:
    """Training horizon, first rule that is set wins (as in the seed):
    num_iterations > 0; else flops_budget > 0 -> budget / (flops_per_token x batch);
    else target_param_data_ratio > 0 -> ratio x num_params tokens // batch."""
    if num_iterations > 0:
        return num_iterations
    if flops_budget > 0:
        steps = round(flops_budget / (flops_per_token * total_batch_tokens))
    elif target_param_data_ratio > 0:
        steps = int(target_param_data_ratio * num_params) // total_batch_tokens
    else:
        raise ValueError(
            "set one of num_iterations, flops_budget or target_param_data_ratio to a positive value"
        )
    if steps < 1:
        raise ValueError(
            f"the horizon rounds to {steps} steps with a batch of {total_batch_tokens} tokens; "
            "raise the budget/ratio or lower the total batch"
        )
    return steps
