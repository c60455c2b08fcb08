"""The whole pipeline on the micro preset, every stage a real Ray job on the session's cluster.

One uninterrupted run is the reference: the newcomer's `make demo PRESET=micro RUN=e2e` from an empty
home (tests/newcomer.py, run once per session); every stage's output and the report's summary
table are checked. A second run of the same preset is killed (SIGTERM, as Ctrl-C or a CI
cancel would) while its SFT job is between checkpoints, rerun with the same command, and must
match the reference stage by stage: config, final step and metrics. To keep the test to minutes
on 2 cores, that run starts from a copy of the reference's tokenizer and pretraining outputs
(complete stages, which the pipeline skips as it would after any resume).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.storage import RunStorage
from jobs import pipeline, registry
from tests.helpers import wait_for
from tests.newcomer import RUN, describe

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINED = ("pretrain", "midtrain", "sft", "rl")


@pytest.fixture(scope="module")
def reference(newcomer_demo) -> RunStorage:
    """The run that `make demo PRESET=micro` made from an empty home (tests/newcomer.py)."""
    if newcomer_demo.make_rc != 0:
        pytest.fail(f"the reference run (make demo, newcomer) failed:\n{describe(newcomer_demo)}")
    return RunStorage(RUN, str(newcomer_demo.storage))


def _summary(report: str) -> dict[str, list[str]]:
    """The report's summary table as {metric: [BASE, MID, SFT, RL]}."""
    rows = {}
    for line in report.split("## Summary", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("metric", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_every_stage_runs_as_a_job_and_the_report_fills_every_column(reference):
    for stage in registry.STAGES:
        assert stage.is_complete(reference), f"{stage.name} is not complete"
    preset = pipeline.load_preset("micro")
    for stage in ("pretrain", "midtrain", "sft"):
        meta = reference.read_meta(stage)
        assert meta["metrics"]["final_step"] == preset[stage]["num_iterations"]
        assert (Path(reference.stage_path(stage)) / "model" / "config.json").is_file()
    assert reference.read_meta("midtrain")["init_from"].endswith(f"{RUN}/pretrain/model")
    assert reference.read_meta("sft")["init_from"].endswith(f"{RUN}/midtrain/model")
    assert reference.read_meta("rl")["metrics"]["final_step"] == preset["rl"]["num_steps"]
    evaluations = {s: json.loads(Path(reference.stage_path("evaluate"), f"{s}.json").read_text()) for s in TRAINED}
    assert evaluations["pretrain"]["core"]["metric"] is not None
    for stage in ("midtrain", "sft", "rl"):
        tasks = evaluations[stage]["chat"]["tasks"]
        assert set(tasks) == {"arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"}
        assert all(0.0 <= t["accuracy"] <= 1.0 for t in tasks.values())
    report = (Path(reference.stage_path("report")) / "report.md").read_text()
    table = _summary(report)
    assert table["ARC-Easy"][0] == "-" and all(c != "-" for c in table["ARC-Easy"][1:])
    assert table["ChatCORE"][1:] == [f"{evaluations[s]['chat']['chatcore']:.4f}" for s in ("midtrain", "sft", "rl")]
    core_label = evaluations["pretrain"]["core"]["label"]
    assert table[core_label][0] == f"{evaluations['pretrain']['core']['metric']:.4f}"
    for section in ("## tokenizer", "## pretrain", "## midtrain", "## sft", "## rl"):
        assert section in report
    assert (Path(reference.stage_path("report")) / "loss.png").stat().st_size > 0


def test_the_runs_export_loads_in_transformers_offline(reference):
    """The pipeline's export stage (jobs/export.py): the final model as a transformers NanoChat directory."""
    out = Path(reference.stage_path("export"))
    assert reference.read_meta("export")["stage"] == "rl"
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True); "
            "AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True); print(type(m).__name__)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "NanoChatForCausalLM" in res.stdout, res.stderr[-2000:]
    report = (Path(reference.stage_path("report")) / "report.md").read_text()
    assert "## Inference" in report and "TTFT" in (out / "README.md").read_text()


def _close(a, b, rel: float = 1e-3, abs_: float = 1e-4) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=abs_)
    return a == b


def test_a_pipeline_killed_during_sft_resumes_and_matches_the_uninterrupted_run(reference, ray_cluster, embedded_pack,
                                                                                tmp_path,
                                                                                capsys):
    storage = RunStorage(RUN, str(tmp_path))
    src, dest = Path(reference.uri) / RUN, tmp_path / RUN
    for stage in ("tokenizer", "pretrain"):
        shutil.copytree(src / stage, dest / stage)
    (dest / "evaluate").mkdir()
    shutil.copy(src / "evaluate" / "pretrain.json", dest / "evaluate" / "pretrain.json")

    cmd = [sys.executable, "-m", "jobs.pipeline", "--preset", "micro", "--run", RUN, "--storage", str(tmp_path),
           "--address", ray_cluster.dashboard_url]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_checkpoint = dest / "sft" / "checkpoint_0000010" / "state.json"
        wait_for(first_checkpoint.exists, 600, "the SFT stage's first checkpoint", proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "[sft] interrupted: stopped job" in out
    assert not storage.is_complete("sft"), "the kill came too late: SFT had already finished"
    assert storage.is_complete("midtrain") and not storage.exists(storage.stage_path("rl"))

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    sft_jobs = [j for j in client.list_jobs() if (j.submission_id or "").startswith(f"{RUN}-sft-")
                and str(tmp_path) in j.entrypoint]
    assert len(sft_jobs) == 1
    wait_for(lambda: client.get_job_status(sft_jobs[0].submission_id).is_terminal(), 120, "the SFT job to stop")
    assert client.get_job_status(sft_jobs[0].submission_id) == JobStatus.STOPPED

    # the job may save another checkpoint while it is being stopped: the rerun resumes from the last one
    saved = sorted(int(p.parent.name.rsplit("_", 1)[1]) for p in (dest / "sft").glob("checkpoint_*/state.json"))
    assert saved and saved[-1] < pipeline.load_preset("micro")["sft"]["num_iterations"], saved

    capsys.readouterr()
    pipeline.run_pipeline("micro", RUN, storage_uri=str(tmp_path), submit=True, address=ray_cluster.dashboard_url)
    rerun = capsys.readouterr().out
    assert "midtrain: complete, skipped" in rerun
    resumed = f"resuming from step {saved[-1]} "
    assert resumed in rerun, ("SFT must resume from its last checkpoint, not start over: "
                              f"{[ln for ln in rerun.splitlines() if 'resuming' in ln or 'starting' in ln]}")

    for stage in ("midtrain", "sft", "rl"):
        ours, theirs = storage.read_meta(stage), reference.read_meta(stage)
        assert ours["config"] == theirs["config"], stage
        for key, value in theirs["metrics"].items():
            if key.endswith(("_s", "_per_s", "tokens_per_sec")):  # timings differ run to run
                continue
            assert _close(ours["metrics"].get(key), value), f"{stage} {key}: {ours['metrics'].get(key)} vs {value}"
    for stage in ("midtrain", "sft", "rl"):
        ours = json.loads((dest / "evaluate" / f"{stage}.json").read_text())["chat"]
        theirs = json.loads((src / "evaluate" / f"{stage}.json").read_text())["chat"]
        assert {t: v["accuracy"] for t, v in ours["tasks"].items()} == \
               {t: v["accuracy"] for t, v in theirs["tasks"].items()}, stage
    assert storage.is_complete("report")
