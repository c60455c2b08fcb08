"""Deploy the chat service (serve_app/) for a run's checkpoints on the Ray cluster, then exit.

    python -m jobs.serve --run demo --stage sft                     # chat model `nanochat-sft`
    python -m jobs.serve --run demo --stage sft --stage pretrain    # + base model `nanochat-pretrain`
    python -m jobs.serve --run demo --stage sft --set num_replicas=2 --set device=cuda --set num_gpus=1
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m jobs.serve --run demo --stage sft
    python -m jobs.serve --run demo --stage sft --set port=8001 --address 127.0.0.1:6400  # another cluster
    python -m jobs.serve --run demo --stage sft --print-serve-config > serve.yaml
    serve run serve.yaml                                            # the same app by Serve's own CLI

Each `--stage` serves the exported model `{run}/<stage>/model/` (tokenizer beside it, else
`{run}/tokenizer/`) as `nanochat-<stage>`; pretrain is a base checkpoint (/v1/completions only),
the others are chat models. The config is the preset's `serve:` section (if any) plus `--set
key=value` overrides, validated as `serve_app.config.ServeConfig`. API keys: comma-separated in
$NANOCHAT_API_KEYS (kept off command lines); without keys the API is open to whoever reaches it.

The Ray cluster: `--address`, else $RAY_ADDRESS (set inside a Ray job), else the local cluster
started from this $NANOCHAT_HOME (`python -m cluster.local start`). The HTTP port is the config's
`port` (8000; `--set port=N`); a port held by another program or another cluster's Serve is refused.

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

from cluster.artifacts import find_model
from cluster.storage import RunStorage
from jobs.config import ConfigError, load_preset, parse_overrides, stage_argparser
from nanochat.errors import entrypoint
from serve_app.config import ServeConfig

SERVABLE = ("pretrain", "midtrain", "sft", "rl")
API_KEYS_ENV = "NANOCHAT_API_KEYS"


def model_specs(storage: RunStorage, stages: list[str]) -> list[dict[str, Any]]:
    """One ModelSpec dict per stage; refuses stages whose output is not complete."""
    specs = []
    for stage in stages:
        if not storage.is_complete(stage):
            raise ConfigError(f"stage {stage!r} of run {storage.run!r} is not complete at "
                              f"{storage.stage_uri(stage)}: "
                              f"run `python -m jobs.{stage} --run {storage.run}` first")
        ref = find_model(storage, stage)
        specs.append({"name": f"nanochat-{stage}", "model_uri": ref.model,
                      "tokenizer_uri": None if ref.tokenizer_beside else ref.tokenizer,
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
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"invalid serve config (preset {preset!r} + overrides): {problems}") from None


def serve_config_yaml(config: ServeConfig) -> str:
    """A Serve config file for `serve run`/`serve deploy` with the same application."""
    app = {"name": config.app_name, "route_prefix": config.route_prefix,
           "import_path": "serve_app.app:build_app",
           "args": config.model_dump(mode="json", exclude={"api_keys"})}
    doc = {"proxy_location": "EveryNode", "http_options": {"host": config.host, "port": config.port},
           "applications": [app]}
    note = (f"# API keys are not written here: add them under args.api_keys or pass ${API_KEYS_ENV} "
            "to jobs.serve\n"
            if config.api_keys else "")
    return note + yaml.safe_dump(doc, sort_keys=False)


@entrypoint
def ray_address(given: str | None) -> str | None:
    """Where to connect: --address, $RAY_ADDRESS, the running local cluster of this NANOCHAT_HOME, else
    None (ray.init's own lookup). Never the latest cluster in /tmp/ray when we started another."""
    if given or os.environ.get("RAY_ADDRESS"):
        return given or os.environ["RAY_ADDRESS"]
    from cluster.local import LocalCluster

    local = LocalCluster.from_state()
    return local.address if local is not None and local.is_running() else None


def _dashboard_of(address: str | None) -> str | None:
    """The dashboard URL of the local cluster we deployed to, if it is this NANOCHAT_HOME's."""
    from cluster.local import LocalCluster

    local = LocalCluster.from_state()
    if local is None or (address and address != local.address):
        return None
    return local.dashboard_url


def check_serve_port(config: ServeConfig) -> None:
    """Refuse a port that something other than this cluster's Serve already holds."""
    import ray

    from cluster.local import port_open

    serve_here = any(a["name"] == "SERVE_CONTROLLER_ACTOR"
                     for a in ray.util.list_named_actors(all_namespaces=True))
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    if not serve_here and port_open(config.port, host):
        raise ConfigError(f"port {config.port} on {host} is in use by another program (or another Ray "
                          "cluster's Serve): stop it or pick another port with --set port=N "
                          "(make demo SERVE_PORT=N)")


@entrypoint
def main(argv: list[str] | None = None) -> int:
    p = stage_argparser("serve", __doc__.splitlines()[0])
    p.add_argument("--stage", dest="stages", action="append", choices=SERVABLE,
                   help="stage whose exported model to serve (repeatable; default sft)")
    p.add_argument("--print-serve-config", action="store_true", help="print a Serve config YAML and exit")
    p.add_argument("--address", default=None,
                   help="Ray cluster (GCS address); default $RAY_ADDRESS, else this NANOCHAT_HOME's "
                        "local cluster")
    args = p.parse_args(argv)
    storage = RunStorage(args.run, args.storage)
    config = build_config(args.preset, args.overrides, model_specs(storage, args.stages or ["sft"]))
    if args.print_serve_config:
        print(serve_config_yaml(config), end="")
        return 0
    import ray

    from serve_app.app import deploy

    if not ray.is_initialized():
        ray.init(address=ray_address(args.address))  # 1. the cluster this job runs on
    check_serve_port(config)
    url = deploy(config)  # 2. + 3.
    model = config.models[0]
    route = "chat/completions" if model.kind == "chat" else "completions"
    payload = ({"model": model.name, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
               if model.kind == "chat" else {"model": model.name, "prompt": "The sky is blue because"})
    auth = " -H 'Authorization: Bearer <one of the keys>'" if config.api_keys else ""
    print(f"serving {', '.join(m.name for m in config.models)} at {url}/  (web chat: {url}/)")
    print(f"  curl {url}/v1/{route} -H 'Content-Type: application/json'{auth} -d '{json.dumps(payload)}'")
    dashboard = _dashboard_of(args.address)
    shutdown = (f"RAY_AUTH_MODE=token serve shutdown -y --address {dashboard}" if dashboard
                else "serve shutdown -y")
    print(f"stop it with: {shutdown}  (or serve.delete({config.app_name!r}); `python -m cluster.local stop` "
          "ends the whole local cluster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
