"""Will a stage fit on the cluster? A placement check before submitting, and a watcher for jobs that wait.

    python -m cluster.resources describe [--address URL] [--config cluster.yaml]
    python -m cluster.resources check --workers 8 --gpu 1 --cpu 16 [--address URL] [--config cluster.yaml]

Two questions the pipeline asks around each stage it submits:
1. Before submitting: can the cluster *ever* place the stage? "Ever" is the nodes alive now plus
   what its autoscaler may add: each worker node type up to its `max_workers`, all types together
   within the global `max_workers`. A stage that can never be placed is refused with a message
   naming the missing resource (`check_placeable`), before any node is launched.
2. While its job runs: has a placement group, actor or task of that job been pending longer than
   a set time? Then `PendingWatcher.check` returns a message naming what it waits for, and the
   caller stops the job instead of letting it wait forever.

Where a `ClusterDescription` comes from (`describe_cluster`):
- live nodes: Ray's state API on the dashboard address (`http://host:8265`, the address jobs are
  submitted to), with token auth (RAY_AUTH_MODE=token, token in ~/.ray/auth_token);
- node types the autoscaler may add: a cluster launcher config (`cluster.yaml`) or a KubeRay
  RayCluster/RayJob manifest, given explicitly or by $NANOCHAT_CLUSTER_CONFIG, or on a launcher head
  the autoscaler's own `~/ray_bootstrap_config.yaml`. Without one the cluster is taken as fixed
  (the local cluster).
Live nodes are matched to node types by their CPU/GPU counts, so running workers count against
their type's `max_workers`.

The placement is first-fit decreasing over node shapes, like the autoscaler's own bin packing:
exact for the uniform worker bundles stages ask for; for mixed bundles it may refuse a packing a
cleverer search would find (the message says which bundles did not pack).

The file is over 500 lines, kept whole: the pending watcher judges what a job waits for with the same
placement check (`placement_problem`) and resource helpers as the check before submitting.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nanochat.errors import ConfigError, NanochatError, entrypoint

Resources = dict[str, float]  # resource name -> amount, e.g. {"CPU": 8, "GPU": 1}
BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"  # written by `ray up` on the head
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_EPS = 1e-9


class UnplaceableError(NanochatError, ValueError):
    """A stage asks for more than the cluster can ever provide (a ValueError: bad input, not a crash)."""


@dataclass(frozen=True)
class Demand:
    """What one stage asks of the cluster: resource bundles and how they may be spread over nodes."""

    stage: str
    bundles: tuple[Resources, ...]
    strategy: str = "PACK"  # PACK/SPREAD: any nodes; STRICT_PACK: one node; STRICT_SPREAD: one node each

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"placement strategy {self.strategy!r} of stage {self.stage} "
                              f"is not one of {STRATEGIES}")
        for b in self.bundles:
            bad = {k: v for k, v in b.items() if not isinstance(v, int | float) or v < 0 or math.isnan(v)}
            if bad:
                raise ConfigError(f"stage {self.stage} asks for invalid amounts {bad}: "
                                  "amounts are numbers >= 0")

    @classmethod
    def workers(cls, stage: str, num_workers: int, per_worker: Resources, strategy: str = "PACK") -> Demand:
        """`num_workers` identical bundles, e.g. a TorchTrainer's ScalingConfig (its controller takes
        0 CPU)."""
        if num_workers < 1:
            raise ConfigError(f"stage {stage} asks for {num_workers} workers; it needs at least 1")
        return cls(stage, tuple(dict(per_worker) for _ in range(num_workers)), strategy)

    def total(self) -> Resources:
        return _add({}, *self.bundles)


@dataclass(frozen=True)
class NodeType:
    """A worker node type the autoscaler may launch (cluster launcher node type / KubeRay worker group)."""

    name: str
    resources: Resources
    max_workers: int


@dataclass
class ClusterDescription:
    """Nodes alive now and what the autoscaler may add; `source` says where both were read."""

    nodes: list[tuple[str, Resources]] = field(default_factory=list)  # (label, total resources) per live node
    node_types: dict[str, NodeType] = field(default_factory=dict)  # worker types the autoscaler may launch
    max_workers: int | None = None  # global cap on worker nodes; None: only the per-type caps
    running: dict[str, int] = field(default_factory=dict)  # live worker nodes per node type name
    live_workers: int = 0  # live non-head nodes (all count against max_workers)
    source: str = "no cluster"

    def addable(self) -> dict[str, int]:
        """How many more nodes of each type the autoscaler may still launch (before the global cap)."""
        return {n: max(0, t.max_workers - self.running.get(n, 0)) for n, t in self.node_types.items()}

    def global_room(self) -> int:
        """How many more worker nodes of any type the global `max_workers` allows."""
        total = sum(self.addable().values())
        return total if self.max_workers is None else max(0, min(total, self.max_workers - self.live_workers))

    def max_total(self, resource: str) -> float:
        """The most of `resource` the cluster could ever hold at once (live + best choice of added nodes)."""
        live = sum(r.get(resource, 0.0) for _, r in self.nodes)
        extra = sorted((t.resources.get(resource, 0.0) for n, t in self.node_types.items()
                        for _ in range(self.addable()[n])), reverse=True)
        return live + sum(extra[: self.global_room()])

    def summary(self) -> str:
        live = ", ".join(f"{label} {_fmt(r)}" for label, r in self.nodes) or "none"
        types = ", ".join(f"{n} {_fmt(t.resources)} x up to {self.addable()[n]} more"
                          for n, t in self.node_types.items()) or "none (fixed cluster)"
        cap = "" if self.max_workers is None else f"; at most {self.global_room()} more worker nodes in all"
        return f"live nodes: {live}; autoscaler may add: {types}{cap} [{self.source}]"


def check_placeable(demand: Demand, cluster: ClusterDescription) -> None:
    """Raise UnplaceableError, naming the missing resource, if `demand` can never be placed on `cluster`."""
    problem = placement_problem(demand, cluster)
    if problem:
        hint = "" if cluster.node_types else (
            " No autoscaler node types are known: if this cluster autoscales, pass its config "
            "(cluster.yaml or the KubeRay manifest) or set NANOCHAT_CLUSTER_CONFIG to it.")
        raise UnplaceableError(
            f"stage {demand.stage} can never be placed: {problem}. "
            f"Seen on the cluster ({cluster.summary()}). "
            f"Lower the workers or per-worker resources of stage {demand.stage} in the preset, or give the "
            "cluster bigger node types or a higher max_workers (cluster.yaml, or the KubeRay worker groups)."
            f"{hint}")


def placement_problem(demand: Demand, cluster: ClusterDescription) -> str | None:
    """Why `demand` can never be placed on `cluster` (naming the resource), or None if it can."""
    bundles = [_nonzero(b) for b in demand.bundles]
    shapes = [r for _, r in cluster.nodes] + [t.resources for n, t in cluster.node_types.items()
                                             if cluster.addable()[n] > 0 and cluster.global_room() > 0]
    for b in bundles:
        if not any(_fits(b, s) for s in shapes):
            return f"one of its bundles needs {_fmt(b)} on one node, but {_shortfall_one(b, shapes)}"
    if demand.strategy == "STRICT_PACK":
        whole = _nonzero(demand.total())
        if not any(_fits(whole, s) for s in shapes):
            return (f"it asks for all of {_fmt(whole)} on one node (STRICT_PACK), "
                    f"but {_shortfall_one(whole, shapes)}")
        return None
    for name, need in sorted(demand.total().items(), key=lambda kv: _order(kv[0])):
        have = cluster.max_total(name)
        if need > have + _EPS:
            of = f" of {_fmt(bundles[0])}" if all(b == bundles[0] for b in bundles) else ""
            return (f"it needs {name} {_num(need)} in total ({len(bundles)} bundles{of}), but the cluster "
                    f"can hold at most {name} {_num(have)}: {name} is short by {_num(need - have)}")
    left = _pack(bundles, cluster, one_per_node=demand.strategy == "STRICT_SPREAD")
    if left:
        return (f"{len(left)} of its {len(bundles)} bundles ({_fmt(left[0])} each) do not fit on the nodes "
                f"it has and may add (strategy {demand.strategy})")
    return None


def _pack(bundles: list[Resources], cluster: ClusterDescription, one_per_node: bool) -> list[Resources]:
    """First-fit decreasing: live nodes first, then new nodes of the cheapest fitting type; returns
    leftovers."""
    free = [dict(r) for _, r in cluster.nodes]
    used = [False] * len(free)
    room, per_type = cluster.global_room(), cluster.addable()
    left = []
    for b in sorted(bundles, key=lambda b: tuple(-b.get(k, 0.0) for k in ("GPU", "CPU"))):
        slot = next((i for i, f in enumerate(free) if _fits(b, f) and not (one_per_node and used[i])), None)
        if slot is None:
            fitting = [t for n, t in cluster.node_types.items() if per_type[n] > 0 and _fits(b, t.resources)]
            if room <= 0 or not fitting:
                left.append(b)
                continue
            t = min(fitting, key=lambda t: (len(set(t.resources) - set(b)),
                                            [t.resources.get(k, 0.0) for k in sorted(b)]))
            per_type[t.name] -= 1
            room -= 1
            free.append(dict(t.resources))
            used.append(False)
            slot = len(free) - 1
        for k, v in b.items():
            free[slot][k] = free[slot].get(k, 0.0) - v
        used[slot] = True
    return left


def _shortfall_one(b: Resources, shapes: list[Resources]) -> str:
    if not shapes:
        return "the cluster has no nodes and no node types to add"
    parts = []
    for k, v in sorted(b.items(), key=lambda kv: _order(kv[0])):
        best = max(s.get(k, 0.0) for s in shapes)
        if best + _EPS < v:
            parts.append(f"no node offers {k} {_num(v)}" if best == 0 else
                         f"the largest node offers {k} {_num(best)} of the {_num(v)} needed")
    return "; ".join(parts) or "no single node offers all of it at once"


def describe_cluster(address: str | None = None,
                     config: str | Path | dict | None = None) -> ClusterDescription:
    """Live nodes at `address` (a dashboard URL) and the node types `config` lets the autoscaler add.

    `config` is a cluster launcher YAML (path or dict) or a KubeRay RayCluster/RayJob manifest; when
    None: the file named by $NANOCHAT_CLUSTER_CONFIG (set in the KubeRay manifests' head pods), else
    on a cluster launcher head the autoscaler's own `~/ray_bootstrap_config.yaml`, else none (a fixed
    cluster). With neither `address` nor `config` the description is empty (every demand is refused).
    """
    if config is None:
        config = (os.environ.get("NANOCHAT_CLUSTER_CONFIG")
                  or (BOOTSTRAP_CONFIG if BOOTSTRAP_CONFIG.is_file() else None))
    desc = ClusterDescription()
    sources = []
    head: Resources | None = None
    if config is not None:
        head, desc.node_types, desc.max_workers, where = node_types_from_config(config)
        sources.append(where)
    if address:
        nodes = _live_nodes(address)
        sources.append(f"live nodes from {address}")
        for is_head, label, res in nodes:
            desc.nodes.append((label, res))
            if is_head:
                continue
            desc.live_workers += 1
            kind = _match_type(res, desc.node_types)
            if kind:
                desc.running[kind] = desc.running.get(kind, 0) + 1
    elif head is not None:
        desc.nodes.append(("head", head))  # no cluster yet: the head the config would start
    desc.source = "; ".join(sources) or "no cluster"
    return desc


def node_types_from_config(
    config: str | Path | dict,
) -> tuple[Resources, dict[str, NodeType], int | None, str]:
    """(head resources, worker node types, global max_workers or None, a label of the source)."""
    where = "config dict"
    if not isinstance(config, dict):
        import yaml

        where = str(config)
        docs = [d for d in yaml.safe_load_all(Path(config).read_text()) if isinstance(d, dict)]
        config = next((d for d in docs if d.get("kind") in ("RayCluster", "RayJob")), docs[0] if docs else {})
    if config.get("kind") in ("RayCluster", "RayJob"):
        return (*_from_kuberay(config, where), where)
    types = config.get("available_node_types")
    if not types or config.get("head_node_type") not in types:
        raise ConfigError(f"{where} is neither a cluster launcher config "
                         "(available_node_types + head_node_type) nor a KubeRay RayCluster/RayJob manifest")
    out = {}
    for name, t in types.items():
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        if name != config["head_node_type"] and not res:
            raise ConfigError(f"node type {name} in {where} declares no `resources`; write them out (e.g. "
                             "{CPU: 32, GPU: 8}) so the placement check knows what the autoscaler can add")
        out[name] = NodeType(name, res, int(t.get("max_workers", config.get("max_workers", 0))))
    head = out.pop(config["head_node_type"]).resources
    return head, out, config.get("max_workers"), where


def _from_kuberay(manifest: dict, where: str) -> tuple[Resources, dict[str, NodeType], None]:
    spec = manifest["spec"]
    spec = spec.get("rayClusterSpec", spec)  # a RayJob embeds the RayCluster spec
    head = _group_resources(spec["headGroupSpec"], f"{where} headGroupSpec")
    types = {}
    for g in spec.get("workerGroupSpecs", []):
        name = g["groupName"]
        types[name] = NodeType(name, _group_resources(g, f"{where} group {name}"),
                               int(g.get("maxReplicas", g.get("replicas", 0))))
    return head, types, None  # KubeRay has no global cap; each group has maxReplicas


def _group_resources(group: dict, where: str) -> Resources:
    """Ray's view of one pod: rayStartParams num-cpus/num-gpus win, else the container's limits."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    cpu = params.get("num-cpus", limits.get("cpu"))
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if cpu is None and gpu is None:
        raise ConfigError(f"{where}: no cpu/gpu limits and no num-cpus/num-gpus, "
                          "so its resources are unknown")
    res: Resources = {}
    if cpu is not None:
        res["CPU"] = float(math.floor(_k8s_quantity(cpu)))  # Ray rounds a fractional CPU limit down
    if gpu is not None:
        res["GPU"] = float(gpu)
    return _nonzero(res)


def _k8s_quantity(q: Any) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _match_type(res: Resources, types: dict[str, NodeType]) -> str | None:
    """The node type whose CPU/GPU counts equal this live node's (how launcher nodes are recognised)."""
    for name, t in types.items():
        if all(abs(res.get(k, 0.0) - t.resources.get(k, 0.0)) < _EPS for k in ("CPU", "GPU")):
            return name
    return None


def _use_token_auth() -> None:
    # Ray reads RAY_AUTH_MODE once per process when a client first authenticates; the project's
    # clusters always use token auth (see cluster/local.py), so set it before the state API runs.
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def _live_nodes(address: str) -> list[tuple[bool, str, Resources]]:
    _use_token_auth()
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True,
                       raise_on_missing_output=False)
    out = []
    for n in nodes:
        res = {k: float(v) for k, v in n.resources_total.items() if not _internal(k)}
        out.append((bool(n.is_head_node), ("head " if n.is_head_node else "") + n.node_ip, res))
    return out


def _internal(name: str) -> bool:
    """Resources Ray adds on its own that stages do not ask for (node ids, memory in bytes)."""
    return name.startswith("node:") or name in ("memory", "object_store_memory")


# ---------------------------------------------------------------- watching jobs that wait


@dataclass(frozen=True)
class Waiting:
    """One pending item of a job: a placement group, actor or task, and the bundles it waits for."""

    key: str  # stable id across polls, e.g. "pg 1a2b..."
    what: str  # for the message, e.g. "placement group 1a2b (PACK, 2 bundles)"
    bundles: tuple[Resources, ...]
    infeasible: bool = False  # Ray's scheduler already marked it infeasible on the live nodes


class StateSource(Protocol):
    """What the watcher reads from the cluster (the real one is `RayStateSource`; tests pass fakes)."""

    def job(self, submission_id: str) -> tuple[str, str | None]:
        """(job status name, Ray job id hex or None before the driver starts)."""
        ...

    def pending(self, job_id: str) -> list[Waiting]:
        """Placement groups, actors and tasks of that job that wait for resources."""
        ...


class RayStateSource:
    """Reads job status from the Job API and pending items from Ray's state API at a dashboard address."""

    def __init__(self, address: str):
        self.address = address
        self._client = None

    def job(self, submission_id: str) -> tuple[str, str | None]:
        if self._client is None:
            _use_token_auth()
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        info = self._client.get_job_info(submission_id)
        return str(getattr(info.status, "value", info.status)), info.job_id

    def pending(self, job_id: str) -> list[Waiting]:
        _use_token_auth()
        from ray.util.state import list_actors, list_placement_groups, list_tasks

        kw = {"address": self.address, "detail": True, "raise_on_missing_output": False}
        out = []
        for pg in list_placement_groups(filters=[("state", "=", "PENDING")], **kw):
            if pg.creator_job_id == job_id:
                bundles = tuple(_nonzero(b["unit_resources"]) for b in pg.bundles)
                infeasible = (pg.stats or {}).get("scheduling_state") == "INFEASIBLE"
                out.append(Waiting(f"pg {pg.placement_group_id}",
                                   f"placement group {pg.placement_group_id[:8]} ({len(bundles)} bundles)",
                                   bundles, infeasible))
        for a in list_actors(filters=[("state", "=", "PENDING_CREATION"), ("job_id", "=", job_id)], **kw):
            if not a.placement_group_id:  # actors of a pending group wait for the group, listed above
                out.append(Waiting(f"actor {a.actor_id}", f"actor {a.class_name}",
                                   (_nonzero(a.required_resources),)))
        for t in list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT"), ("job_id", "=", job_id)],
                            limit=200, **kw):
            out.append(Waiting(f"task {t.task_id}", f"task {t.name}",
                               (_nonzero(t.required_resources or {}),)))
        return out


class PendingWatcher:
    """Tells when a submitted job has waited too long for resources, and for which.

    Call `check(submission_id)` from the loop that waits on the job; it queries the cluster at most
    every `poll_s` seconds. An item (placement group, actor, task) counts from the first poll that
    sees it pending; once one has been pending for `limit_s`, `check` returns a message naming the
    resources it waits for (and whether the cluster can ever provide them). A job whose driver has
    not started (status PENDING) is timed the same way.
    """

    def __init__(self, address: str, limit_s: float, cluster: ClusterDescription | None = None, *,
                 poll_s: float = 10.0, source: StateSource | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limit_s, self.poll_s, self.cluster, self.clock = limit_s, poll_s, cluster, clock
        self.source = source or RayStateSource(address)
        self._since: dict[str, float] = {}
        self._last_poll = -math.inf

    def check(self, submission_id: str) -> str | None:
        now = self.clock()
        if now - self._last_poll < self.poll_s:
            return None
        self._last_poll = now
        status, job_id = self.source.job(submission_id)
        if status == "PENDING":
            items = [Waiting("driver", "its driver (runtime environment setup or entrypoint resources)", ())]
        elif status == "RUNNING" and job_id:
            items = self.source.pending(job_id)
        else:
            items = []
        seen = {w.key for w in items}
        self._since = {k: t for k, t in self._since.items() if k in seen}
        for w in items:
            self._since.setdefault(w.key, now)
        stuck = [w for w in items if now - self._since[w.key] >= self.limit_s]
        if not stuck:
            return None
        w = max(stuck, key=lambda w: now - self._since[w.key])
        return self._message(submission_id, w, now - self._since[w.key])

    def _message(self, submission_id: str, w: Waiting, waited: float) -> str:
        head = f"job {submission_id} has waited {waited:.0f}s (limit {self.limit_s:.0f}s) for {w.what}"
        if not w.bundles:
            return f"{head}. See `RAY_AUTH_MODE=token ray job logs {submission_id}` and the dashboard."
        wants = ", ".join(sorted({_fmt(b) for b in w.bundles}))
        head += f", which needs {wants} per bundle"
        if self.cluster is not None:
            problem = placement_problem(Demand(submission_id, w.bundles), self.cluster)
            if problem:
                return f"{head}. It can never be placed: {problem} ({self.cluster.summary()})"
            names = sorted({k for b in w.bundles for k in b}, key=_order)
            have = ", ".join(f"{k} {_num(sum(r.get(k, 0.0) for _, r in self.cluster.nodes))} live "
                             f"(at most {_num(self.cluster.max_total(k))})" for k in names)
            head += f". Waiting for: {', '.join(names)}; the cluster has {have}"
        infeasible = " Ray marks it infeasible on the live nodes." if w.infeasible else ""
        return (f"{head}.{infeasible} Other jobs may hold these resources, or the autoscaler cannot launch "
                "nodes (quota, capacity): see `ray status` and the autoscaler log on the head "
                "(/tmp/ray/session_latest/logs/monitor.*).")


# ---------------------------------------------------------------- small helpers


def _nonzero(r: Resources) -> Resources:
    return {k: float(v) for k, v in r.items() if v}


def _fits(need: Resources, have: Resources) -> bool:
    return all(have.get(k, 0.0) + _EPS >= v for k, v in need.items())


def _add(acc: Resources, *rs: Resources) -> Resources:
    out = dict(acc)
    for r in rs:
        for k, v in r.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _order(name: str) -> tuple[int, str]:
    return ({"GPU": 0, "CPU": 1}.get(name, 2), name)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _fmt(r: Resources) -> str:
    return ("{" + ", ".join(f"{k}: {_num(v)}" for k, v in sorted(r.items(), key=lambda kv: _order(kv[0])))
            + "}")


@entrypoint
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.resources", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["describe", "check"])
    p.add_argument("--address", default=None, help="dashboard URL of a running cluster, e.g. http://127.0.0.1:8265")
    p.add_argument("--config", default=None, help="cluster.yaml or a KubeRay RayCluster/RayJob manifest")
    p.add_argument("--stage", default="(cli)", help="stage name for the message")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpu", type=float, default=1.0, help="CPUs per worker")
    p.add_argument("--gpu", type=float, default=0.0, help="GPUs per worker")
    p.add_argument("--strategy", default="PACK", choices=STRATEGIES)
    args = p.parse_args(argv)
    try:
        cluster = describe_cluster(args.address, args.config)
        if args.command == "describe":
            print(cluster.summary())
            return 0
        demand = Demand.workers(args.stage, args.workers, _nonzero({"CPU": args.cpu, "GPU": args.gpu}),
                                args.strategy)
        check_placeable(demand, cluster)
    except OSError as e:  # an unreadable config file, or a cluster that does not answer
        raise ConfigError(f"cannot describe the cluster ({args.config or args.address}): {e}") from e
    print(f"stage {args.stage}: {args.workers} x {_fmt(demand.bundles[0])} can be placed on "
          f"{cluster.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
