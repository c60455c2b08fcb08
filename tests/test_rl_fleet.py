"""The rollout fleet's logic without Ray (cluster/rl_fleet.py): a lost actor replaced when Ray places
the replacement in time, dropped (the run carries on smaller) when not, the queued replacement
admitted once placed, the limits; and the placement settings (rollout_resources / learner_resources)
from the RL config to the spec, the stage's demand and the placement check, and the host harness's
per-host resources (`python -m cluster.hosts up --resources`) that match them.
The same logic on a real cluster of hosts: tests/test_hosts_rl.py.
"""

from __future__ import annotations

import pytest

from cluster.resources import ClusterDescription, UnplaceableError, check_placeable
from cluster.rl_fleet import RolloutCapacityError, RolloutFleet
from jobs import rl as job
from jobs.config import ConfigError, load_stage_config


class FakeBackend:
    """Actors are names; `room` says how many more can be placed now; waits are recorded, not slept."""

    def __init__(self, room: int) -> None:
        self.room, self.made, self.killed, self.waits = room, 0, [], []
        self.placed: set[str] = set()

    def create(self) -> str:
        self.made += 1
        name = f"a{self.made}"
        if self.room > 0:
            self.room -= 1
            self.placed.add(name)
        return name

    def wait_placed(self, actors: list[str], timeout_s: float) -> list[str]:
        self.waits.append(timeout_s)
        for a in actors:  # capacity that came back goes to the queued actors, oldest first
            if a not in self.placed and self.room > 0:
                self.room -= 1
                self.placed.add(a)
        return [a for a in actors if a in self.placed]

    def kill(self, actor: str) -> None:
        self.killed.append(actor)
        if actor in self.placed:
            self.placed.discard(actor)


def fleet(room: int, target: int = 2, max_restarts: int = 3) -> tuple[RolloutFleet, FakeBackend]:
    backend = FakeBackend(room)
    f = RolloutFleet(backend, target, replace_wait_s=7.5, max_restarts=max_restarts, log=lambda m: None)
    f.start()
    return f, backend


def test_a_lost_actor_is_replaced_in_its_slot_when_the_replacement_is_placed_in_time():
    f, backend = fleet(room=3)
    assert f.actors == ["a1", "a2"]
    new = f.lost("a1", "its host died")
    assert new == "a3" and f.actors == ["a3", "a2"] and f.recruits == []
    assert backend.killed == ["a1"] and backend.waits == [7.5]  # the bounded wait: replace_wait_s
    assert f.restarts == 1 and f.dropped == 0
    assert f.lost("a1", "a second call of the same dead actor") is None and f.restarts == 1


def test_without_room_the_fleet_carries_on_smaller_and_the_replacement_joins_when_placed():
    f, backend = fleet(room=2)
    backend.placed.discard("a2")  # a2's host is gone, and with it the only room for a rollout actor
    assert f.lost("a2", "its host died") is None
    assert f.actors == ["a1"] and f.recruits == ["a3"] and f.dropped == 1 and f.restarts == 1
    assert f.least_busy({}) == "a1"  # the dead actor's chunk goes to the one that is left
    assert f.admit() == [] and f.actors == ["a1"]  # still no room: nothing joins, nothing waits
    assert backend.waits[-1] == 0.0
    backend.room = 1  # the host is back
    assert f.admit() == ["a3"] and f.actors == ["a1", "a3"] and f.recruits == []
    assert f.admit() == []


def test_the_least_busy_actor_takes_a_re_sent_chunk():
    f, _ = fleet(room=3, target=3)
    assert f.least_busy({id(a): n for a, n in zip(f.actors, (2, 0, 1), strict=True)}) == "a2"
    assert f.least_busy({}) == "a1"


def test_admit_never_grows_the_fleet_past_its_target():
    f, backend = fleet(room=1)  # a2 never placed at start: Ray would queue it; here it is lost at once
    assert f.lost("a2", "never placed") is None and f.recruits == ["a3"]
    f.recruits.append("extra")
    backend.room = 5
    assert f.admit() == ["a3"] and len(f.actors) == 2 and f.recruits == ["extra"]


def test_losing_every_actor_without_room_stops_the_run_with_what_to_do():
    f, backend = fleet(room=2)
    backend.placed.clear()
    assert f.lost("a1", "host died") is None
    with pytest.raises(RolloutCapacityError, match=r"every rollout actor is lost .*replace_wait_s = 7.5"):
        f.lost("a2", "host died")


def test_deaths_past_max_actor_restarts_stop_the_run():
    f, _ = fleet(room=10, max_restarts=1)
    f.lost("a1", "crashed")
    with pytest.raises(RuntimeError, match=r"2 replacements exceed max_actor_restarts = 1"):
        f.lost("a2", "crashed")


def test_close_kills_actors_and_queued_replacements():
    f, backend = fleet(room=2)
    f.lost("a2", "host died")
    f.close()
    assert set(backend.killed) == {"a1", "a2", "a3"} and f.actors == [] and f.recruits == []


# ---------------------------------------------------------------- placement settings


def _spec(*overrides: str):
    return load_stage_config(job.RLConfig, "rl", "micro", ["task=toy", *overrides]).to_spec(cluster_gpus=0)


def test_placement_settings_reach_the_spec_and_the_demand():
    spec = _spec("rollout_resources={rollout_host: 1}", "learner_resources={learner_host: 0.5}",
                 "replace_wait_s=12", "sandbox_actors=0")
    assert spec.rollout_resources == {"rollout_host": 1.0} and spec.learner_resources == {"learner_host": 0.5}
    assert spec.replace_wait_s == 12.0
    bundles = job.demand(spec).bundles
    assert bundles[0] == {"CPU": spec.learner_cpus, "learner_host": 0.5}
    assert bundles[1:] == ({"CPU": spec.rollout_cpus, "rollout_host": 1.0},) * spec.num_rollout_actors
    default = _spec()
    assert default.rollout_resources == {} == default.learner_resources  # today's behaviour: any node
    assert all(set(b) <= {"CPU", "GPU"} for b in job.demand(default).bundles)


def test_a_cluster_without_the_rollout_resource_is_refused_before_any_actor_starts():
    spec = _spec("rollout_resources={rollout_host: 1}", "sandbox_actors=0")
    nodes = ClusterDescription(nodes=[("head", {"CPU": 4.0})], source="test")
    with pytest.raises(UnplaceableError, match="rollout_host"):
        check_placeable(job.demand(spec), nodes)
    with_hosts = ClusterDescription(nodes=[("head", {"CPU": 1.0}), ("w1", {"CPU": 2.0, "rollout_host": 2.0})],
                                    source="test")
    check_placeable(job.demand(spec), with_hosts)


@pytest.mark.parametrize(("setting", "message"), [
    ("rollout_resources={CPU: 2}", "Ray manages itself"),
    ("learner_resources={GPU: 1}", "Ray manages itself"),
    ("rollout_resources={rollout_host: 0}", "must be > 0"),
    ("replace_wait_s=-1", "replace_wait_s"),
])
def test_bad_placement_settings_are_refused_with_a_message(setting, message):
    with pytest.raises(ConfigError, match=message):
        _spec(setting)


def test_the_harness_gives_hosts_the_resources_the_placement_settings_ask_for():
    from cluster.hosts import main, parse_host_resources

    hosts = ["head", "w1", "w2", "w3"]
    assert parse_host_resources(["w1=learner_host:1", "w2,w3=rollout_host:1,big:0.5"], hosts) == {
        "w1": {"learner_host": 1.0}, "w2": {"rollout_host": 1.0, "big": 0.5}, "w3": {"rollout_host": 1.0, "big": 0.5}}
    for bad, message in [("w9=x:1", "no host 'w9'"), ("w1=CPU:2", "set by the harness or Ray"),
                         ("w1=host_w2:1", "set by the harness or Ray"), ("w1=x:0", "must be a number > 0"),
                         ("w1=x:many", "must be a number > 0"), ("w1", "use HOST")]:
        with pytest.raises(Exception, match=message):
            parse_host_resources([bad], hosts)
    # the CLI refuses before making anything: exit 2 and the message
    assert main(["--cluster", "nores", "up", "--workers", "1", "--resources", "w2=rollout_host:1"]) == 2
