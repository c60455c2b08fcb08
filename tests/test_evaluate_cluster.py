"""Tests of the evaluation actor pool (cluster/eval_pool.py) and the evaluate job (jobs/evaluate.py).

Cluster tests (marked `cluster`) use the session's local Ray cluster: CORE requests sharded over 2
actors give exactly the totals of 1 actor and of a plain in-process loop, and the job evaluates a
tiny random GPT end to end on the micro preset. The others check pool sizing, the config and bad
input (unknown task, missing checkpoint) without Ray.
Run: `python -m pytest tests/test_evaluate_cluster.py` (add `-m "not cluster"` for the quick ones).
"""

from __future__ import annotations

import functools
import json
import math

import pytest

from cluster.eval_pool import EvalPool, EvalPoolError, Jobs, PoolSpec, load_from_storage, plan_pool
from cluster.storage import RunStorage
from jobs import evaluate as job
from jobs.config import ConfigError, load_stage_config
from nanochat.checkpoint import save_model
from nanochat.evals import core as core_eval
from nanochat.evals import core_tasks
from nanochat.evals import harness as evaluation
from nanochat.gpt import GPT, GPTConfig
from tests.helpers import fail_job, pid_and, pid_chunk, short_chunk, tiny_gpt

SEQ_LEN = 128
VOCAB = 512  # pack_tokenizer_dir's vocabulary: bytes, merges and nanochat's special tokens
# depth 2: tiny_gpt(MODEL) knows nothing (nanochat's init: zero lm_head, uniform logits), init=False is random
MODEL = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=SEQ_LEN, head_dim=64)




def export(model: GPT, tokenizer_dir, dest) -> str:
    """Export like the pretrain stage: weights, config.json, tokenizer/ beside them."""
    from nanochat.tokenizer import Tokenizer

    save_model(dest, model, {"step": 0})
    Tokenizer.load(tokenizer_dir).save(dest / "tokenizer")
    return str(dest)


# ----------------------------------------------------------------------------- without Ray


def test_pool_sizing_shrinks_cpus_to_fit_and_takes_one_gpu_per_actor():
    assert plan_pool(2, 1.0, {"CPU": 2.0}) == PoolSpec(2, 1.0, 0.0, 1)
    assert plan_pool(4, 1.0, {"CPU": 2.0}) == PoolSpec(4, 0.5, 0.0, 1)  # fractional on a 2-core box
    assert plan_pool(2, 4.0, {"CPU": 16.0}) == PoolSpec(2, 4.0, 0.0, 4)
    assert plan_pool(8, 2.0, {"CPU": 64.0, "GPU": 4.0}) == PoolSpec(4, 2.0, 1.0, 2)  # no more actors than GPUs
    assert plan_pool(2, 1.0, {"CPU": 8.0, "GPU": 2.0}, gpus_per_actor=0) == PoolSpec(2, 1.0, 0.0, 1)
    with pytest.raises(EvalPoolError, match="no CPUs"):
        plan_pool(2, 1.0, {})
    with pytest.raises(EvalPoolError, match="the cluster has 0.0"):
        plan_pool(1, 1.0, {"CPU": 4.0}, gpus_per_actor=1)


def test_presets_hold_valid_evaluate_sections_and_unknown_keys_are_refused():
    micro = load_stage_config(job.EvaluateConfig, "evaluate", "micro")
    tiny = load_stage_config(job.EvaluateConfig, "evaluate", "tiny")
    assert micro.max_per_task < tiny.max_per_task and micro.core_source == tiny.core_source == "pack"
    with pytest.raises(ConfigError, match="max_per_taks"):
        load_stage_config(job.EvaluateConfig, "evaluate", "micro", ["max_per_taks=3"])
    assert all(f.description for f in job.EvaluateConfig.model_fields.values())


def test_a_missing_checkpoint_names_the_stage_to_run(tmp_path, capsys):
    rc = job.main(["--stage", "pretrain", "--preset", "micro", "--run", "r", "--storage", str(tmp_path)])
    assert rc == 2
    assert "run the pretrain stage first" in capsys.readouterr().err
    assert not (tmp_path / "r" / "evaluate" / "pretrain.json").exists()


def test_a_stage_without_an_exported_model_is_refused(tmp_path, capsys):
    storage = RunStorage("r", str(tmp_path))
    with storage.writer("pretrain", {}) as w:
        w.commit()
    rc = job.main(["--stage", "pretrain", "--preset", "micro", "--run", "r", "--storage", str(tmp_path)])
    assert rc == 2 and "no exported model" in capsys.readouterr().err


def test_an_unknown_task_name_is_refused_before_any_work(tmp_path, pack_tokenizer_dir, capsys):
    storage = RunStorage("r", str(tmp_path))
    with storage.writer("pretrain", {}) as w:
        export(tiny_gpt(MODEL), pack_tokenizer_dir, w.path / "model")
        w.commit()
    rc = job.main(["--stage", "pretrain", "--preset", "micro", "--run", "r", "--storage", str(tmp_path),
                   "--set", "core_tasks=[arc_easy,no_such_task]"])
    assert rc == 2
    assert "unknown CORE task(s) ['no_such_task']" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on the cluster


@pytest.mark.cluster
def test_two_actors_give_exactly_the_totals_of_one_actor_and_of_one_process(ray_cluster, pack_tokenizer_dir, tmp_path):
    model_dir = export(tiny_gpt(MODEL, init=False), pack_tokenizer_dir, tmp_path / "model")
    tasks = core_tasks.pack_core_tasks(["arc_easy", "winogrande", "lambada_openai", "copa"])
    requests = [r for t in tasks for r in core_eval.build_requests(t, max_items=5)]
    loader = functools.partial(load_from_storage, model_dir, None)

    local = evaluation.aggregate(core_eval.score_requests(loader("cpu"), requests))
    totals = {}
    for n in (1, 2):
        with EvalPool(loader, PoolSpec(n, 1.0, 0.0, 1)) as pool:
            assert len({a["pid"] for a in pool.ready()}) == n
            results = pool.map(core_eval.score_requests, requests, chunks_per_actor=3)
        assert [(r.task, r.index) for r in results] == [(q.task, q.index) for q in requests]
        totals[n] = {t: (v.score_sum, v.count) for t, v in evaluation.aggregate(results).items()}
    assert totals[1] == totals[2] == {t: (v.score_sum, v.count) for t, v in local.items()}
    assert {c for _, c in totals[2].values()} == {5}
    assert len({s for s, _ in totals[2].values()}) > 1  # a random model: the scores are not all alike


@pytest.mark.cluster
def test_one_queue_runs_every_job_costliest_first_and_the_bpb_parts_add_up(ray_cluster, pack_tokenizer_dir,
                                                                            tmp_path, capsys):
    """run_jobs: results in the jobs' order, both actors used, the costliest started first; a
    failing job names its label, and so does a chunk that returns too few results. val_bpb in 3 parts
    combined = in one part, to the last float bits."""
    model_dir = export(tiny_gpt(MODEL, init=False), pack_tokenizer_dir, tmp_path / "model")
    loader = functools.partial(load_from_storage, model_dir, None)
    shards = job.validation_shards(load_stage_config(job.EvaluateConfig, "evaluate", "micro"))
    jobs = Jobs()
    small = jobs.add_chunks("small", pid_chunk, list(range(6)), 3, cost_per_item=0.1)
    big = jobs.add("big", pid_and, ("big",), cost=5.0)
    parts = [jobs.add("bpb", evaluation.val_bpb, (shards, 4096, 4, k, 3), cost=1.0) for k in range(3)]
    whole = jobs.add("bpb whole", evaluation.val_bpb, (shards, 4096, 4), cost=1.0)
    with EvalPool(loader, PoolSpec(2, 1.0, 0.0, 1)) as pool:
        results, seconds = pool.run_jobs(jobs.jobs)
        assert [v for _, v, _ in Jobs.gather(results, small)] == list(range(6))
        assert results[big][0][1] == "big" and set(seconds) == {"small", "big", "bpb", "bpb whole"}
        assert len({pid for pid, _, _ in Jobs.gather(results, small)} | {results[big][0][0]}) == 2
        assert results[big][0][2] < min(started for _, _, started in Jobs.gather(results, small))
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[evaluate]")]
        assert len(lines) == len(jobs.jobs) and lines[-1].startswith("[evaluate] small 3/3, big 1/1, bpb 3/3")
        combined = evaluation.combine_bpb([results[p][0] for p in parts])
        alone = results[whole][0]
        assert combined["tokens"] == alone["tokens"] >= 4096 and combined["bytes"] == alone["bytes"]
        assert combined["bpb"] == pytest.approx(alone["bpb"], rel=1e-12)
        failing = Jobs()
        failing.add("CORE", fail_job, ("chunk",), cost=1.0)
        with pytest.raises(EvalPoolError, match="(?s)failed on CORE.*broken chunk"):
            pool.run_jobs(failing.jobs)
        short = Jobs()
        short.add_chunks("format", short_chunk, [1, 2, 3], 1, cost_per_item=0.1)
        with pytest.raises(EvalPoolError, match="format: a chunk of 3 items gave 2 results"):
            pool.run_jobs(short.jobs)


@pytest.mark.cluster
def test_a_broken_model_directory_is_reported_by_ready(ray_cluster, tmp_path):
    loader = functools.partial(load_from_storage, str(tmp_path / "nothing"), None)
    with EvalPool(loader, PoolSpec(1, 0.5, 0.0, 1)) as pool:
        with pytest.raises(EvalPoolError, match="no exported model"):
            pool.ready()


@pytest.mark.cluster
def test_the_job_evaluates_a_model_that_knows_nothing_at_chance(ray_cluster, pack_tokenizer_dir, tmp_path,
                                                                capsys):
    storage = RunStorage("r", str(tmp_path))
    with storage.writer("pretrain", {"depth": 2}) as w:
        export(tiny_gpt(MODEL), pack_tokenizer_dir, w.path / "model")
        w.metrics["val_bpb"] = 9.0
        w.commit()
    argv = ["--stage", "pretrain", "--preset", "micro", "--run", "r", "--storage", str(tmp_path)]
    assert job.main(argv) == 0
    doc = json.loads((tmp_path / "r" / "evaluate" / "pretrain.json").read_text())
    core = doc["core"]
    assert core["label"] == "CORE-14 (our config)" and core["source"] == "pack"
    assert len(core["tasks"]) == 14 and {t["num_items"] for t in core["tasks"].values()} == {4}
    # zero lm_head: uniform logits, so every choice ties and each task scores exactly its chance
    assert core["metric"] == pytest.approx(0.0, abs=1e-9)
    # uniform over V tokens: log2(V) bits per token, spread over the bytes of those tokens
    assert 0 < doc["eval_bpb"] < math.log2(VOCAB) and doc["eval_bpb_tokens"] >= 4096
    assert [s["prompt"] for s in doc["samples"]] == list(evaluation.SAMPLE_PROMPTS)
    assert doc["pool"]["spec"]["num_actors"] == 2 and doc["input_metrics"] == {"val_bpb": 9.0}
    assert "CORE-14 (our config): 0.0000" in capsys.readouterr().out

    before = (tmp_path / "r" / "evaluate" / "pretrain.json").stat().st_mtime_ns
    assert job.main(argv) == 0 and "skipped" in capsys.readouterr().out
    assert (tmp_path / "r" / "evaluate" / "pretrain.json").stat().st_mtime_ns == before
    assert job.main([*argv, "--force", "--set", "core_tasks=[copa]", "--set", "num_actors=1"]) == 0
    redone = json.loads((tmp_path / "r" / "evaluate" / "pretrain.json").read_text())
    assert redone["core"]["label"] == "CORE-1 (our config)" and redone["pool"]["spec"]["num_actors"] == 1
