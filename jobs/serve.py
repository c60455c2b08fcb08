"""Deploy the chat service (serve_app/) for a run's checkpoints on the Ray cluster, then exit.

    python -m jobs.serve --run demo --stage sft                     # chat model `nanochat-sft`
    python -m jobs.serve --run demo --stage sft --stage pretrain    # + base model `nanochat-pretrain`
    python -m jobs.serve --run demo --stage sft --set num_replicas=2 --set device=cuda --set num_gpus=1
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m jobs.serve --run demo --stage sft
    python -m jobs.serve --run demo --stage sft --print-serve-config > serve.yaml
    serve run serve.yaml                                            # the same app by Serve's own CLI

Each `--stage` serves the exported model `{run}/<stage>/model/` (tokenizer beside it, else
`{run}/tokenizer/`) as `nanochat-<stage>`; pretrain is a base checkpoint (/v1/completions only),
the others are chat models. The config is the preset's `serve:` section (if any) plus `--set
key=value` overrides, validated as `serve_app.config.ServeConfig`. API keys: comma-separated in
$NANOCHAT_API_KEYS (kept off command lines); without keys the API is open to whoever reaches it.

Serve keeps the application running after this driver exits; `serve shutdown` (or
`serve.delete(app_name)`) stops it. On the cluster (numbered as the Ray calls happen):
  1. ray.init(): join the cluster this job was submitted to (or a local one by hand);
  2. serve.start(): the HTTP proxy on config.host:port (kept if Serve already runs);
  3. serve.run(build_app(config)): replicas start; each loads a model on its first request.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.storage import RunStorage
from jobs.cli import entrypoint
from jobs.config import ConfigError, load_preset, parse_overrides, stage_argparser
from serve_app.config import ServeConfig

SERVABLE = ("pretrain", "midtrain", "sft", "rl")
API_KEYS_ENV = "NANOCHAT_API_KEYS"


def model_specs(storage: RunStorage, stages: list[str]) -> list[dict[str, Any]]:
    """One ModelSpec dict per stage; refuses stages whose output is not complete."""
    specs = []
    for stage in stages:
        if not storage.is_complete(stage):
            raise ConfigError(f"stage {stage!r} of run {storage.run!r} is not complete at {storage.stage_uri(stage)}: "
                              f"run `python -m jobs.{stage} --run {storage.run}` first")
        model_uri = f"{storage.stage_uri(stage)}/model"
        own_tokenizer = storage.exists(f"{storage.stage_path(stage)}/model/tokenizer")
        specs.append({"name": f"nanochat-{stage}", "model_uri": model_uri,
                      "tokenizer_uri": None if own_tokenizer else storage.stage_uri("tokenizer"),
                      "kind": "base" if stage == "pretrain" else "chat"})
    return specs


def build_config(preset: str, overrides: list[str], models: list[dict[str, Any]]) -> ServeConfig:
    """The preset's serve section + overrides + the run's models (+ keys from the environment)."""
    values = {**(load_preset(preset).get("serve") or {}), **parse_overrides(overrides)}
    values.setdefault("models", models)
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if keys and not values.get("api_keys"):
        values["api_keys"] = keys
    try:
        return ServeConfig.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid serve config (preset {preset!r} + overrides): {problems}") from None


def serve_config_yaml(config: ServeConfig) -> str:
    """A Serve config file for `serve run`/`serve deploy` with the same application."""
    app = {"name": config.app_name, "route_prefix": config.route_prefix, "import_path": "serve_app.app:build_app",
           "args": config.model_dump(mode="json", exclude={"api_keys"})}
    doc = {"proxy_location": "EveryNode", "http_options": {"host": config.host, "port": config.port},
           "applications": [app]}
    note = (f"# API keys are not written here: add them under args.api_keys or pass ${API_KEYS_ENV} to jobs.serve\n"
            if config.api_keys else "")
    return note + yaml.safe_dump(doc, sort_keys=False)


@entrypoint
def main(argv: list[str] | None = None) -> int:
    p = stage_argparser("serve", __doc__.splitlines()[0])
    p.add_argument("--stage", dest="stages", action="append", choices=SERVABLE,
                   help="stage whose exported model to serve (repeatable; default sft)")
    p.add_argument("--print-serve-config", action="store_true", help="print a Serve config YAML and exit")
    args = p.parse_args(argv)
    storage = RunStorage(args.run, args.storage)
    config = build_config(args.preset, args.overrides, model_specs(storage, args.stages or ["sft"]))
    if args.print_serve_config:
        print(serve_config_yaml(config), end="")
        return 0
    import ray

    from serve_app.app import deploy

    if not ray.is_initialized():
        ray.init()  # 1. the cluster this job runs on
    url = deploy(config)  # 2. + 3.
    model = config.models[0]
    route = "chat/completions" if model.kind == "chat" else "completions"
    payload = ({"model": model.name, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
               if model.kind == "chat" else {"model": model.name, "prompt": "The sky is blue because"})
    auth = " -H 'Authorization: Bearer <one of the keys>'" if config.api_keys else ""
    print(f"serving {', '.join(m.name for m in config.models)} at {url}/  (web chat: {url}/)")
    print(f"  curl {url}/v1/{route} -H 'Content-Type: application/json'{auth} -d '{json.dumps(payload)}'")
    print(f"stop it with: serve shutdown -y  (or serve.delete({config.app_name!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
