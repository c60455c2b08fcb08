"""jobs/serve.py and ServeConfig without a cluster: a run's stages become models, bad configs and
incomplete stages are refused with a reason, and the printed Serve config builds the same app.

Run: PYTHONPATH=. python -m pytest tests/test_serve_job.py -q
"""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from jobs.serve import main
from serve_app.config import ServeConfig


@pytest.fixture
def run_dir(tmp_path):
    """A storage with run r1: complete sft (tokenizer beside the model) and pretrain (run tokenizer)."""
    for stage, own_tokenizer in (("sft", True), ("pretrain", False)):
        model = tmp_path / "r1" / stage / "model"
        (model / "tokenizer" if own_tokenizer else model).mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"model_config": {}}))  # what marks an exported model
        (tmp_path / "r1" / stage / "meta.json").write_text(json.dumps({"stage": stage}))
    (tmp_path / "r1" / "tokenizer").mkdir()
    (tmp_path / "r1" / "tokenizer" / "meta.json").write_text(json.dumps({"stage": "tokenizer"}))
    return tmp_path


def printed_config(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_stages_become_models_and_the_serve_config_builds(run_dir, capsys, monkeypatch) -> None:
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve_app.app import build_app

    monkeypatch.setenv("NANOCHAT_API_KEYS", "k1, k2")
    doc = printed_config(capsys, ["--run", "r1", "--storage", str(run_dir), "--stage", "sft", "--stage", "pretrain",
                                  "--set", "num_replicas=2", "--set", "limits.max_n=4", "--print-serve-config"])
    app = doc["applications"][0]
    assert app["import_path"] == "serve_app.app:build_app"
    args = app["args"]
    models = {m["name"]: m for m in args["models"]}
    assert models["nanochat-sft"]["kind"] == "chat" and models["nanochat-sft"]["tokenizer_uri"] is None
    assert models["nanochat-pretrain"]["kind"] == "base"
    assert models["nanochat-pretrain"]["tokenizer_uri"].endswith("r1/tokenizer")
    assert args["num_replicas"] == 2 and args["limits"]["max_n"] == 4
    assert "api_keys" not in args  # keys never land in a file
    built = call_user_app_builder_with_args_if_necessary(build_app, args)  # what `serve run` does
    assert isinstance(built, Application)


def test_incomplete_stage_and_bad_overrides_are_refused(run_dir, capsys) -> None:
    assert main(["--run", "r1", "--storage", str(run_dir), "--stage", "rl"]) == 2
    assert "run `python -m jobs.rl" in capsys.readouterr().err
    assert main(["--run", "r1", "--storage", str(run_dir), "--set", "max_batch_size=zero"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert main(["--run", "r1", "--storage", str(run_dir), "--set", "typo_field=1"]) == 2
    assert "typo_field" in capsys.readouterr().err


@pytest.mark.parametrize("values, problem", [
    ({"device": "cuda"}, "num_gpus"),
    ({"dtype": "bfloat16"}, "bfloat16"),
    ({"models": [{"name": "a", "model_uri": "/x"}, {"name": "a", "model_uri": "/y"}]}, "unique"),
    ({"models": [{"name": "bad name!", "model_uri": "/x"}]}, "bad name"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
])
def test_serve_config_rejects(values: dict, problem: str) -> None:
    base = {"models": [{"name": "m", "model_uri": "/x"}]}
    with pytest.raises(ValidationError, match=problem):
        ServeConfig.model_validate({**base, **values})
