"""The report card of a run: Markdown from every stage's meta.json, evaluations and metrics.jsonl.

Pure rendering: `jobs/report.py` reads the run and calls `render_report`; plots are PNGs made
with matplotlib (Agg backend, no display). A stage that did not run shows as "-", never an error.

Summary table (as the seed's): columns BASE / MID / SFT / RL, rows CORE, ARC-Easy,
ARC-Challenge, MMLU, GSM8K, HumanEval, ChatCORE, and the chat format rate. CORE comes from the base evaluation
(`evaluate/pretrain.json`: `core.label`, `core.metric`); the chat rows from each chat stage's
evaluation (`evaluate/<stage>.json`: `chat.tasks.<task>.accuracy`, `chat.chatcore`, `chat.format_rate`).
Inference section (`inference_section`): TTFT, time per output token and tokens/s of the final model
at batch 1/8/32 and peak memory, measured by jobs/report.py through nanochat/inference_metrics.py.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGE_ORDER = ("tokenizer", "pretrain", "midtrain", "sft", "rl")
COLUMNS = (("BASE", "pretrain"), ("MID", "midtrain"), ("SFT", "sft"), ("RL", "rl"))
CHAT_ROWS = (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge"), ("MMLU", "mmlu"),
             ("GSM8K", "gsm8k"), ("HumanEval", "humaneval"))


@dataclass
class RunRecord:
    """What the report needs of a run, already read from storage."""

    run: str
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> meta.json
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> evaluate/<stage>.json
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # stage -> metrics.jsonl rows


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def summary_table(rec: RunRecord) -> tuple[str, str]:
    """The BASE/MID/SFT/RL table and the CORE label used in it."""
    base = rec.evaluations.get("pretrain", {})
    core_label = base.get("core", {}).get("label", "CORE")
    header = "| metric | " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    core_row = [_fmt(base.get("core", {}).get("metric")) if stage == "pretrain" else "-"
                for _, stage in COLUMNS]
    lines.append(f"| {core_label} | " + " | ".join(core_row) + " |")
    for label, task in CHAT_ROWS:
        cells = [_fmt(rec.evaluations.get(stage, {}).get("chat", {}).get("tasks", {}).get(task, {})
                      .get("accuracy"))
                 for _, stage in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    chatcore = [_fmt(rec.evaluations.get(stage, {}).get("chat", {}).get("chatcore")) for _, stage in COLUMNS]
    lines.append("| ChatCORE | " + " | ".join(chatcore) + " |")
    # every stage, the base model included: the share of fixed multiple-choice items answered in
    # free generation with exactly one valid letter then <|assistant_end|> (did it learn the format?)
    fmt = [_fmt(rec.evaluations.get(stage, {}).get("chat", {}).get("format_rate")) for _, stage in COLUMNS]
    lines.append("| chat format rate | " + " | ".join(fmt) + " |")
    return "\n".join(lines), core_label


def gpu_hours(rec: RunRecord) -> float:
    """GPU-hours of all stages: each stage's duration × the GPUs it reserved (meta `resources.gpus`)."""
    total = 0.0
    for meta in rec.metas.values():
        gpus = (meta.get("resources") or {}).get("gpus", 0) or 0
        total += gpus * meta.get("duration_s", 0.0) / 3600
    return total


# key of the evaluation stage's bpb in evaluate/<stage>.json (nanochat/evals/harness.py's val_bpb)
EVAL_BPB = "eval_bpb"
# Training's own validation bpb (metrics.jsonl and meta.json: `val_bpb`) packs BOS-led documents into
# rows; the evaluation's takes the validation documents as one stream. Both are shown, named apart.
METRIC_LABELS = {"val_bpb": "val_bpb (training validation: packed rows)"}


def evaluation_bpb(doc: dict[str, Any]) -> float | None:
    """The evaluation bpb of an evaluate/<stage>.json; runs written before the rename stored it as val_bpb."""
    value = doc.get(EVAL_BPB)
    return value if value is not None else doc.get("val_bpb")


def _stage_section(stage: str, meta: dict[str, Any] | None, evaluation: dict[str, Any] | None) -> str:
    if meta is None:
        return f"## {stage}\n\n-\n"
    lines = [f"## {stage}", "", f"- time: {meta.get('duration_s', 0):.1f} s"]
    if meta.get("tasks"):  # what a chat stage trained on: conversations per task
        lines.append("- trained on: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["tasks"].items())))
    timings = meta.get("timings") or {}
    if timings:
        lines.append("- phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    for k, v in (meta.get("metrics") or {}).items():
        if not isinstance(v, dict | list):
            lines.append(f"- {METRIC_LABELS.get(k, k)}: {_fmt(v)}")
    config = meta.get("config") or {}
    if config:
        lines.append("- config: " + ", ".join(f"{k}={v}" for k, v in config.items()
                                              if not isinstance(v, dict)))
    if evaluation:
        if evaluation_bpb(evaluation) is not None:
            lines.append(f"- evaluation bpb (the validation documents as one stream): "
                         f"{_fmt(evaluation_bpb(evaluation))}")
        core = evaluation.get("core")
        if core:
            lines.append(f"- {core.get('label', 'CORE')}: {_fmt(core.get('metric'))}")
        for s in (evaluation.get("samples") or [])[:5]:
            lines.append(f"- sample: `{s.get('prompt', '')}` → `{s.get('completion', '').strip()[:120]}`")
    return "\n".join(lines) + "\n"


def inference_section(inference: dict[str, Any] | None) -> str:
    """"## Inference": TTFT, time per output token and tokens/s per batch size, peak memory, as
    measured by nanochat/inference_metrics.py on the final model ("" when not measured)."""
    if not inference:
        return ""
    lines = [
        "## Inference", "",
        f"Model: {inference.get('stage', '?')} ({inference.get('device')}, {inference.get('dtype')}), "
        f"our engine, greedy, prompts of {inference.get('prompt_tokens')} tokens, "
        f"{inference.get('new_tokens')} new tokens per row, all rows submitted at once.", "",
        "| batch | TTFT (ms) | time per output token (ms) | tokens/s |", "|---|---|---|---|",
    ]
    for b, m in inference.get("batches", {}).items():
        lines.append(f"| {b} | {m['ttft_ms']:.1f} | {m['tpot_ms']:.2f} | {m['tokens_per_s']:.1f} |")
    lines += ["", f"- peak memory: {inference.get('peak_memory_mib')} MiB ({inference.get('memory_kind')})",
              f"- cost: {inference.get('seconds')} s of the report stage (model load included: "
              f"{inference.get('total_seconds', inference.get('seconds'))} s)", ""]
    return "\n".join(lines)


def render_report(rec: RunRecord, *, hourly_rate: float, plots: list[str], now: float | None = None,
                  hardware: str | None = None, versions: dict[str, str] | None = None,
                  git_commit: str = "unknown", inference: dict[str, Any] | None = None) -> str:
    """The whole report.md text."""
    now = now or time.time()
    table, _ = summary_table(rec)
    hours = gpu_hours(rec)
    # (start, end) of every stage and evaluation: their own time, and the span from the first start
    # to the last end, which also holds what runs between them (job start-up, actor pools, Ray Train)
    spans = [(m["finished_at"] - m.get("duration_s", 0.0), m["finished_at"]) for m in rec.metas.values()
             if m.get("finished_at")]
    spans += [(e["finished_at"] - e.get("timings", {}).get("total_s", 0.0), e["finished_at"])
              for e in rec.evaluations.values() if e.get("finished_at")]
    own = sum(end - start for start, end in spans)
    span = max(end for _, end in spans) - min(start for start, _ in spans) if spans else 0.0
    versions = versions or {}
    head = [
        f"# nanochat on Ray — report card for run `{rec.run}`", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(now))}",
        f"- git commit: {git_commit}",
        f"- hardware: {hardware or platform.platform()}",
        "- software: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- GPU-hours: {hours:.2f}; cost estimate: {hours:.2f} h × ${hourly_rate:.2f}/GPU-h "
        f"= ${hours * hourly_rate:.2f}",
        f"- total wall-clock: {span / 60:.1f} min from the first stage's start to the last one's end "
        f"(the stages' and evaluations' own time: {own / 60:.1f} min)", "",
        "## Summary", "", table, "",
    ]
    if inference:
        head.append(inference_section(inference))
    sections = [_stage_section(s, rec.metas.get(s), rec.evaluations.get(s)) for s in STAGE_ORDER]
    tok = rec.metas.get("tokenizer", {}).get("evaluation", {}).get("bytes_per_token")
    if tok:
        from nanochat.evals.compression import format_report

        sections[0] += "\nBytes per token:\n\n" + format_report(tok) + "\n"
    figs = ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] if plots else []
    return "\n".join(head + rl_summary(rec) + sections + timeline_section(rec) + figs) + "\n"


# ----------------------------------------------------------------------------- RL task and timeline


def rl_summary(rec: RunRecord) -> list[str]:
    """Which task RL trained on, and how its mean reward on fixed held-out prompts moved."""
    meta = rec.metas.get("rl")
    if not meta:
        return []
    task = meta.get("task") or {}
    m = meta.get("metrics") or {}
    lines = ["## RL", "", f"- task: {task.get('train', (meta.get('config') or {}).get('task', '?'))}; "
             f"held-out: {task.get('eval', '-')}; {m.get('final_step', '?')} steps"]
    if "eval_reward_change" in m:
        change, se = m["eval_reward_change"], m.get("eval_reward_change_se") or 0.0
        ratio = f"{change / se:+.1f} standard errors" if se > 0 else "no spread"
        lines.append(f"- mean reward on {m.get('eval_prompts', '?')} fixed held-out prompts: "
                     f"{m['eval_reward_first']:.3f} before RL -> {m['eval_reward_last']:.3f} after "
                     f"(change {change:+.3f} ± {se:.3f}, {ratio})")
    curve = [(r["step"], r["eval_reward_mean"], r.get("eval_reward_se", 0.0))
             for r in rec.metrics.get("rl", []) if r.get("eval_reward_mean") is not None]
    if curve:
        lines.append("- held-out reward by step: "
                     + ", ".join(f"{s}: {v:.3f} ± {e:.3f}" for s, v, e in curve))
    return lines + [""]


def timeline_section(rec: RunRecord) -> list[str]:
    """Per stage and evaluation: wall time from submission to output, split into start-up, work
    and writing (nanochat/timeline.py), in the order they ran."""
    from nanochat.timeline import split_wall_time, timeline_table

    docs = [(stage, m) for stage, m in rec.metas.items() if stage != "report"]
    docs += [(f"evaluate {stage}", e) for stage, e in rec.evaluations.items()]
    rows = []
    for name, doc in docs:
        timeline = doc.get("timeline")
        split = split_wall_time(timeline, doc["finished_at"]) if timeline and doc.get("finished_at") else None
        if split is not None:
            rows.append((timeline.get("submitted_at") or timeline.get("started_at") or 0.0, name, split))
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    return ["## Timeline", "",
            "Wall time of each stage from its job's submission to its output, split into start-up "
            "(job start, imports, Ray workers and actors, model loading, compiling), work, and writing "
            "(checkpoints at the end, export, meta.json, shutdown).", "",
            timeline_table([(name, split) for _, name, split in rows]), ""]


def make_plots(rec: RunRecord, out_dir: Path) -> list[str]:
    """PNG plots from metrics.jsonl: training loss, validation bpb, RL reward, tokens/s. Returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = (("loss", "training loss"), ("val_bpb", "validation bits per byte"),
              ("reward_mean", "RL mean reward"),
              ("eval_reward_mean", "RL mean reward on held-out prompts (± 1 s.e.)"),
              ("tokens_per_sec", "tokens per second"))
    written = []
    for key, title in wanted:
        series = {stage: [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
                  for stage, rows in rec.metrics.items()}
        series = {s: pts for s, pts in series.items() if pts}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for stage, pts in series.items():
            if key == "eval_reward_mean":
                se = [r.get("eval_reward_se", 0.0) for r in rec.metrics[stage] if r.get(key) is not None]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=se, marker="o", capsize=3,
                            label=stage)
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=stage)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written
