"""Which environment the warm pool warms, and which slot a lease in an environment takes;
a pool that runs only some environments (``--pool NAME=SLOTS:env=A+B``)."""

from __future__ import annotations

from remote_gpu_core.ids import SlotId
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.errors import LeaseError, ProtocolError
from remote_gpu_kernel.client import no_environments
import pytest

from remote_gpu_server.config import parse_pool
from remote_gpu_server.scheduling.scheduler import LeaseRequestEntry, Readiness, Scheduler
from remote_gpu_server.workers.warm_environments import WarmEnvironments


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_environment_gets_a_warm_worker_first_the_default_on_a_tie() -> None:
    choice = WarmEnvironments(["default", "np1", "np2"], Clock())
    assert choice.choose([]) == "default"
    assert choice.choose(["default"]) == "np1"
    assert choice.choose(["default", "np1"]) == "np2"


def test_the_slots_beyond_one_each_go_to_the_busy_environment_until_its_demand_decays() -> None:
    clock = Clock()
    choice = WarmEnvironments(["default", "np1"], clock, half_life=60)
    for _ in range(5):
        choice.asked("np1")
    assert choice.choose(["default", "np1"]) == "np1"
    assert choice.choose(["default", "np1", "np1"]) == "np1"
    clock.now = 3600  # an hour later the burst no longer counts
    choice.asked("default")
    assert choice.choose(["default", "np1"]) == "default"


def test_a_slot_of_a_pool_that_runs_only_some_environments_warms_only_those() -> None:
    choice = WarmEnvironments(["default", "np1", "np2"], Clock())
    assert choice.choose([], ["np2"]) == "np2"
    assert choice.choose(["np2"], ["np1", "np2"]) == "np1"
    assert choice.choose(["np1", "np2", "default"], ["np1"]) == "np1"


def test_a_pools_environments_are_parsed_and_a_lease_there_gets_one_of_them() -> None:
    pool = parse_pool("jax=gpu2,gpu3:idle=900:env=np1+np2")
    assert pool.slots == ("gpu2", "gpu3") and pool.idle_timeout == 900 and pool.environments == ("np1", "np2")
    assert pool.environment("default") == "np1"  # a lease that names none gets the pool's first
    assert pool.environment("np2") == "np2"
    with pytest.raises(ValueError, match="pool 'jax' runs environment\\(s\\) np1, np2, not 'other': ask"):
        pool.environment("other")
    assert parse_pool("any=gpu0").environment("np2") == "np2"  # a pool that names none runs every one
    with pytest.raises(ValueError, match="env needs an environment's name"):
        parse_pool("jax=gpu2:env=")


def test_an_unknown_environment_is_refused_naming_the_known_ones() -> None:
    choice = WarmEnvironments(["default", "np1"])
    assert choice.unknown("np1") is None
    assert choice.unknown("np3") == ("there is no environment 'np3' on this server; it has: default, np1 "
                                     "(rgpu envs lists them)")


def test_a_lease_takes_the_slot_warm_in_its_environment_and_another_environments_last() -> None:
    gpu0, gpu1, gpu2 = SlotId("gpu0"), SlotId("gpu1"), SlotId("gpu2")
    sched = Scheduler([gpu0, gpu1, gpu2])
    sched.set_readiness(gpu0, Readiness.WARM, "default")
    sched.set_readiness(gpu1, Readiness.WARM, "np1")
    (grant,) = sched.submit(LeaseRequestEntry(1, "alice", 1, 0.0, environment="np1"))
    assert grant.slots == (gpu1,)
    # No slot warm in np2: the cold one, not the default's warm worker.
    (grant,) = sched.submit(LeaseRequestEntry(2, "bob", 1, 0.0, environment="np2"))
    assert grant.slots == (gpu2,)
    (grant,) = sched.submit(LeaseRequestEntry(3, "carol", 1, 0.0))
    assert grant.slots == (gpu0,)


def test_a_default_lease_request_has_no_env_field_so_that_older_servers_take_it() -> None:
    assert "env" not in m.LeaseRequest(1).fields()
    assert m.LeaseRequest(1, env="np1").fields()["env"] == "np1"
    decoded = m.message_from_fields({"t": "lease_request", **m.LeaseRequest(1, env="np1").fields()})
    assert decoded == m.LeaseRequest(1, env="np1")


def test_an_older_servers_refusal_of_the_env_field_says_it_has_no_environments() -> None:
    refused = ProtocolError("protocol error: lease_request: unexpected field 'env'")
    error = no_environments(refused, "np1", "0.9")
    assert isinstance(error, LeaseError)
    assert "has no named environments" in str(error) and "'np1'" in str(error)
    assert no_environments(refused, "default", "0.9") is refused
