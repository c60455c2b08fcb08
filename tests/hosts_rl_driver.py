"""The RL driver of tests/test_hosts_rl.py, submitted as a Ray job to the head of a host cluster.

    python -m tests.hosts_rl_driver --storage /srv/runs --run hr --kill-step 1 --back-step 3 [--set k=v ...]

It runs cluster/rl.py's RLRun on the toy task (tests/test_rl_cluster.py's settings, then `--set`)
from the stand-in SFT model the test wrote to {storage}/{run}/sft/model, and talks to the test
through files in {storage}/{run}/handshake/ on the shared mount (the test, outside the hosts, holds
the harness): when step `--kill-step`'s rollouts are in flight it writes `dispatched` and waits for
`killed` (the test has killed a rollout host); when step `--back-step`'s are, it writes
`want_host_back`, waits for `host_back` (the test has restarted that host) and then for the queued
replacement actor to be placed there. Every fleet message and both hand-shakes go to
handshake/events.jsonl with their times; the summary goes there last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import ray

from cluster.resources import check_placeable
from cluster.rl import RLRun
from cluster.storage import RunStorage
from jobs import rl as job
from jobs.config import load_stage_config
from tests.test_rl_cluster import TOY_SETTINGS

HANDSHAKE_TIMEOUT_S = 600.0


def wait_for(path: Path, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"the test never wrote {path}")
        time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hosts_rl_driver", description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--kill-step", type=int, required=True)
    p.add_argument("--back-step", type=int, required=True)
    p.add_argument("--set", action="append", default=[], dest="overrides")
    args = p.parse_args()
    ray.init()
    spec = load_stage_config(job.RLConfig, "rl", "micro", [*TOY_SETTINGS, *args.overrides]).to_spec(0)
    check_placeable(job.demand(spec), job.cluster_description())
    hand = Path(args.storage) / args.run / "handshake"
    hand.mkdir(parents=True, exist_ok=True)
    log = (hand / "events.jsonl").open("a")

    def event(kind: str, **kw: Any) -> None:
        log.write(json.dumps({"t": time.time(), "event": kind, **kw}) + "\n")
        log.flush()

    model = f"{args.storage}/{args.run}/sft/model"
    with RLRun(spec, RunStorage(args.run, args.storage), model_uri=model, tokenizer_uri=f"{model}/tokenizer",
               ray_metrics=False) as run:
        run.start()
        event("started", actors=len(run.actors))

        def fleet_log(message: str) -> None:
            print(message, flush=True)
            event("fleet", message=message)

        run.fleet.log = fleet_log

        def on_dispatch(step: int, actors: list[Any]) -> None:
            if step == args.kill_step:
                event("dispatched", step=step, actors=len(actors))
                (hand / "dispatched").write_text(str(step))
                wait_for(hand / "killed")
            elif step == args.back_step:
                event("want_host_back", step=step, actors=len(actors))
                (hand / "want_host_back").write_text(str(step))
                wait_for(hand / "host_back")
                placed = run.fleet.backend.wait_placed(list(run.fleet.recruits), 300)
                event("recruits_placed", placed=len(placed), queued=len(run.fleet.recruits))

        summary = run.run(on_dispatch=on_dispatch)
        event("finished", summary=summary)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
