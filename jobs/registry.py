"""The stages of a run, in pipeline order: name, inputs, output, and how to run each.

A stage is run as `python -m jobs.<stage> --preset P --run R --storage S [args]`, by the
pipeline (as a Ray job it waits on) or by hand. Its output is `{run}/<output>/`, complete when
its meta.json exists (see cluster/storage.py). Stages never import each other; this table is the
only place that knows their order. Each later stage adds its entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.storage import RunStorage
from jobs.config import ConfigError


@dataclass(frozen=True)
class Stage:
    """One entry of the pipeline."""

    name: str  # unique key, also used in `--stages` and job ids
    module: str  # `python -m <module>` runs it, e.g. "jobs.tokenizer"
    inputs: tuple[str, ...] = ()  # stage names whose outputs it reads
    output: str = ""  # directory under the run; defaults to `name`
    args: tuple[str, ...] = ()  # extra command-line arguments
    description: str = ""
    complete: Callable[[RunStorage], bool] | None = field(default=None, compare=False)

    @property
    def section(self) -> str:
        """The preset section its config comes from (the module's last name)."""
        return self.module.rsplit(".", 1)[-1]

    @property
    def out_dir(self) -> str:
        return self.output or self.name

    def is_complete(self, storage: RunStorage) -> bool:
        if self.complete is not None:
            return self.complete(storage)
        return storage.is_complete(self.out_dir)

    def command(self, preset: str, run: str, storage_uri: str,
                overrides: list[str] | None = None) -> list[str]:
        cmd = ["python", "-m", self.module, *self.args, "--preset", preset, "--run", run,
               "--storage", storage_uri]
        for o in overrides or []:
            cmd += ["--set", o]
        return cmd


STAGES: list[Stage] = []


def register(stage: Stage) -> Stage:
    """Add a stage at the end of the pipeline order; names must be unique."""
    if any(s.name == stage.name for s in STAGES):
        raise ValueError(f"stage {stage.name!r} is registered twice")
    unknown = [i for i in stage.inputs if i not in {s.name for s in STAGES}]
    if unknown:
        raise ValueError(f"stage {stage.name!r} reads {unknown}, which are not registered before it")
    STAGES.append(stage)
    return stage


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage {name!r}; known stages: "
                      f"{', '.join(s.name for s in STAGES) or '(none)'}")


def select(names: list[str] | None) -> list[Stage]:
    """The stages to run, in pipeline order; unknown names are an error naming them."""
    if not names:
        return list(STAGES)
    for n in names:
        get_stage(n)
    return [s for s in STAGES if s.name in names]


def _evaluated(stage: str) -> Callable[[RunStorage], bool]:
    """Evaluations write `{run}/evaluate/<stage>.json` last; that file is their completion marker."""
    return lambda storage: storage.exists(f"{storage.stage_path('evaluate')}/{stage}.json")


# Pipeline order (the seed's speedrun). Config sections are named after the module: every
# evaluate_* stage reads the preset's `evaluate:` section.
register(Stage("tokenizer", "jobs.tokenizer", description="count chunks on the cluster, train BPE merges"))
register(Stage("pretrain", "jobs.pretrain", inputs=("tokenizer",),
               description="Ray Train + Ray Data pretraining with checkpoints and resume"))
register(Stage("evaluate_pretrain", "jobs.evaluate", inputs=("pretrain",), args=("--stage", "pretrain"),
               output="evaluate", description="validation bpb, samples and CORE of the base model",
               complete=_evaluated("pretrain")))
register(Stage("midtrain", "jobs.midtrain", inputs=("pretrain",),
               description="conversations, multiple choice and tool use, packed rows, from the base model"))
register(Stage("evaluate_midtrain", "jobs.evaluate", inputs=("midtrain",), args=("--stage", "midtrain"),
               output="evaluate",
               description="chat tasks (ARC, MMLU, GSM8K, HumanEval), ChatCORE, format rate",
               complete=_evaluated("midtrain")))
register(Stage("sft", "jobs.sft", inputs=("midtrain",),
               description="one conversation per row, loss on the assistant's tokens only"))
register(Stage("evaluate_sft", "jobs.evaluate", inputs=("sft",), args=("--stage", "sft"), output="evaluate",
               description="chat tasks and ChatCORE of the SFT model", complete=_evaluated("sft")))
register(Stage("rl", "jobs.rl", inputs=("sft",),
               description="GRPO on GSM8K with rollout actors and the sandboxed python tool"))
register(Stage("evaluate_rl", "jobs.evaluate", inputs=("rl",), args=("--stage", "rl"), output="evaluate",
               description="chat tasks and ChatCORE of the RL model", complete=_evaluated("rl")))


def _report_current(storage: RunStorage) -> bool:
    """The report is complete only if it was written after every other stage finished."""
    if not storage.is_complete("report"):
        return False
    written = storage.read_meta("report").get("finished_at", 0)
    others = [storage.read_meta(s.out_dir).get("finished_at", 0) for s in STAGES
              if s.name != "report" and s.complete is None and storage.is_complete(s.out_dir)]
    return all(written >= t for t in others)


register(Stage("report", "jobs.report", description="report card of the run (report.md + plots)",
               complete=_report_current))


def _export_current(storage: RunStorage) -> bool:
    """The export is complete when it was written after the report (whose numbers its model card holds)."""
    if not storage.is_complete("export"):
        return False
    report = storage.read_meta("report").get("finished_at", 0) if storage.is_complete("report") else 0
    return storage.read_meta("export").get("finished_at", 0) >= report


# Cheap (seconds: one model load and a file copy, no Ray work), so it runs in every pipeline.
register(Stage("export", "jobs.export", inputs=("report",),
               description="the final model as a transformers NanoChat directory (safetensors, "
                           "tokenizer.json, chat template, model card)", complete=_export_current))
