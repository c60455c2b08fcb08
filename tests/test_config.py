"""Stage configs: presets, overrides, and the errors for bad ones."""

from __future__ import annotations

import pytest
from pydantic import Field

from jobs.config import ConfigError, StageConfig, load_stage_config, parse_overrides


class DemoConfig(StageConfig):
    vocab_size: int = Field(512, description="vocabulary size", ge=265)
    name: str = Field("x", description="a name")


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["a=1", "b.c=x", "d=true", "e=0.5"]) == {"a": 1, "b": {"c": "x"}, "d": True, "e": 0.5}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_load_with_override_and_unknown_key():
    cfg = load_stage_config(DemoConfig, "demo", "micro", ["vocab_size=1024"])
    assert cfg.vocab_size == 1024 and cfg.name == "x"
    with pytest.raises(ConfigError, match="typo_key"):
        load_stage_config(DemoConfig, "demo", "micro", ["typo_key=1"])
    with pytest.raises(ConfigError, match="vocab_size"):
        load_stage_config(DemoConfig, "demo", "micro", ["vocab_size=12"])
    with pytest.raises(ConfigError, match="unknown preset 'zzz'.*micro"):
        load_stage_config(DemoConfig, "demo", "zzz")
