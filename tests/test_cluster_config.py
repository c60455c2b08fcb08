"""Cluster configuration: cluster.yaml against Ray's schema, KubeRay manifests, Prometheus and
Grafana configs, and the placement check / pending watcher of cluster/resources.py.

    PYTHONPATH=. python -m pytest -q tests/test_cluster_config.py            # unit tests, no cloud
    PYTHONPATH=. python -m pytest -q tests/test_cluster_config.py -m cluster # on the local test cluster

Unit tests use fake cluster descriptions and a fake state source; the two `cluster` tests read a
real (local) Ray 2.60 cluster through its dashboard address, as the pipeline does.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cluster import resources as R
from cluster.resources import ClusterDescription, Demand, NodeType, PendingWatcher, UnplaceableError, Waiting

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
D20 = Demand.workers("pretrain", 8, {"GPU": 1, "CPU": 16})  # the seed's speedrun: 8 ranks on one node


def _launcher_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


# ---------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher_config()
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before launching
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_8xh100"]["resources"]["GPU"] = 7.5  # the schema wants integers
    with pytest.raises(Exception, match="integer"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_layout_and_autoscaling():
    config = _launcher_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs no work"
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1
    (gpu,) = gpu
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge" and gpu["resources"]["GPU"] == 8
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= config["max_workers"]
    cpu = [n for n, t in types.items() if t is not head and not t["resources"].get("GPU")]
    assert cpu and all(types[n]["min_workers"] == 0 for n in cpu), "a CPU worker type for data and evaluation"
    assert 0 < config["idle_timeout_minutes"] <= 30, "idle GPU nodes are removed"
    assert config["provider"]["cache_stopped_nodes"] is False, "idle nodes are terminated, not stopped"


def test_cluster_yaml_token_auth_and_ports():
    config = _launcher_config()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd.split("ray start")[0], f"{key}: ray start without token auth"
            assert "--metrics-export-port=8080" in cmd
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-port=8265" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_cluster_yaml_setup_mirrors_make_env():
    config = _launcher_config()
    setup = " && ".join(config["setup_commands"])
    assert "make env" in setup and "rustup" in setup and "python3-venv" in setup
    assert config["file_mounts"]["~/nanochat-ray"] == "."
    makefile = (ROOT / "Makefile").read_text()
    env_target = makefile.split("\nenv:", 1)[1].split("\n\n", 1)[0]
    assert "maturin build" in env_target and "pip install" in env_target and "pyproject.toml" in env_target, \
        "cluster.yaml runs `make env` on every node; it must still install the dependencies and build rustbpe"


# ---------------------------------------------------------------- KubeRay, Prometheus, Grafana


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_layout(name):
    import ray

    doc = yaml.safe_load((KUBERAY / name).read_text())
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"] == {"mode": "token", "secretName": "nanochat-ray-token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head, types, _, _ = R.node_types_from_config(KUBERAY / name)
    assert head == {}
    assert types["gpu-8xh100"].resources == {"CPU": 184.0, "GPU": 8.0}
    assert "GPU" not in types["cpu-32"].resources
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert all(g["minReplicas"] == 0 and g["replicas"] == 0 for g in groups.values()), "0 at rest"
    images = {c["image"] for g in [spec["headGroupSpec"], *groups.values()]
              for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"one image for every pod, got {images}"


def test_kuberay_layout_matches_cluster_yaml_and_job_runs_the_pipeline():
    _, launcher, _, _ = R.node_types_from_config(CLUSTER_YAML)
    for name in ("raycluster.yaml", "rayjob.yaml"):
        _, kube, _, _ = R.node_types_from_config(KUBERAY / name)
        assert sorted((t.resources.get("GPU", 0), t.max_workers) for t in kube.values()) == \
            sorted((t.resources.get("GPU", 0), t.max_workers) for t in launcher.values())
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, "one quoted command, expanded on the head"
    assert argv[2].startswith("cd /home/ray/nanochat-ray && "), "the project runs from its clone in the image"
    assert "-m jobs.pipeline" in argv[2] and '--storage "$NANOCHAT_STORAGE"' in argv[2]
    assert "--address http://127.0.0.1:8265" in argv[2], "stages go to the head's own job API"

    assert (ROOT / "jobs" / "pipeline.py").is_file()
    assert job["shutdownAfterJobFinishes"] is True and job["activeDeadlineSeconds"] > 4 * 3600


def test_prometheus_scrapes_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = yaml.safe_load((ROOT / "cluster" / "prometheus" / "prometheus.yml").read_text())
    files = [f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert files == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]  # Ray's default temp dir on the head
    if shutil.which("promtool"):
        out = subprocess.run(["promtool", "check", "config", str(ROOT / "cluster/prometheus/prometheus.yml")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def _known_metric_names() -> set[str]:
    """Serving names from the table in cluster/README.md, training names from cluster/metrics.py."""
    from cluster import metrics

    readme = (ROOT / "cluster" / "README.md").read_text()
    table = readme.split("### Serving metric names", 1)[1].split("\n\n", 2)[1]
    serving = set(re.findall(r"^\| `(nanochat_serve_\w+)`", table, flags=re.M))
    # gauges are PREFIX + a GAUGES key; the counter's suffix is spelled out in the source
    counters = re.findall(r"PREFIX \+ \"(\w+)\"", Path(metrics.__file__).read_text())
    training = {metrics.PREFIX + k for k in [*metrics.GAUGES, *counters]}
    assert len(serving) == 6 and metrics.PREFIX + "loss" in training
    served = set(re.findall(r"\"(nanochat_serve_\w+)\"", (ROOT / "serve_app" / "metrics.py").read_text()))
    assert served == serving, f"cluster/README.md's table and serve_app/metrics.py differ: {served ^ serving}"
    return serving | training


def test_grafana_panels_query_only_known_metrics():
    dash = json.loads((ROOT / "cluster" / "grafana" / "nanochat.json").read_text())
    known = _known_metric_names()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = re.findall(r"\bray_(nanochat_\w+)", t["expr"])
            assert names, f"panel {p['title']!r} queries no project metric: {t['expr']}"
            for n in names:
                base = re.sub(r"_(bucket|sum|count)$", "", n)
                assert base in known or base.removesuffix("_total") in known, \
                    f"panel {p['title']!r} queries {n}, which is not a defined metric"
                used.add(base)
    wanted = ["pretrain_loss", "val_bpb", "tokens_per_sec", "mfu", "data_wait", "ttft", "inter_token",
              "batch_size", "queue_depth", "requests_total"]
    assert all(any(w in u for u in used) for w in wanted), sorted(used)


# ---------------------------------------------------------------- placement check


def _aws(running: dict[str, int] | None = None, live: list | None = None) -> ClusterDescription:
    head, types, cap, _ = R.node_types_from_config(CLUSTER_YAML)
    nodes = live if live is not None else [("head", head)]
    live_workers = sum((running or {}).values())
    return ClusterDescription(nodes, types, cap, dict(running or {}), live_workers, "test")


def test_d20_fits_what_the_autoscaler_can_add():
    R.check_placeable(D20, _aws())  # no GPU node is up; the autoscaler may add two
    R.check_placeable(Demand.workers("pretrain", 16, {"GPU": 1, "CPU": 16}), _aws())  # two nodes
    R.check_placeable(Demand.workers("tokenizer", 4, {"CPU": 30}), _aws())


def test_more_gpus_than_the_autoscaler_may_ever_add_is_refused():
    with pytest.raises(UnplaceableError, match=r"GPU 24 in total.*at most GPU 16.*GPU is short by 8"):
        R.check_placeable(Demand.workers("pretrain", 24, {"GPU": 1}), _aws())
    with pytest.raises(UnplaceableError, match=r"largest node offers GPU 8 of the 16 needed"):
        R.check_placeable(Demand.workers("pretrain", 1, {"GPU": 16}), _aws())


def test_a_fixed_cluster_without_gpus_names_the_missing_resource():
    local = ClusterDescription([("head 127.0.0.1", {"CPU": 4.0})], source="local")
    with pytest.raises(UnplaceableError, match=r"stage pretrain can never be placed: .*no node offers GPU 1"):
        R.check_placeable(D20, local)
    R.check_placeable(Demand.workers("pretrain", 2, {"CPU": 2}), local)
    with pytest.raises(UnplaceableError, match="CPU 6 in total"):
        R.check_placeable(Demand.workers("pretrain", 3, {"CPU": 2}), local)


def test_running_nodes_count_against_max_workers():
    gpu = {"CPU": 192.0, "GPU": 8.0}
    one_up = _aws(running={"gpu_8xh100": 2}, live=[("head", {"CPU": 0.0}), ("a", gpu), ("b", gpu)])
    R.check_placeable(Demand.workers("pretrain", 16, {"GPU": 1}), one_up)  # both live nodes
    with pytest.raises(UnplaceableError, match="GPU is short by 8"):
        R.check_placeable(Demand.workers("pretrain", 24, {"GPU": 1}), one_up)
    cpu = {"CPU": 32.0}
    full = ClusterDescription([("head", {"CPU": 0.0})] + [(str(i), cpu) for i in range(6)],
                              _aws().node_types, 6, {"cpu_32": 4}, 6, "test")  # at the global cap of 6 workers
    with pytest.raises(UnplaceableError, match="no node offers GPU 1"):
        R.check_placeable(D20, full)


def test_strategies_and_packing():
    types = {"cpu": NodeType("cpu", {"CPU": 32.0}, 2)}
    desc = ClusterDescription([("head", {"CPU": 0.0})], types, None, {}, 0, "test")
    with pytest.raises(UnplaceableError, match=r"1 of its 3 bundles \(\{CPU: 20\} each\) do not fit"):
        R.check_placeable(Demand.workers("evaluate", 3, {"CPU": 20}), desc)  # 60 <= 64 CPUs, but 20+20 > 32
    R.check_placeable(Demand.workers("evaluate", 2, {"CPU": 1}, "STRICT_SPREAD"), desc)
    with pytest.raises(UnplaceableError, match="STRICT_SPREAD"):
        R.check_placeable(Demand.workers("evaluate", 3, {"CPU": 1}, "STRICT_SPREAD"), desc)
    with pytest.raises(UnplaceableError, match=r"all of \{GPU: 16, CPU: 16\} on one node \(STRICT_PACK\)"):
        R.check_placeable(Demand.workers("pretrain", 2, {"GPU": 8, "CPU": 8}, "STRICT_PACK"), _aws())
    R.check_placeable(Demand.workers("pretrain", 2, {"GPU": 8, "CPU": 8}, "PACK"), _aws())


def test_cpu_work_spills_onto_gpu_nodes_only_when_cpu_nodes_run_out():
    # 4 cpu_32 nodes take one 30-CPU bundle each; the 5th and 6th fit on one GPU node (192 CPUs)
    R.check_placeable(Demand.workers("tokenizer", 6, {"CPU": 30}), _aws())
    only_cpu = ClusterDescription([("head", {"CPU": 0.0})], {"cpu_32": NodeType("cpu_32", {"CPU": 32.0}, 4)}, 6)
    with pytest.raises(UnplaceableError, match="CPU 180 in total"):
        R.check_placeable(Demand.workers("tokenizer", 6, {"CPU": 30}), only_cpu)


def test_bad_demands_and_configs_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="at least 1"):
        Demand.workers("pretrain", 0, {"GPU": 1})
    with pytest.raises(ValueError, match="invalid amounts"):
        Demand("pretrain", ({"GPU": -1},))
    with pytest.raises(ValueError, match="strategy"):
        Demand("pretrain", ({"GPU": 1},), "ANYWHERE")
    config = _launcher_config()
    config["available_node_types"]["cpu_32"]["resources"] = {}
    with pytest.raises(ValueError, match="node type cpu_32 .* declares no `resources`"):
        R.node_types_from_config(config)
    (tmp_path / "x.yaml").write_text("kind: Deployment\nspec: {}\n")
    with pytest.raises(ValueError, match="neither a cluster launcher config"):
        R.node_types_from_config(tmp_path / "x.yaml")
    monkeypatch.setattr(R, "BOOTSTRAP_CONFIG", tmp_path / "absent.yaml")
    monkeypatch.delenv("NANOCHAT_CLUSTER_CONFIG", raising=False)
    with pytest.raises(UnplaceableError, match="no nodes and no node types.*set NANOCHAT_CLUSTER_CONFIG"):
        R.check_placeable(D20, R.describe_cluster(None, None))


def test_the_kuberay_head_finds_its_manifest_through_the_environment(monkeypatch):
    monkeypatch.setenv("NANOCHAT_CLUSTER_CONFIG", str(KUBERAY / "rayjob.yaml"))
    desc = R.describe_cluster(None)
    assert set(desc.node_types) == {"gpu-8xh100", "cpu-32"} and desc.max_workers is None
    R.check_placeable(D20, desc)
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((KUBERAY / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        env = {e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["NANOCHAT_CLUSTER_CONFIG"]["value"] == f"/home/ray/nanochat-ray/cluster/kuberay/{name}"


def test_describe_matches_live_nodes_to_node_types(monkeypatch):
    live = [(True, "head 10.0.0.1", {"CPU": 0.0}),
            (False, "10.0.0.2", {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0}),
            (False, "10.0.0.3", {"CPU": 7.0})]  # a node started by hand: no type, still a worker
    monkeypatch.setattr(R, "_live_nodes", lambda address: live)
    desc = R.describe_cluster("http://head:8265", CLUSTER_YAML)
    assert desc.running == {"gpu_8xh100": 1} and desc.live_workers == 2
    assert desc.addable()["gpu_8xh100"] == 1 and desc.global_room() == 4
    assert desc.max_total("GPU") == 16
    assert "live nodes from http://head:8265" in desc.summary()


def test_cli_check_prints_and_refuses(capsys):
    assert R.main(["check", "--config", str(CLUSTER_YAML), "--workers", "8", "--gpu", "1", "--cpu", "16"]) == 0
    assert "can be placed" in capsys.readouterr().out
    assert R.main(["check", "--config", str(CLUSTER_YAML), "--workers", "24", "--gpu", "1"]) == 2
    assert "GPU is short by 8" in capsys.readouterr().err


# ---------------------------------------------------------------- pending watcher


class FakeSource:
    def __init__(self):
        self.status, self.items, self.calls = "RUNNING", [], 0

    def job(self, submission_id):
        self.calls += 1
        return self.status, "02000000"

    def pending(self, job_id):
        assert job_id == "02000000"
        return list(self.items)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _watcher(limit_s=60.0, poll_s=0.0, cluster=None):
    src, clock = FakeSource(), Clock()
    return PendingWatcher("http://unused", limit_s, cluster, poll_s=poll_s, source=src, clock=clock), src, clock


def test_watcher_names_the_resource_after_the_limit():
    w, src, clock = _watcher(cluster=_aws())
    src.items = [Waiting("pg 1", "placement group 1", ({"GPU": 8.0, "CPU": 8.0},) * 2)]
    assert w.check("r1-pretrain") is None
    clock.t += 59
    assert w.check("r1-pretrain") is None
    clock.t += 2
    msg = w.check("r1-pretrain")
    assert msg and "job r1-pretrain has waited 61s (limit 60s) for placement group 1" in msg
    assert "Waiting for: GPU, CPU" in msg and "GPU 0 live (at most 16)" in msg


def test_watcher_says_when_the_wait_can_never_end():
    w, src, clock = _watcher(cluster=ClusterDescription([("head", {"CPU": 4.0})], source="local"))
    src.items = [Waiting("actor a", "actor EvalWorker", ({"GPU": 1.0},))]
    w.check("r1-evaluate")
    clock.t += 61
    msg = w.check("r1-evaluate")
    assert "It can never be placed" in msg and "no node offers GPU 1" in msg


def test_watcher_resets_when_the_item_is_placed_and_rate_limits_queries():
    w, src, clock = _watcher(poll_s=10.0)
    src.items = [Waiting("task t", "task f", ({"CPU": 1.0},))]
    w.check("j")
    clock.t += 5
    assert w.check("j") is None and src.calls == 1, "no query within poll_s"
    clock.t += 50
    src.items = []  # placed: the clock restarts for whatever waits next
    assert w.check("j") is None
    src.items = [Waiting("task t", "task f", ({"CPU": 1.0},))]
    clock.t += 30
    assert w.check("j") is None  # seen again: its wait starts now
    clock.t += 59
    assert w.check("j") is None
    clock.t += 1
    assert w.check("j") is None, "1 s after the last query: not queried again"
    clock.t += 9
    assert "waited 69s" in w.check("j")


def test_watcher_times_a_job_whose_driver_never_starts():
    w, src, clock = _watcher()
    src.status = "PENDING"
    w.check("j")
    clock.t += 60
    assert "its driver" in w.check("j")
    src.status = "SUCCEEDED"
    assert w.check("j") is None


# ---------------------------------------------------------------- on a real (local) cluster


@pytest.mark.cluster
def test_describe_the_local_cluster(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "BOOTSTRAP_CONFIG", tmp_path / "absent.yaml")  # not a launcher head
    monkeypatch.delenv("NANOCHAT_CLUSTER_CONFIG", raising=False)
    desc = R.describe_cluster(ray_cluster.dashboard_url)
    assert [r["CPU"] for _, r in desc.nodes] == [float(ray_cluster.num_cpus)]
    assert desc.node_types == {} and desc.live_workers == 0
    R.check_placeable(Demand.workers("pretrain", 2, {"CPU": 1}), desc)
    with pytest.raises(UnplaceableError, match="no node offers GPU 1"):
        R.check_placeable(D20, desc)


@pytest.mark.cluster
def test_watcher_on_a_job_that_waits_for_a_gpu(ray_cluster, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus

    client = ray_cluster.job_client()
    code = ("import ray, time; ray.init(); from ray.util.placement_group import placement_group; "
            "pg = placement_group([{'GPU': 1, 'CPU': 1}] * 2); time.sleep(120)")
    job = client.submit_job(entrypoint=f'python -c "{code}"')
    try:
        monkeypatch.setattr(R, "BOOTSTRAP_CONFIG", tmp_path / "absent.yaml")
        monkeypatch.delenv("NANOCHAT_CLUSTER_CONFIG", raising=False)
        desc = R.describe_cluster(ray_cluster.dashboard_url)
        deadline, msg = time.time() + 90, None
        while client.get_job_status(job) == JobStatus.PENDING and time.time() < deadline:
            time.sleep(0.5)  # the driver starting is not what this test times
        watcher = PendingWatcher(ray_cluster.dashboard_url, limit_s=2.0, cluster=desc, poll_s=0.5)
        while msg is None and time.time() < deadline:
            assert client.get_job_status(job) not in (JobStatus.FAILED, JobStatus.SUCCEEDED), client.get_job_logs(job)
            msg = watcher.check(job)
            time.sleep(0.5)
        assert msg is not None, "the watcher never reported the pending placement group"
        assert "placement group" in msg and "It can never be placed" in msg and "GPU" in msg
    finally:
        client.stop_job(job)
