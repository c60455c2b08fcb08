"""Report card: summary table from stage outputs, '-' for missing stages, plots, the job end to end."""

from __future__ import annotations

import json

from cluster.storage import RunStorage
from jobs import report as report_job
from nanochat.report import RunRecord, gpu_hours, render_report, summary_table


def _record() -> RunRecord:
    return RunRecord(
        run="r1",
        metas={"pretrain": {"duration_s": 7200.0, "resources": {"gpus": 8}, "metrics": {"val_bpb": 0.81}},
               "sft": {"duration_s": 3600.0, "resources": {"gpus": 8}}},
        evaluations={"pretrain": {"val_bpb": 0.81, "core": {"label": "CORE-14 (our config)", "metric": 0.2219}},
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
    assert (out / "loss.png").stat().st_size > 1000 and "![loss](loss.png)" in text
    assert storage.is_complete("report")
