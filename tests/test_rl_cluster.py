"""RL on the local Ray cluster (cluster/rl.py, jobs/rl.py): the micro preset end to end after a
(stand-in) SFT stage, the sync check catching a corrupted sync, a rollout actor killed mid-step,
learning on the toy task (and unlearning with the advantage sign flipped), broadcast sync over a
gloo group, one-step-off-policy overlap, two learner ranks, resume from a checkpoint, and bad input.

The starting model is a depth-2 GPT with nanochat's init (zero lm_head: it samples uniformly) and a
tiny tokenizer trained in a fixture, saved where the SFT stage exports: {run}/sft/model/.
Run: `python -m pytest tests/test_rl_cluster.py -q -s` (-s prints the learning curves).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cluster.artifacts import latest_checkpoint
from cluster.resources import ClusterDescription, UnplaceableError, check_placeable
from cluster.rl import RLRun, WeightSyncError
from cluster.specs import RLSpec
from cluster.storage import RunStorage
from jobs import rl as job
from jobs.config import ConfigError, load_stage_config
from nanochat.checkpoint import save_model
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

CORPUS = ["The sea is wide and the moon is bright over the small town by the river.",
          "Hello there! Apples and bananas, bread and stone; a long road in the rain.",
          "Write a few words, then end your answer with a word. Tell me about music and books."] * 8
VOCAB = 300
# The toy task from an untrained model: 4 prompts x 8 samples of 4 tokens per step, sampled from
# the full vocabulary (top_k 0: with uniform logits top-k would keep the lowest ids only). The
# seed's lrs x 2 instead of x 0.05 (init_lr_frac), decaying linearly to 0 as in the seed, so that
# two dozen steps move the policy.
TOY_SETTINGS = ("task=toy", "num_steps=2", "examples_per_step=4", "group_size=8", "max_new_tokens=4", "top_k=0",
                "device_batch_size=32", "init_lr_frac=2.0", "num_rollout_actors=2", "rollout_cpus=0.5",
                "learner_cpus=1.0", "sandbox_actors=0", "eval_examples=8", "eval_samples=4", "max_seq_len=null",
                "rollout_slots=0", "eval_every=0", "checkpoint_every=0")


def toy(*overrides: str) -> RLSpec:
    """The toy run's spec, built as a user's is: the micro preset, the settings above, then `overrides`."""
    return load_stage_config(job.RLConfig, "rl", "micro", [*TOY_SETTINGS, *overrides]).to_spec(cluster_gpus=0)


TOY = toy()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train_from_iterator(CORPUS, vocab_size=VOCAB).save(path)
    return path


def stand_in_sft(storage_root: Path, run: str, tokenizer_dir: Path, sequence_len: int = 128) -> str:
    """A depth-2 GPT with nanochat's init exported as {run}/sft/model/ (+ tokenizer, meta.json)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=sequence_len, head_dim=64))
    model.init_weights()
    dest = storage_root / run / "sft" / "model"
    save_model(dest, model, {"step": 0})
    shutil.copytree(tokenizer_dir, dest / "tokenizer")
    (storage_root / run / "sft" / "meta.json").write_text(json.dumps({"stage": "sft", "stand_in": True}))
    return str(dest)


def start_run(tmp_path: Path, tokenizer_dir: Path, spec: RLSpec, run: str = "r") -> RLRun:
    model = stand_in_sft(tmp_path, run, tokenizer_dir)
    rl_run = RLRun(spec, RunStorage(run, str(tmp_path)), model_uri=model, tokenizer_uri=f"{model}/tokenizer",
                   ray_metrics=False)
    rl_run.start()
    return rl_run


# ---------------------------------------------------------------- the stage on the micro preset


@pytest.mark.cluster
def test_micro_preset_runs_rl_after_sft(ray_cluster, embedded_pack, tokenizer_dir, tmp_path):
    stand_in_sft(tmp_path, "m", tokenizer_dir, sequence_len=64)  # as micro's pretrain: 64-token rows
    assert job.main(["--preset", "micro", "--run", "m", "--storage", str(tmp_path)]) == 0
    storage = RunStorage("m", str(tmp_path))
    meta = storage.read_meta("rl")
    cfg = load_stage_config(job.RLConfig, "rl", "micro")
    assert meta["config"]["num_rollout_actors"] == 2 and meta["config"]["num_learners"] == 1
    assert meta["metrics"]["final_step"] == cfg.num_steps == meta["metrics"]["version"]
    assert (tmp_path / "m" / "rl" / "model" / "config.json").is_file()
    assert (tmp_path / "m" / "rl" / "model" / "tokenizer").is_dir()
    rows = storage.read_metrics("rl")
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == list(range(1, cfg.num_steps + 1))
    for r in steps:
        assert r["rollout_tokens"] > 0 and r["rollout_tokens_per_s"] > 0 and r["sync_s"] > 0
        assert r["staleness"] == 0 and r["probe_gap"] <= cfg.probe_atol
    assert any("pass_at_1" in r for r in rows)
    assert latest_checkpoint(storage, "rl").step == cfg.num_steps
    assert job.main(["--preset", "micro", "--run", "m", "--storage", str(tmp_path)]) == 0  # complete: skipped


# ---------------------------------------------------------------- the sync check and actor failures


@pytest.mark.cluster
def test_sync_check_catches_corruption_and_a_killed_actor_is_replaced_mid_step(ray_cluster, tokenizer_dir, tmp_path):
    import ray

    with start_run(tmp_path, tokenizer_dir, toy("num_steps=3")) as run:
        # a corrupted sync that keeps its version number: small noise on one tensor of actor 1
        run.verify_sync()  # the first sync passed; a clean check passes again
        payload = ray.get(run.learners[0].weights.remote())
        name = "transformer.h.1.attn.c_q.weight"
        payload["state"][name] = payload["state"][name] + 1e-4 * torch.randn_like(payload["state"][name])
        assert ray.get(run.actors[1].load_weights.remote(payload)) == run.learner_version  # same version
        with pytest.raises(WeightSyncError, match=rf"rollout actor 1 .*{name}: different bits"):
            run.verify_sync()
        run.sync()  # a real sync repairs it

        # actor 0 killed while its chunk of step 1 is in flight: replaced, chunk re-issued, step completes
        killed = []

        def kill_first_actor(step: int, actors: list) -> None:
            if step == 1 and not killed:
                ray.kill(actors[0], no_restart=True)
                killed.append(actors[0])

        summary = run.run(on_dispatch=kill_first_actor)
        assert killed and run.actors[0] is not killed[0]
        assert summary["final_step"] == 3 and summary["actor_restarts"] == 1
        steps = [r for r in run.history if "reward_mean" in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        assert [r["actor_restarts"] for r in steps] == [0, 1, 1]
        assert steps[1]["samples"] == 4 * 8  # every prompt of step 1, the re-issued chunk included
        run.verify_sync()


@pytest.mark.cluster
@pytest.mark.parametrize("sync", ["object_store", "broadcast"])
def test_without_a_placed_replacement_the_step_completes_on_the_remaining_actor(ray_cluster, tokenizer_dir,
                                                                                tmp_path, sync):
    """replace_wait_s = 0: no replacement is ever placed in time, as when the lost host was the only
    one with room; the dead actor's chunk goes to the other, the sync (and the broadcast group) works
    with one actor, and the queued replacement joins at a later sync once placed."""
    import ray

    with start_run(tmp_path, tokenizer_dir, toy("num_steps=2", "replace_wait_s=0", f"weight_sync={sync}")) as run:
        killed = []

        def kill_second_actor(step: int, actors: list) -> None:
            if step == 0 and not killed:
                ray.kill(actors[1], no_restart=True)
                killed.append(actors[1])

        summary = run.run(on_dispatch=kill_second_actor)
        steps = [r for r in run.history if "reward_mean" in r]
        assert summary["final_step"] == 2 and summary["rollout_actors_lost"] == 1 and run.restarts == 1
        assert steps[0]["samples"] == 4 * 8 and steps[0]["chunks_redispatched"] == 1  # every prompt
        assert steps[0]["probe_gap"] <= TOY.probe_atol
        assert killed[0] not in run.actors and len(run.actors) + len(run.fleet.recruits) == 2
        assert run.fleet.backend.wait_placed(run.fleet.recruits, 120) == run.fleet.recruits
        run.sync()  # admits the replacement: synced and checked with the other
        assert len(run.actors) == 2 and run.fleet.recruits == []
        run.verify_sync()


# ---------------------------------------------------------------- learning is real


def toy_curve(tmp_path: Path, tokenizer_dir: Path, sign: float, run: str) -> tuple[list[float], dict]:
    """Training rewards per step, and the summary (held-out reward on 64 fixed prompts before and after)."""
    spec = replace(toy("num_steps=24", "seed=7", "eval_every=24", "eval_examples=64"), advantage_sign=sign)
    with start_run(tmp_path, tokenizer_dir, spec, run=run) as rl_run:
        summary = rl_run.run()
        return [r["reward_mean"] for r in rl_run.history if "reward_mean" in r], summary


@pytest.mark.cluster  # two runs of 24 steps: ~40 s on the quiet 2-core box (4 min when it is overloaded)
def test_reward_rises_on_the_toy_task_and_falls_with_the_sign_flipped(ray_cluster, tokenizer_dir, tmp_path):
    up, up_summary = toy_curve(tmp_path, tokenizer_dir, 1.0, "up")
    down, down_summary = toy_curve(tmp_path, tokenizer_dir, -1.0, "down")
    for s in (up_summary, down_summary):
        print(f"held-out reward ({s['eval_prompts']} prompts): {s['eval_reward_first']:.3f} -> "
              f"{s['eval_reward_last']:.3f}, change {s['eval_reward_change']:+.3f} +- {s['eval_reward_change_se']:.3f}")
    # on the same 64 held-out prompts, the change from before the first step to after the last is more
    # than two standard errors (of the paired per-prompt differences), up with the sign, down against it
    assert up_summary["eval_prompts"] == 64
    assert up_summary["eval_reward_change"] > 2 * up_summary["eval_reward_change_se"] > 0
    assert down_summary["eval_reward_change"] < -2 * down_summary["eval_reward_change_se"]
    print("\nreward, advantage sign +1:", " ".join(f"{r:.2f}" for r in up))
    print("reward, advantage sign -1:", " ".join(f"{r:.2f}" for r in down))
    first = lambda c: sum(c[:6]) / 6  # noqa: E731
    last = lambda c: sum(c[-6:]) / 6  # noqa: E731
    assert 0.05 <= first(up) <= 0.5 and 0.05 <= first(down) <= 0.5  # the toy task's starting range
    assert last(up) > first(up) + 0.3
    assert last(down) < first(down) / 2


# ---------------------------------------------------------------- other sync paths, overlap, learners


@pytest.mark.cluster
def test_overlap_with_broadcast_sync_trains_one_step_stale_and_regroups_after_a_death(ray_cluster, tokenizer_dir,
                                                                                      tmp_path):
    """max_staleness 1 (actors sample step t+1 while the learner trains step t) over a gloo group."""
    import ray

    spec = toy("weight_sync=broadcast", "max_staleness=1", "num_steps=3")
    with start_run(tmp_path, tokenizer_dir, spec) as run:
        run.run()
        steps = [r for r in run.history if "reward_mean" in r]
        assert [r["staleness"] for r in steps] == [0, 1, 1]
        assert all(0 <= r["clip_frac"] <= 1 for r in steps)
        assert run.generation == 1 and run.actor_version == run.learner_version == 3
        ray.kill(run.actors[1], no_restart=True)  # the replacement rebuilds the group at the next sync
        run.gather(run.launch("train", run.step_items(3), 0, TOY.group_size))
        run.sync()
        assert run.generation == 2 and run.restarts == 1


@pytest.mark.cluster
def test_two_learner_ranks_checkpoint_and_one_rank_resumes(ray_cluster, tokenizer_dir, tmp_path):
    import ray

    spec = toy("num_steps=2", "num_learners=2", "num_rollout_actors=1", "checkpoint_every=1", "eval_every=2")
    with start_run(tmp_path, tokenizer_dir, spec) as run:
        run.run()
        (v0, s0), (v1, s1) = ray.get([w.checksums.remote() for w in run.learners])
        assert v0 == v1 == 2 and s0 == s1  # the sharded optimizers keep the ranks identical
    storage = RunStorage("r", str(tmp_path))
    assert latest_checkpoint(storage, "rl").step == 2
    # as a run written before the checkpoint rename left them (rl/checkpoints/step_N): it still resumes
    rl_dir = tmp_path / "r" / "rl"
    (rl_dir / "checkpoints").mkdir()
    for step in (1, 2):
        (rl_dir / f"checkpoint_{step:07d}").rename(rl_dir / "checkpoints" / f"step_{step:06d}")
    model = tmp_path / "r" / "sft" / "model"
    spec = toy("num_steps=3", "num_learners=1", "num_rollout_actors=2", "checkpoint_every=1", "eval_every=2")
    resumed = RLRun(spec, storage, model_uri=str(model), tokenizer_uri=str(model / "tokenizer"),
                    ray_metrics=False)
    with resumed:
        resumed.start()  # the 2-rank optimizer state re-sharded onto 1 rank
        assert resumed.start_step == 2 and ray.get(resumed.learners[0].checksums.remote()) == (2, s0)
        summary = resumed.run()
    assert summary["final_step"] == 3 and summary["version"] == 3 and "pass_at_1" in summary
    rows = storage.read_metrics("rl")
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2, 3]
    # retention counts both layouts: the oldest (step 1, old layout) went, the new one is under its new name
    assert sorted(p.name for p in (rl_dir / "checkpoints").iterdir()) == ["step_000002"]
    assert sorted(p.name for p in rl_dir.glob("checkpoint_*")) == ["checkpoint_0000003"]


# ---------------------------------------------------------------- driver pieces without Ray


def test_step_prompts_cover_each_epoch_once_and_chunks_cover_the_step(tmp_path):
    from cluster.rl import _chunks

    run = RLRun(toy("examples_per_step=3"), RunStorage("p", str(tmp_path)), model_uri="-", tokenizer_uri="-")
    run.items = {"train": list(range(10, 20)), "eval": []}
    drawn = [i for step in range(10) for i in run.step_items(step)]  # 30 prompts = 3 epochs of 10
    for epoch in range(3):
        assert sorted(drawn[epoch * 10 : (epoch + 1) * 10]) == list(range(10, 20))
    assert drawn[:10] != drawn[10:20]  # each epoch its own order
    assert run.step_items(4) == drawn[12:15]  # a resumed run draws the same prompts
    for n, parts in [(7, 2), (2, 3), (0, 2), (16, 4)]:
        bounds = _chunks(n, parts)
        assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


# ---------------------------------------------------------------- bad input, before any work


def test_group_size_of_one_is_refused():
    with pytest.raises(ConfigError, match="advantage is the reward minus its group's mean"):
        load_stage_config(job.RLConfig, "rl", "micro", ["group_size=1"])


def test_missing_sft_model_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init before the inputs were checked"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert job.main(["--preset", "micro", "--run", "nosft", "--storage", str(tmp_path)]) == 2
    with pytest.raises(Exception, match="run the sft stage"):
        job.model_inputs(RunStorage("nosft", str(tmp_path)), job.RLConfig())


def test_more_rollout_actors_than_the_cluster_can_place_are_refused():
    cfg = load_stage_config(job.RLConfig, "rl", "micro", ["num_rollout_actors=16", "rollout_cpus=1"])
    spec = cfg.to_spec(cluster_gpus=0)
    laptop = ClusterDescription(nodes=[("head", {"CPU": 4.0})], source="test")
    with pytest.raises(UnplaceableError, match="CPU"):
        check_placeable(job.demand(spec), laptop)
    check_placeable(job.demand(load_stage_config(job.RLConfig, "rl", "micro").to_spec(0)), laptop)


@pytest.mark.cluster
def test_the_job_refuses_unplaceable_actors_before_starting_any(ray_cluster, tokenizer_dir, tmp_path, monkeypatch):
    stand_in_sft(tmp_path, "big", tokenizer_dir)
    monkeypatch.setattr(job.RLRun, "start", lambda self: pytest.fail("actors started for an unplaceable stage"))
    assert job.main(["--preset", "micro", "--run", "big", "--storage", str(tmp_path),
                     "--set", "num_rollout_actors=64"]) == 2
    assert not (tmp_path / "big" / "rl").exists()
