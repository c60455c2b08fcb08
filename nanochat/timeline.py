"""Where a stage's wall time goes: start-up, work and writing, from the spans the stage recorded.

A stage (or an evaluation) writes into its meta.json / evaluation file a `timeline`:

    {"submitted_at": 1700000000.0,      # when the pipeline submitted its job (None: run by hand)
     "started_at": 1700000004.2,        # when the stage's output writer started
     "spans": [{"name": "start", "kind": "start-up", "start": ..., "end": ...},
               {"name": "train", "kind": "work", "start": ..., "end": ...}, ...]}

and its end is the document's `finished_at`. `split_wall_time` cuts [submitted_at (else
started_at), finished_at] into elementary intervals and gives each the kind of the span that covers
it, the span recorded last winning where spans overlap (a stage records a whole phase first, then
finer spans measured inside it, e.g. the Ray Train worker group's start-up inside "train").
Uncovered time counts as start-up before the first work span (job start, imports, ray.init), as
writing after the last one (output, meta.json), and as work in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("start-up", "work", "writing")


@dataclass(frozen=True)
class WallSplit:
    """Seconds of one stage's wall time by kind; they add up to `wall`."""

    wall: float
    startup: float
    work: float
    writing: float

    def share(self, kind: str) -> float:
        """Fraction of the wall time of "start-up", "work" or "writing"."""
        value = {"start-up": self.startup, "work": self.work, "writing": self.writing}[kind]
        return value / self.wall if self.wall > 0 else 0.0


def split_wall_time(timeline: dict[str, Any], finished_at: float) -> WallSplit | None:
    """The split of one stage's timeline (see the module docstring); None when it has no spans."""
    spans = [s for s in timeline.get("spans") or [] if s.get("kind") in KINDS and s["end"] >= s["start"]]
    if not spans:
        return None
    begin = timeline.get("submitted_at") or timeline.get("started_at") or min(s["start"] for s in spans)
    begin = min(begin, min(s["start"] for s in spans))
    end = max(finished_at, max(s["end"] for s in spans))
    work = [s for s in spans if s["kind"] == "work"]
    first_work = min((s["start"] for s in work), default=end)
    last_work = max((s["end"] for s in work), default=begin)
    points = sorted({begin, end, *(s["start"] for s in spans), *(s["end"] for s in spans)})
    totals = dict.fromkeys(KINDS, 0.0)
    for a, b in zip(points, points[1:], strict=False):
        mid = (a + b) / 2
        covering = [s for s in spans if s["start"] <= mid < s["end"]]
        if covering:
            kind = covering[-1]["kind"]
        elif mid < first_work:
            kind = "start-up"
        elif mid > last_work:
            kind = "writing"
        else:
            kind = "work"
        totals[kind] += b - a
    return WallSplit(end - begin, totals["start-up"], totals["work"], totals["writing"])


def timeline_table(rows: list[tuple[str, WallSplit]]) -> str:
    """Markdown table: one row per stage with its wall time and the three parts (seconds and %)."""
    lines = ["| stage | wall s | start-up s | work s | writing s | start-up + writing |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in rows:
        overhead = s.share("start-up") + s.share("writing")
        lines.append(f"| {name} | {s.wall:.1f} | {s.startup:.1f} ({100 * s.share('start-up'):.0f}%) | "
                     f"{s.work:.1f} ({100 * s.share('work'):.0f}%) | {s.writing:.1f} "
                     f"({100 * s.share('writing'):.0f}%) | {100 * overhead:.0f}% |")
    total = WallSplit(*(sum(getattr(s, f) for _, s in rows) for f in ("wall", "startup", "work", "writing")))
    if rows:
        lines.append(f"| all | {total.wall:.1f} | "
                     f"{total.startup:.1f} ({100 * total.share('start-up'):.0f}%) | "
                     f"{total.work:.1f} ({100 * total.share('work'):.0f}%) | {total.writing:.1f} "
                     f"({100 * total.share('writing'):.0f}%) | "
                     f"{100 * (total.share('start-up') + total.share('writing')):.0f}% |")
    return "\n".join(lines)
