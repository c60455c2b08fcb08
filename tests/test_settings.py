"""The settings ratchet: a stage knob, its default and its description live in its pydantic config
only; the cluster's specs (cluster/specs.py) declare no defaults, and each spec field is a config
field or a declared DERIVED one. The conversions (`to_spec()`) carry every value across unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from cluster import specs
from cluster.chat_train import CHAT_DERIVED, chat_train_spec
from jobs.config import StageConfig, TrainingConfig, load_stage_config
from jobs.midtrain import MidtrainConfig
from jobs.pretrain import PretrainConfig
from jobs.rl import RLConfig
from jobs.sft import SftConfig
from nanochat.schedule import LearningRates

REPO = Path(__file__).resolve().parent.parent
PAIRS = [(PretrainConfig, specs.PretrainSpec, "pretrain"), (MidtrainConfig, specs.ChatStageSpec, "midtrain"),
         (SftConfig, specs.ChatStageSpec, "sft"), (RLConfig, specs.RLSpec, "rl")]


def leaves(cls: type) -> dict[str, dataclasses.Field]:
    """The plain fields of a spec, nested specs (and the core's LearningRates) flattened."""
    out: dict[str, dataclasses.Field] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        inner = {"lrs": LearningRates, "schedule": specs.Schedule, "group": specs.WorkerGroup,
                 "train": specs.TrainSpec, "reading": specs.ShardReading}.get(name)
        if inner is not None:
            out.update(leaves(inner))
        else:
            out[name] = f
    return out


def leaf_values(spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        out.update(leaf_values(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


def spec_classes() -> list[type]:
    return [c for c in vars(specs).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
            and c.__module__ == specs.__name__]


def test_no_spec_field_has_a_default():
    for cls in spec_classes():
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not with_default, f"{cls.__name__} declares defaults for {with_default}: they belong in the config"


@pytest.mark.parametrize(("config", "spec", "stage"), PAIRS, ids=[p[2] for p in PAIRS])
def test_every_spec_field_is_a_config_field_or_declared_derived(config, spec, stage):
    derived = getattr(spec, "DERIVED", {})
    names = set(leaves(spec))
    unknown = names - set(config.model_fields) - set(derived)
    assert not unknown, f"{spec.__name__} fields {sorted(unknown)} are neither {config.__name__} fields nor DERIVED"
    assert set(derived) <= names, f"{spec.__name__}.DERIVED names fields it does not have"
    assert not set(derived) & set(config.model_fields), "a DERIVED field must not also be configurable"


def test_a_chat_stage_train_spec_is_its_config_plus_the_declared_derived_fields():
    names = set(leaves(specs.TrainSpec))
    assert names - set(TrainingConfig.model_fields) - {"init_lr_frac"} == set(CHAT_DERIVED) - {"num_iterations"}
    assert set(CHAT_DERIVED) <= names


def test_every_config_field_is_described():
    def configs(cls: type) -> list[type]:
        return [cls] + [c for sub in cls.__subclasses__() for c in configs(sub)]

    for cls in configs(StageConfig):
        missing = [n for n, f in cls.model_fields.items() if not f.description]
        assert not missing, f"{cls.__name__} fields without a description: {missing}"


@pytest.mark.parametrize("preset", ["micro", "tiny", "d20"])
@pytest.mark.parametrize(("config", "spec", "stage"), PAIRS, ids=[p[2] for p in PAIRS])
def test_to_spec_carries_every_value_unchanged(config, spec, stage, preset, monkeypatch):
    monkeypatch.setattr("jobs.rl.hub_reachable", lambda: False)  # no network probe in a unit test
    cfg = load_stage_config(config, stage, preset)
    made = cfg.to_spec(preset) if config is PretrainConfig else cfg.to_spec(0) if config is RLConfig \
        else cfg.to_spec()
    assert isinstance(made, spec)
    values = leaf_values(made)
    for name, value in values.items():
        if name not in config.model_fields:
            continue
        want = getattr(cfg, name)
        if name in ("rollout_gpus", "learner_gpus") and want is None:
            want = 0.0  # "auto" on a cluster without GPUs
        if name == "num_steps" and want <= 0:
            continue  # resolved from the task's size
        if name == "offline" and want is None:
            want = value  # resolved from the hub's reachability
        if name == "data" and want is None:
            continue  # the preset's data location
        if isinstance(want, list):
            want = tuple(want)
        assert value == want, f"{stage} ({preset}): {name} is {value!r} in the spec, {want!r} in the config"


def test_a_changed_config_value_reaches_the_spec():
    """A typo in a conversion (two fields swapped, one forgotten) shows here: each override moves its own leaf."""
    for config, _, stage in PAIRS:
        base = leaf_values(_spec(config, stage, []))
        for name, field in config.model_fields.items():
            if name not in base or field.annotation not in (int, float, "int", "float"):
                continue
            value = base[name]
            changed = value * 2 + 3 if isinstance(value, int) and not isinstance(value, bool) else value * 1.5 + 0.125
            try:
                after = leaf_values(_spec(config, stage, [f"{name}={changed}"]))
            except Exception:  # the new value breaks a validator (e.g. a batch that no longer divides)
                continue
            moved = {k for k in base if after[k] != base[k]}
            assert name in moved, f"{stage}: overriding {name} did not change the spec's {name}"
            assert moved <= {name, "num_steps"}, f"{stage}: overriding {name} also changed {moved - {name}}"


def _spec(config: type, stage: str, overrides: list[str]) -> Any:
    cfg = load_stage_config(config, stage, "micro", overrides)
    return cfg.to_spec("micro") if config is PretrainConfig else cfg.to_spec(0) if config is RLConfig \
        else cfg.to_spec()


def test_chat_train_spec_uses_every_chat_setting():
    chat = load_stage_config(SftConfig, "sft", "micro", ["init_lr_frac=0.5", "mixture_seed=7"]).to_spec()
    model = {"n_layer": 2, "n_embd": 128, "n_head": 2, "sequence_len": 64}
    train = chat_train_spec(chat, model, 9)
    assert train.lrs == LearningRates().scaled(0.5) and train.seed == 7 and train.num_iterations == 9
    assert train.schedule == chat.schedule and train.group == chat.group
    assert train.total_batch_tokens == chat.rows_per_step * 64


def test_no_field_name_introspection_converts_settings():
    pattern = re.compile(r"model_dump\(include=|for f in fields\((TrainSpec|RLSpec|ChatStage)")
    hits = [f"{p.relative_to(REPO)}:{i}" for d in ("cluster", "jobs", "tests", "benchmarks", "serve_app")
            for p in (REPO / d).rglob("*.py") if p.name != "test_settings.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"settings converted by field-name introspection at {hits}: use the config's to_spec()"
