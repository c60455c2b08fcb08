"""Report card: summary table from stage outputs, '-' for missing stages, plots, the job end to end;
the timeline (start-up, work, writing per stage) and the RL section."""

from __future__ import annotations

import json

from cluster.storage import RunStorage
from jobs import report as report_job
from nanochat.report import RunRecord, gpu_hours, make_plots, render_report, summary_table
from nanochat.timeline import split_wall_time


def _record() -> RunRecord:
    return RunRecord(
        run="r1",
        metas={"pretrain": {"duration_s": 7200.0, "resources": {"gpus": 8}, "metrics": {"val_bpb": 0.81}},
               "sft": {"duration_s": 3600.0, "resources": {"gpus": 8}}},
        evaluations={"pretrain": {"eval_bpb": 0.83, "core": {"label": "CORE-14 (our config)", "metric": 0.2219}},
                     "sft": {"chat": {"tasks": {"arc_easy": {"accuracy": 0.3876}, "gsm8k": {"accuracy": 0.0455}},
                                      "chatcore": 0.0884}}},
        metrics={"pretrain": [{"step": i, "loss": 5.0 - i * 0.1, "tokens_per_sec": 1000.0} for i in range(10)]},
    )


def test_summary_table_fills_known_cells_and_dashes_the_rest():
    table, label = summary_table(_record())
    assert label == "CORE-14 (our config)"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows["CORE-14 (our config)"] == ["0.2219", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "-", "0.3876", "-"]
    assert rows["GSM8K"] == ["-", "-", "0.0455", "-"]
    assert rows["MMLU"] == ["-", "-", "-", "-"]
    assert rows["ChatCORE"] == ["-", "-", "0.0884", "-"]


def test_the_two_bpb_numbers_are_named_apart():
    text = render_report(_record(), hourly_rate=2.5, plots=[], git_commit="abc")
    assert "- val_bpb (training validation: packed rows): 0.8100" in text
    assert "- evaluation bpb (the validation documents as one stream): 0.8300" in text


def test_cost_is_gpu_hours_times_rate():
    rec = _record()
    assert gpu_hours(rec) == 8 * 2 + 8 * 1
    text = render_report(rec, hourly_rate=2.5, plots=[], git_commit="abc")
    assert "$60.00" in text and "## midtrain\n\n-" in text and "abc" in text


def test_report_job_on_a_partial_run(tmp_path):
    storage = RunStorage("r1", str(tmp_path))
    with storage.writer("pretrain", {"depth": 2}) as w:
        w.metrics["val_bpb"] = 2.5
        w.commit()
    log = storage.metrics("pretrain")
    for step in range(5):
        log.append({"step": step, "loss": 4.0 - step / 10, "tokens_per_sec": 900.0})
    (tmp_path / "r1" / "evaluate").mkdir()
    (tmp_path / "r1" / "evaluate" / "pretrain.json").write_text(
        json.dumps({"val_bpb": 2.4, "core": {"label": "CORE-2 (our config)", "metric": 0.01}}))
    assert report_job.main(["--run", "r1", "--storage", str(tmp_path), "--preset", "micro"]) == 0
    out = tmp_path / "r1" / "report"
    text = (out / "report.md").read_text()
    assert "| CORE-2 (our config) | 0.0100 | - | - | - |" in text
    # an evaluation written before the rename (its bpb stored as val_bpb) is still shown, under the new name
    assert "- evaluation bpb (the validation documents as one stream): 2.4000" in text
    assert (out / "loss.png").stat().st_size > 1000 and "![loss](loss.png)" in text
    assert storage.is_complete("report")


# ---- the timeline and the RL section (nanochat/timeline.py) -----------------------------------------


def _span(name: str, kind: str, start: float, end: float) -> dict:
    return {"name": name, "kind": kind, "start": start, "end": end}


def test_wall_time_splits_into_start_up_work_and_writing():
    # submitted at 100; the job's process, ray.init... until 104; a "train" phase 104-150 inside which
    # the worker group starts until 110 and the final checkpoint is written from 146; export 150-152;
    # meta.json written at 153
    timeline = {"submitted_at": 100.0, "started_at": 103.0,
                "spans": [_span("train", "work", 104.0, 150.0), _span("export", "writing", 150.0, 152.0),
                          _span("worker start", "start-up", 104.0, 110.0),
                          _span("final checkpoint", "writing", 146.0, 150.0)]}
    split = split_wall_time(timeline, finished_at=153.0)
    assert (split.wall, split.startup, split.work, split.writing) == (53.0, 10.0, 36.0, 7.0)
    assert split.share("work") == 36.0 / 53.0
    # run by hand (no submission time): the wall starts with the stage's writer
    alone = split_wall_time({**timeline, "submitted_at": None}, finished_at=153.0)
    assert (alone.wall, alone.startup) == (50.0, 7.0)
    assert split_wall_time({"spans": []}, 1.0) is None


def test_report_shows_the_timeline_and_the_rl_curve():
    rec = _record()
    rec.metas = {"tokenizer": {"finished_at": 130.0, "timeline": {"submitted_at": 100.0, "spans": [
                     _span("train", "work", 110.0, 128.0), _span("write", "writing", 128.0, 129.0)]}},
                 "rl": {"finished_at": 300.0, "config": {"task": "toy"},
                        "task": {"train": "toy/end-letter-aeiou/train[0:] (4096 examples)",
                                 "eval": "toy/end-letter-aeiou/heldout[0:] (256 examples)"},
                        "metrics": {"final_step": 30, "eval_reward_first": 0.3, "eval_reward_last": 0.6,
                                    "eval_reward_change": 0.3, "eval_reward_change_se": 0.05, "eval_prompts": 64},
                        "timeline": {"submitted_at": 200.0, "spans": [_span("start", "start-up", 205.0, 220.0),
                                                                      _span("train", "work", 220.0, 290.0)]}}}
    rec.evaluations = {"sft": {"finished_at": 190.0, "timeline": {"submitted_at": 150.0, "spans": [
        _span("load", "start-up", 160.0, 170.0), _span("evaluate", "work", 170.0, 188.0)]}}}
    rec.metrics["rl"] = [{"step": 0, "eval_reward_mean": 0.3, "eval_reward_se": 0.04},
                         {"step": 30, "eval_reward_mean": 0.6, "eval_reward_se": 0.05, "reward_mean": 0.55}]
    text = render_report(rec, hourly_rate=1.0, plots=[])
    timeline = text.split("## Timeline", 1)[1]
    rows = [line for line in timeline.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["tokenizer", "evaluate sft", "rl", "all"]
    assert rows[0] == "| tokenizer | 30.0 | 10.0 (33%) | 18.0 (60%) | 2.0 (7%) | 40% |"
    assert rows[2] == "| rl | 100.0 | 20.0 (20%) | 70.0 (70%) | 10.0 (10%) | 30% |"
    assert "- task: toy/end-letter-aeiou/train" in text
    assert "0.300 before RL -> 0.600 after (change +0.300 ± 0.050, +6.0 standard errors)" in text
    assert "held-out reward by step: 0: 0.300 ± 0.040, 30: 0.600 ± 0.050" in text


def test_report_plots_the_held_out_reward(tmp_path):
    rec = _record()
    rec.metrics["rl"] = [{"step": 0, "eval_reward_mean": 0.3, "eval_reward_se": 0.04},
                         {"step": 30, "eval_reward_mean": 0.6, "eval_reward_se": 0.05}]
    names = [p.rsplit("/", 1)[1] for p in make_plots(rec, tmp_path)]
    assert "eval_reward_mean.png" in names and (tmp_path / "eval_reward_mean.png").stat().st_size > 1000
