"""Is a local run directory really shared by every node? Checked, not assumed, before training starts.

`storage_is_shared=true` declares that a local path (an NFS mount) is the same directory on every
node; a wrong declaration (a path on one node's own disk) would let each worker write checkpoints
nobody else can read, and a restarted worker would silently start over. `verify_shared_storage`
writes a marker file into the run directory from the driver, then runs a zero-CPU task pinned to
each alive node that looks for it; a node that does not see it makes the run fail at once with
the nodes named. Remote storage (s3://, gs://) and one-node clusters need no check.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.storage import StorageError


@ray.remote(num_cpus=0, max_retries=0)
def _sees(path: str) -> tuple[str, bool]:
    return ray.util.get_node_ip_address(), Path(path).is_file()


def verify_shared_storage(run_dir: str, nodes: list[dict], timeout_s: float = 120.0) -> None:
    """Raise StorageError unless every node of `nodes` (ray.nodes() entries) sees `run_dir`."""
    if len(nodes) < 2 or "://" in run_dir:
        return
    marker = Path(run_dir) / f".shared-check-{uuid.uuid4().hex[:12]}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"written by the driver on {ray.util.get_node_ip_address()} (pid {os.getpid()})\n")
    try:
        refs = [_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes]
        try:
            seen = ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StorageError(f"could not check within {timeout_s:.0f}s that every node sees the run "
                               f"directory {run_dir} (a node is unreachable or has no room for a 0-CPU "
                               "task)") from None
    finally:
        marker.unlink(missing_ok=True)
    blind = sorted(ip for ip, ok in seen if not ok)
    if blind:
        raise StorageError(
            f"the run directory {run_dir} is not shared: node(s) {', '.join(blind)} do not see a file the "
            f"driver wrote there, so their workers would write checkpoints no other node can read. "
            "Put the run on storage every node mounts at the same path (NFS) or on s3:// / gs://")
