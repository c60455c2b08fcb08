"""Unit tests of the GRPO core (nanochat/rl.py) and the toy task (nanochat/tasks/end_letter.py): pure tensors,
no Ray. Advantages, the token alignment and masks of a packed batch, token-level normalisation
(also across ranks), the clipped ratio, a real learner step on a tiny GPT, pass@k against brute
force, the bit-level checksums and the probe comparison used by the weight-sync check.

Run: `python -m pytest tests/test_rl.py -q`.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nanochat import rl
from nanochat.common import DistInfo
from nanochat.gpt import GPTConfig
from nanochat.schedule import LearningRates
from nanochat.tasks.end_letter import EndLetter, last_letter
from tests.helpers import tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sample(prompt, tokens, mask=None, logprobs=None, reward=0.0, version=0) -> rl.Sample:
    return rl.Sample(list(prompt), list(tokens), list(mask or [1] * len(tokens)), logprobs, reward, version)


POLICY = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
LM_HEAD_STD = 0.02  # nanochat's init zeroes the lm_head: give the model an opinion to change


# ---------------------------------------------------------------- advantages and packing


def test_group_advantages_centre_each_group_and_need_two_samples():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = rl.group_advantages(rewards)
    assert torch.allclose(adv.sum(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # all alike: no signal
    assert torch.allclose(adv[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    scaled = rl.group_advantages(rewards, normalize_std=True)
    assert torch.allclose(scaled[0].std(correction=0), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(scaled[1], torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        rl.group_advantages(torch.ones(3, 1))


def test_pack_batch_aligns_targets_and_never_trains_prompt_or_forced_tokens():
    s = sample([1, 2, 3], [4, 5, 6, 7], mask=[1, 0, 0, 1], logprobs=[-0.1, -0.2, -0.3, -0.4], reward=1.0)
    t = sample([1, 2], [9], logprobs=[-0.5], reward=0.0)
    batch = rl.pack_batch([[s, t]], rl.GRPOConfig())
    assert batch.inputs.tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 0, 0, 0, 0]]
    assert batch.targets.tolist() == [[-1, -1, 4, -1, -1, 7], [-1, 9, -1, -1, -1, -1]]
    assert batch.behaviour.tolist()[0] == pytest.approx([0, 0, -0.1, 0, 0, -0.4])
    assert batch.advantages.tolist() == [0.5, -0.5]
    assert batch.num_tokens == 3  # 2 sampled tokens of s (the forced ones excluded) + 1 of t
    with pytest.raises(ValueError, match="same number of samples"):
        rl.pack_batch([[s, t], [s]], rl.GRPOConfig())


# ---------------------------------------------------------------- the loss


def batch_and_logp(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = [[sample([1, 2], torch.randint(3, 20, (5,), generator=gen).tolist(),
                      mask=[1, 1, 0, 1, 1] if j % 2 else None, reward=float(j % 3 == 0),
                      logprobs=(-torch.rand(5, generator=gen)).tolist()) for j in range(4)] for _ in range(3)]
    batch = rl.pack_batch(groups, rl.GRPOConfig())
    logp = -torch.rand(batch.targets.shape, generator=gen)
    return batch, logp


def test_plain_loss_is_the_token_level_mean_over_trained_tokens_only():
    batch, logp = batch_and_logp()
    logp.requires_grad_(True)
    loss, stats = rl.policy_loss(logp, batch, rl.GRPOConfig(), normaliser=batch.num_tokens)
    valid = batch.targets >= 0
    expected = -(logp * batch.advantages[:, None] * valid).sum() / valid.sum()
    assert torch.allclose(loss, expected)
    assert stats["tokens"] == batch.num_tokens
    loss.backward()
    assert torch.equal(logp.grad[~valid], torch.zeros_like(logp.grad[~valid]))  # prompt, forced, padding
    assert torch.allclose(logp.grad[valid], (-batch.advantages[:, None].expand_as(logp) / valid.sum())[valid])


def test_sign_flip_reverses_the_gradient():
    batch, logp = batch_and_logp(1)
    up = rl.policy_loss(logp, batch, rl.GRPOConfig(), batch.num_tokens)[0]
    down = rl.policy_loss(logp, batch, rl.GRPOConfig(advantage_sign=-1.0), batch.num_tokens)[0]
    assert torch.allclose(up, -down)


def test_shards_over_ranks_average_to_the_global_loss():
    """What the sharded optimizers see: per-rank losses with normaliser total/world, averaged."""
    batch, logp = batch_and_logp(2)
    full = rl.policy_loss(logp, batch, rl.GRPOConfig(), batch.num_tokens)[0]
    world = 3
    parts = [rl.policy_loss(logp[r::world], batch.shard(r, world), rl.GRPOConfig(), batch.num_tokens / world)[0]
             for r in range(world)]
    assert torch.allclose(sum(parts) / world, full)


def test_clipped_ratio_matches_plain_gradient_on_policy_and_stops_far_off():
    batch, logp = batch_and_logp(3)
    on_policy = batch.behaviour.clone()
    plain_logp = on_policy.clone().requires_grad_(True)
    rl.policy_loss(plain_logp, batch, rl.GRPOConfig(), batch.num_tokens)[0].backward()
    ratio_logp = on_policy.clone().requires_grad_(True)
    loss, stats = rl.policy_loss(ratio_logp, batch, rl.GRPOConfig(clip_eps=0.2), batch.num_tokens)
    loss.backward()
    assert torch.allclose(plain_logp.grad, ratio_logp.grad, atol=1e-7)
    assert stats["clipped_tokens"] == 0
    far = (on_policy + 1.0).requires_grad_(True)  # ratio e > 1.2 everywhere trained
    loss, stats = rl.policy_loss(far, batch, rl.GRPOConfig(clip_eps=0.2), batch.num_tokens)
    loss.backward()
    positive = (batch.advantages > 0)[:, None].expand_as(far) & (batch.targets >= 0)
    assert positive.any()
    assert torch.equal(far.grad[positive], torch.zeros_like(far.grad[positive]))  # clipped: no push further
    assert stats["clipped_tokens"] >= int(positive.sum())


def test_config_and_staleness_errors():
    with pytest.raises(ValueError, match="clip_eps"):
        rl.GRPOConfig(clip_eps=1.5)
    with pytest.raises(ValueError, match="advantage_sign"):
        rl.GRPOConfig(advantage_sign=0.5)
    assert rl.check_staleness(5, [5, 4, 4], 1) == 1
    with pytest.raises(ValueError, match="bound of 0"):
        rl.check_staleness(5, [4], 0)
    with pytest.raises(ValueError, match="newer"):
        rl.check_staleness(5, [6], 1)
    assert rl.rl_lr_multiplier(0, 10) == 1.0 and rl.rl_lr_multiplier(5, 10) == 0.5


def test_learner_step_moves_probability_toward_positive_advantage():
    model = tiny_gpt(POLICY, lm_head_std=LM_HEAD_STD)
    optimizers = model.setup_optimizers(LearningRates(embedding_lr=0.05, unembedding_lr=0.05, matrix_lr=0.02))
    good, bad = [7, 8, 9], [10, 11, 12]
    groups = [[sample([1, 2], good, reward=1.0), sample([1, 2], bad, reward=0.0)]]
    batch = rl.pack_batch(groups, rl.GRPOConfig())

    def seq_logp() -> torch.Tensor:
        with torch.no_grad():
            return rl.token_logprobs(model, batch.inputs, batch.targets).sum(1)  # (2,)

    before = seq_logp()
    stats = rl.policy_gradient_step(model, optimizers, batch, rl.GRPOConfig(), DistInfo(),
                                    total_tokens=batch.num_tokens, micro_batch_size=1)
    after = seq_logp()
    assert after[0] > before[0] and after[1] < before[1]
    assert stats["tokens"] == 6
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- pass@k


def test_pass_at_k_equals_brute_force_over_subsets():
    n = 6
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert rl.pass_at_k([c], n, k) == pytest.approx(brute)
    assert rl.pass_at_k([0, 6], 6, 1) == 0.5
    with pytest.raises(ValueError):
        rl.pass_at_k([1], 4, 5)
    with pytest.raises(ValueError):
        rl.pass_at_k([5], 4, 1)


# ---------------------------------------------------------------- checksums and probes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_checksum_sees_one_flipped_bit_and_moved_values(dtype):
    t = (torch.randn(33, 17) * 10).to(dtype)
    assert rl.tensor_checksum(t) == rl.tensor_checksum(t.clone())
    flipped = t.clone()
    flipped.view(-1).view(torch.uint8)[37] ^= 1  # one bit of one byte
    assert rl.tensor_checksum(flipped) != rl.tensor_checksum(t)
    swapped = t.clone().view(-1)
    swapped[3], swapped[200] = t.view(-1)[200].clone(), t.view(-1)[3].clone()
    assert torch.equal(swapped, t.view(-1)) or rl.tensor_checksum(swapped) != rl.tensor_checksum(t)
    assert rl.tensor_checksum(t.t()) == rl.tensor_checksum(t.t().contiguous())  # row-major bytes of views


def test_state_checksums_name_the_corrupted_tensor_and_shape_changes():
    model = tiny_gpt(POLICY, lm_head_std=LM_HEAD_STD)
    want = rl.state_checksums(model.state_dict())
    same = tiny_gpt(POLICY, lm_head_std=LM_HEAD_STD)
    assert rl.checksum_mismatches(want, rl.state_checksums(same.state_dict())) == []
    noisy = {k: v.clone() for k, v in model.state_dict().items()}
    noisy["transformer.h.0.mlp.c_fc.weight"] += 1e-6 * torch.randn_like(noisy["transformer.h.0.mlp.c_fc.weight"])
    problems = rl.checksum_mismatches(want, rl.state_checksums(noisy))
    assert len(problems) == 1 and problems[0].startswith("transformer.h.0.mlp.c_fc.weight: different bits")
    half = {k: v.half() for k, v in model.state_dict().items()}
    assert all("float16" in p for p in rl.checksum_mismatches(want, rl.state_checksums(half)))
    partial = dict(model.state_dict())
    partial.pop("lm_head.weight")
    assert rl.checksum_mismatches(want, rl.state_checksums(partial)) == ["lm_head.weight: missing"]


def test_probe_logprobs_agree_for_equal_weights_and_differ_for_noise():
    a, b = tiny_gpt(POLICY, lm_head_std=LM_HEAD_STD), tiny_gpt(POLICY, lm_head_std=LM_HEAD_STD)
    inputs, targets = rl.probe_batch(64, rows=3, length=16)
    assert inputs.shape == targets.shape == (3, 16)
    assert torch.equal(rl.probe_batch(64, 3, 16)[0], inputs)  # fixed
    pa, pb = rl.probe_logprobs(a, inputs, targets), rl.probe_logprobs(b, inputs, targets)
    assert rl.logprob_gap(pa, pb) == 0.0
    with torch.no_grad():
        b.lm_head.weight.add_(0.05 * torch.randn_like(b.lm_head.weight))
    assert rl.logprob_gap(pa, rl.probe_logprobs(b, inputs, targets)) > 1e-3
    assert math.isfinite(float(pa.sum())) and (pa <= 0).all()


# ---------------------------------------------------------------- the toy task


def test_toy_task_rewards_the_last_letter():
    task = EndLetter("aeiou", size=10)
    conv = task.get(0)
    assert conv["messages"][0]["role"] == "user" and "a, e, i, o, u" in conv["messages"][0]["content"]
    assert task.reward(conv, conv["messages"][1]["content"]) == 1.0  # the example answer is right
    assert task.reward(conv, "I say hello!!") == 1.0
    assert task.reward(conv, "I say hi there, dog 42") == 0.0
    assert task.reward(conv, "123 ...") == 0.0
    assert last_letter("ABC d.") == "d" and last_letter("") is None
    train, heldout = EndLetter(size=50), EndLetter(size=50, split="heldout")
    assert [train.get(i) for i in range(50)] == [EndLetter(size=50).get(i) for i in range(50)]
    assert {train.item_key(i) for i in range(50)}.isdisjoint(heldout.item_key(i) for i in range(50))
    with pytest.raises(ValueError, match="letters"):
        EndLetter("a1")
