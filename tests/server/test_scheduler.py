"""The scheduler's rules one by one, with a fake clock and no sockets."""

from __future__ import annotations

import itertools
import math
import random

import pytest

import remote_gpu_server.scheduling.scheduler as scheduler_module
from remote_gpu_core.errors import LeaseError
from remote_gpu_core.ids import SlotId
from remote_gpu_server.scheduling.scheduler import (
    Grant, LeaseRequestEntry, PoolConfig, Quota, QuotaExceeded, Readiness, Scheduler, SchedulerConfig
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_keys = itertools.count(1)


def req(user: str, gpus: int = 1, priority: str = "normal", pool: str = "default") -> LeaseRequestEntry:
    return LeaseRequestEntry(next(_keys), user, gpus, 0.0, priority, pool)


def slots(n: int) -> list[SlotId]:
    return [SlotId(f"gpu{i}") for i in range(n)]


def make(n: int = 1, **config: object) -> tuple[Scheduler, Clock]:
    clock = Clock()
    return Scheduler(slots(n), SchedulerConfig(**config), clock=clock), clock  # type: ignore[arg-type]


def users(grants: list[Grant]) -> list[str]:
    return [g.request.user for g in grants]


def test_exports() -> None:
    for name in scheduler_module.__all__:
        assert hasattr(scheduler_module, name)
    assert "Scheduler" in scheduler_module.__all__ and "QuotaExceeded" in scheduler_module.__all__


def test_defaults_keep_the_old_calling_shape() -> None:
    sched = Scheduler(slots(2))
    first = LeaseRequestEntry(1, "alice", 2, 0.0)
    assert first.priority == "normal" and first.pool == "default"
    assert sched.submit(first) == [Grant(first, (SlotId("gpu0"), SlotId("gpu1")))]
    assert sched.free == []
    second = LeaseRequestEntry(2, "bob", 1, 0.0)
    assert sched.submit(second) == []
    assert sched.waiting == [second]
    assert sched.positions() == {2: 1}
    assert users(sched.release([SlotId("gpu1")])) == ["bob"]
    assert sched.free == []
    assert sched.release([SlotId("gpu0"), SlotId("gpu1")]) == []
    assert sched.free == slots(2)


def test_high_before_normal_before_low() -> None:
    sched, _ = make(1)
    sched.submit(req("holder"))
    low, normal, high = req("l", priority="low"), req("n"), req("h", priority="high")
    for r in (low, normal, high):
        assert sched.submit(r) == []
    assert sched.positions() == {high.key: 1, normal.key: 2, low.key: 3}
    assert users(sched.release(slots(1))) == ["h"]
    assert users(sched.release(slots(1))) == ["n"]
    assert users(sched.release(slots(1))) == ["l"]


def test_same_priority_least_recent_gpu_time_first() -> None:
    sched, clock = make(2, half_life=math.inf)
    sched.submit(req("alice"))
    sched.submit(req("bob"))
    clock.now += 100
    assert users(sched.release([SlotId("gpu0")])) == []  # nobody waits; alice: 100 s
    clock.now += 50  # bob: 150 s
    assert sched.usage("alice") == pytest.approx(100)
    assert sched.usage("bob") == pytest.approx(150)
    from_bob, from_alice, from_carol = req("bob"), req("alice"), req("carol")
    sched.submit(req("bob"))  # takes the free slot: bob now holds two
    for r in (from_bob, from_alice, from_carol):
        assert sched.submit(r) == []
    # carol never used a GPU, then alice (100 s), then bob (150 s and growing).
    assert sched.positions() == {from_carol.key: 1, from_alice.key: 2, from_bob.key: 3}
    assert users(sched.release([SlotId("gpu1")])) == ["carol"]


def test_fair_share_counts_slots_times_time() -> None:
    sched, clock = make(3, half_life=math.inf)
    sched.submit(req("wide", gpus=2))
    sched.submit(req("narrow", gpus=1))
    clock.now += 10
    assert sched.usage("wide") == pytest.approx(20)
    assert sched.usage("narrow") == pytest.approx(10)
    assert sched.usage("nobody") == 0.0


def test_half_life_decay() -> None:
    sched, clock = make(1, half_life=60.0)
    sched.submit(req("alice"))
    clock.now += 60
    sched.release(slots(1))
    held = 60 / math.log(2) * 0.5  # integral of 0.5 ** ((60 - s) / 60) over 60 s
    assert sched.usage("alice") == pytest.approx(held)
    clock.now += 60
    assert sched.usage("alice") == pytest.approx(held / 2)
    clock.now += 120
    assert sched.usage("alice") == pytest.approx(held / 8)


def test_decay_lets_an_old_heavy_user_pass_a_recent_light_one() -> None:
    sched, clock = make(1, half_life=60.0)
    sched.submit(req("heavy"))
    clock.now += 600  # heavy holds 600 s, long ago
    sched.submit(req("light"))
    sched.release(slots(1))
    clock.now += 60  # light holds 60 s, just now
    first_heavy, first_light = req("heavy"), req("light")
    sched.submit(first_light)
    sched.submit(first_heavy)
    # Undecayed, heavy used 10x more; decayed, heavy's usage is older and smaller.
    assert sched.usage("heavy") < sched.usage("light")
    assert users(sched.release(slots(1))) == ["heavy"]


def test_a_user_with_no_decay_would_keep_losing() -> None:
    sched, clock = make(1, half_life=math.inf)
    sched.submit(req("heavy"))
    clock.now += 600
    sched.submit(req("light"))
    sched.release(slots(1))
    clock.now += 60
    sched.submit(req("light"))
    sched.submit(req("heavy"))
    assert users(sched.release(slots(1))) == ["light"]


def test_gpu_quota_is_refused_at_once_with_the_quota_named() -> None:
    sched, _ = make(4, default_quota=Quota(max_gpus=2))
    sched.submit(req("alice"))
    sched.submit(req("alice"))
    before = (sched.free, sched.waiting)
    with pytest.raises(QuotaExceeded) as refused:
        sched.submit(req("alice"))
    assert str(refused.value).startswith(
        "quota: alice may hold at most 2 GPU(s) at once (max_gpus=2); 2 held, 0 asked for")
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, LeaseError)
    assert (sched.free, sched.waiting) == before
    assert users(sched.submit(req("bob", gpus=2))) == ["bob"]


def test_gpu_quota_counts_what_waiting_requests_ask_for() -> None:
    sched, _ = make(1, default_quota=Quota(max_gpus=2))
    sched.submit(req("alice"))
    sched.submit(req("alice"))  # waits for the slot alice holds
    with pytest.raises(QuotaExceeded, match=r"\(max_gpus=2\); 1 held, 1 asked for by waiting"):
        sched.submit(req("alice"))


def test_per_user_quota_overrides_the_default() -> None:
    sched, _ = make(4, default_quota=Quota(max_gpus=1),
                    user_quotas={"lead": Quota(max_gpus=3), "guest": Quota(max_gpus=0)})
    assert users(sched.submit(req("lead", gpus=3))) == ["lead"]
    with pytest.raises(QuotaExceeded, match=r"^quota: guest may hold at most 0 GPU\(s\) at once \(max_gpus=0\)"):
        sched.submit(req("guest"))
    with pytest.raises(QuotaExceeded, match=r"^quota: other may hold at most 1 GPU\(s\) at once \(max_gpus=1\)"):
        sched.submit(req("other", gpus=2))


def test_waiting_quota() -> None:
    sched, _ = make(1, default_quota=Quota(max_waiting=2))
    sched.submit(req("bob"))  # holds the slot; not waiting
    sched.submit(req("alice"))
    sched.submit(req("alice"))
    with pytest.raises(QuotaExceeded) as refused:
        sched.submit(req("alice"))
    assert str(refused.value) == ("quota: alice may have at most 2 request(s) waiting (max_waiting=2); "
                                  "2 already waiting: cancel one or wait for a grant")
    sched.cancel(sched.waiting[0].key)
    assert sched.submit(req("alice")) == []


def test_aging_serves_a_low_request_within_max_wait_under_a_stream() -> None:
    """One slot, 10 s leases, a high or normal request every 5 s: twice what it can serve."""
    max_wait, lease = 120.0, 10.0
    sched, clock = make(1, max_wait=max_wait)
    start = clock.now
    sched.submit(req("busy"))
    low = req("patient", priority="low")
    sched.submit(low)
    served_at = None
    holder_since = clock.now
    for step in range(1, 200):
        clock.now = start + 5 * step
        sched.submit(req(f"u{step % 7}", priority="high" if step % 2 else "normal"))
        if clock.now - holder_since >= lease:
            grants = sched.release(slots(1))
            holder_since = clock.now
            if grants[0].request.key == low.key:
                served_at = clock.now - start
                break
    assert served_at is not None
    # Not before its bound (others outrank it), and at the first release after it.
    assert max_wait <= served_at <= max_wait + lease


def test_overdue_requests_go_oldest_first_whatever_their_priority() -> None:
    sched, clock = make(1, max_wait=60.0)
    sched.submit(req("holder"))
    old_low = req("a", priority="low")
    sched.submit(old_low)
    clock.now += 1
    old_normal = req("b")
    sched.submit(old_normal)
    clock.now += 60
    fresh_high = req("c", priority="high")
    sched.submit(fresh_high)
    assert sched.positions() == {old_low.key: 1, old_normal.key: 2, fresh_high.key: 3}
    assert users(sched.release(slots(1))) == ["a"]


def test_only_the_front_of_a_users_queue_ages() -> None:
    """Queueing many requests early buys no precedence: the next one ages from
    the moment the one before it is served."""
    sched, clock = make(2, half_life=math.inf, max_wait=100.0)
    sched.submit(req("alice"))
    clock.now += 500
    sched.release(slots(1))  # alice: 500 GPU-s
    sched.submit(req("x"))
    sched.submit(req("y"))
    a1, a2 = req("alice"), req("alice")
    sched.submit(a1)
    sched.submit(a2)
    clock.now += 10
    b1 = req("bob")
    sched.submit(b1)
    assert sched.positions() == {b1.key: 1, a1.key: 2, a2.key: 3}
    clock.now += 90  # a1 has waited max_wait; a2 has not begun to age
    assert sched.positions() == {a1.key: 1, b1.key: 2, a2.key: 3}
    assert [g.request.key for g in sched.release([SlotId("gpu0")])] == [a1.key]
    assert [g.request.key for g in sched.release([SlotId("gpu1")])] == [b1.key]


def test_a_big_request_is_not_overtaken_by_small_ones() -> None:
    sched, _ = make(2)
    sched.submit(req("a"))
    sched.submit(req("b"))
    big = req("big", gpus=2)
    sched.submit(big)
    small = req("small")
    sched.submit(small)
    assert sched.release([SlotId("gpu0")]) == []  # one free slot is kept for the big one
    assert sched.free == [SlotId("gpu0")]
    assert [g.request.key for g in sched.release([SlotId("gpu1")])] == [big.key]
    assert sched.positions() == {small.key: 1}


def test_a_big_request_reaches_the_head_by_aging() -> None:
    """A heavy user's big request ranks last by fair share, then ages to the head."""
    sched, clock = make(2, max_wait=100.0, half_life=math.inf)
    sched.submit(req("big", gpus=2))
    clock.now += 1000  # big has 2000 GPU-s
    sched.release(slots(2))
    sched.submit(req("x"))
    sched.submit(req("y"))
    big = req("big", gpus=2)
    sched.submit(big)
    start = clock.now
    for step in range(1, 100):
        clock.now = start + 10 * step
        sched.submit(req(f"s{step % 5}"))
        grants = sched.release([sched.holders()[0].slots[0]])
        if any(g.request.key == big.key for g in grants):
            break
    assert 100 <= clock.now - start <= 120


def test_multi_slot_lease_takes_free_slots_of_its_pool() -> None:
    sched, _ = make(4)
    sched.submit(req("a"))
    grant = sched.submit(req("b", gpus=3))
    assert grant[0].slots == (SlotId("gpu1"), SlotId("gpu2"), SlotId("gpu3"))
    with pytest.raises(ValueError, match="has 4 slot"):
        sched.submit(req("c", gpus=5))


def test_pools_are_separate_with_their_own_quotas_and_idle_timeout() -> None:
    pools = (PoolConfig("interactive", (SlotId("gpu0"),), idle_timeout=600.0,
                        default_quota=Quota(max_gpus=1)),
             PoolConfig("batch", (SlotId("gpu1"), SlotId("gpu2")), idle_timeout=None))
    clock = Clock()
    sched = Scheduler(slots(4), SchedulerConfig(pools=pools), clock=clock)
    assert [p.name for p in sched.pools] == ["interactive", "batch", "default"]
    assert sched.pool_of(SlotId("gpu3")).slots == (SlotId("gpu3"),)
    assert sched.pool_of(SlotId("gpu0")).idle_timeout == 600.0
    assert sched.submit(req("a", pool="interactive"))[0].slots == (SlotId("gpu0"),)
    assert sched.submit(req("b", pool="interactive")) == []  # interactive is full
    assert sched.submit(req("c", gpus=2, pool="batch"))[0].slots == (SlotId("gpu1"), SlotId("gpu2"))
    waiting_batch = req("d", pool="batch")
    assert sched.submit(waiting_batch) == []
    with pytest.raises(QuotaExceeded, match=r"^quota: a may hold at most 1 GPU\(s\) at once in pool 'interactive'"):
        sched.submit(req("a", pool="interactive"))
    assert users(sched.submit(req("a"))) == ["a"]  # the default pool is not limited
    assert sched.positions()[waiting_batch.key] == 1  # positions count per pool
    assert users(sched.release([SlotId("gpu0")])) == ["b"]
    with pytest.raises(ValueError, match="there is no pool 'gpu'"):
        sched.submit(req("a", pool="gpu"))


def test_a_pool_naming_an_unknown_or_shared_slot_is_refused() -> None:
    with pytest.raises(ValueError, match="does not have"):
        Scheduler(slots(1), SchedulerConfig(pools=(PoolConfig("p", (SlotId("gpu9"),)),)))
    twice = (PoolConfig("p", (SlotId("gpu0"),)), PoolConfig("q", (SlotId("gpu0"),)))
    with pytest.raises(ValueError, match="more than one pool"):
        Scheduler(slots(1), SchedulerConfig(pools=twice))


def test_cancel_removes_a_waiting_request_and_unblocks_the_queue() -> None:
    sched, _ = make(2)
    sched.submit(req("a"))
    big, small = req("big", gpus=2), req("small")
    sched.submit(big)
    sched.submit(small)
    assert sched.positions() == {big.key: 1, small.key: 2}
    assert users(sched.cancel(big.key)) == ["small"]
    assert sched.waiting == [] and sched.positions() == {}
    assert sched.cancel(big.key) == []  # unknown keys are a no-op


def test_holders_and_release_checks() -> None:
    sched, clock = make(3)
    first = req("a", gpus=2)
    sched.submit(first)
    clock.now += 5
    second = req("b")
    sched.submit(second)
    assert [(h.request.key, h.slots, h.since) for h in sched.holders()] == [
        (first.key, (SlotId("gpu0"), SlotId("gpu1")), 1000.0), (second.key, (SlotId("gpu2"),), 1005.0)]
    sched.release([SlotId("gpu0")])
    assert sched.holders()[0].slots == (SlotId("gpu1"),)
    with pytest.raises(ValueError, match="gpu0 is not leased"):
        sched.release([SlotId("gpu1"), SlotId("gpu0")])
    assert len(sched.holders()) == 2  # nothing changed


def test_bad_requests_change_nothing() -> None:
    sched, _ = make(1)
    good = req("a")
    sched.submit(good)
    with pytest.raises(ValueError, match="priority must be one of high, normal, low"):
        sched.submit(req("a", priority="urgent"))
    with pytest.raises(ValueError, match="at least one slot"):
        sched.submit(req("a", gpus=0))
    with pytest.raises(ValueError, match="already in use"):
        sched.submit(good)
    assert sched.waiting == []


def test_usage_survives_many_half_lives() -> None:
    sched, clock = make(1, half_life=1.0)
    sched.submit(req("a"))
    clock.now += 5000.0  # far past the point where 2 ** (t / half_life) overflows
    assert sched.usage("a") == pytest.approx(1 / math.log(2))
    sched.release(slots(1))
    clock.now += 1.0
    assert sched.usage("a") == pytest.approx(0.5 / math.log(2))


def test_tick_grants_once_aging_moves_a_request_above_a_blocked_one() -> None:
    sched, clock = make(2, half_life=math.inf, max_wait=50.0)
    sched.submit(req("heavy", gpus=2))
    clock.now += 100
    sched.release(slots(2))  # heavy: 200 GPU-s
    sched.submit(req("x"))
    sched.submit(req("y"))
    aging = req("heavy")
    sched.submit(aging)
    clock.now += 1
    blocked = req("fresh", gpus=2)
    sched.submit(blocked)
    assert sched.release([SlotId("gpu1")]) == []  # fresh ranks first and needs 2
    assert sched.positions() == {blocked.key: 1, aging.key: 2}
    clock.now += 48
    assert sched.tick() == []
    clock.now += 1  # heavy's request has waited max_wait; fresh's has not
    assert [g.request.key for g in sched.tick()] == [aging.key]


def test_users_holding_fewer_slots_now_go_first() -> None:
    """A lease's GPU time counts only as it passes, so a user who was just
    granted a slot would look cheap; users holding fewer slots go first."""
    sched, clock = make(2, half_life=math.inf)
    sched.submit(req("bob"))
    clock.now += 100
    sched.release(slots(1))  # bob: 100 GPU-s, holds nothing
    sched.submit(req("z"))
    assert users(sched.submit(req("alice"))) == ["alice"]  # alice: 0 GPU-s, holds one
    sched.submit(req("alice"))
    sched.submit(req("bob"))
    assert sched.usage("alice") < sched.usage("bob")
    assert users(sched.release([SlotId("gpu0")])) == ["bob"]


def test_positions_interleave_users_by_slots_they_will_hold() -> None:
    sched, _ = make(1)
    sched.submit(req("holder"))
    a1, a2, b1 = req("alice"), req("alice"), req("bob")
    for r in (a1, a2, b1):
        sched.submit(r)
    assert sched.positions() == {a1.key: 1, b1.key: 2, a2.key: 3}


@pytest.mark.parametrize("seed", range(5))
def test_positions_are_the_order_of_service(seed: int) -> None:
    """Freeing slots one at a time, at one instant, serves requests in position order."""
    rng = random.Random(seed)
    sched, clock = make(4, half_life=300.0, max_wait=200.0)
    for _ in range(60):  # a history of leases: usage, slots held, some overdue requests
        clock.now += rng.uniform(0, 20)
        if not sched.free or rng.random() < 0.4:
            holders = sched.holders()
            if holders:
                sched.release([rng.choice(holders).slots[0]])
        sched.submit(req(f"u{rng.randrange(6)}", priority=rng.choice(["high", "normal", "low"])))
    expected = sorted(sched.positions().items(), key=lambda item: item[1])
    served: list[int] = []
    while sched.waiting:
        for grant in sched.release([sched.holders()[0].slots[0]]):
            served.append(grant.request.key)
    assert served == [key for key, _ in expected]


def test_an_unhealthy_slot_is_neither_free_nor_granted_until_it_recovers() -> None:
    sched, _ = make(2)
    gpu0, gpu1 = slots(2)
    assert sched.set_healthy(gpu0, False) == []
    assert sched.free == [gpu1] and sched.unhealthy == [gpu0]
    assert users(sched.submit(req("a"))) == ["a"]
    assert sched.holders()[0].slots == (gpu1,)
    waiting = req("b")
    assert sched.submit(waiting) == []
    assert sched.positions() == {waiting.key: 1}
    assert sched.set_healthy(gpu0, False) == []  # no change, no grant
    grants = sched.set_healthy(gpu0, True)
    assert grants == [Grant(waiting, (gpu0,))]
    assert sched.unhealthy == [] and sched.free == []
    assert sched.set_healthy(gpu0, True) == []


def test_a_lease_keeps_a_slot_that_turns_unhealthy_which_stays_out_after_release() -> None:
    sched, _ = make(1)
    gpu0 = slots(1)[0]
    sched.submit(req("a"))
    assert sched.set_healthy(gpu0, False) == []
    assert [h.slots for h in sched.holders()] == [(gpu0,)]  # not taken away
    later = req("b")
    assert sched.submit(later) == []
    assert sched.release([gpu0]) == []  # back, but not free
    assert sched.free == [] and sched.holders() == [] and sched.waiting == [later]
    assert sched.set_healthy(gpu0, True) == [Grant(later, (gpu0,))]


def test_a_request_too_big_for_the_healthy_slots_does_not_hold_up_the_pool() -> None:
    sched, _ = make(2)
    gpu0, gpu1 = slots(2)
    sched.set_healthy(gpu1, False)
    big, small = req("a", gpus=2), req("b")
    assert sched.submit(big) == []  # it fits the pool, once gpu1 recovers
    assert sched.submit(small) == [Grant(small, (gpu0,))]
    sched.release([gpu0])
    assert sched.set_healthy(gpu1, True) == [Grant(big, (gpu0, gpu1))]


def test_a_slot_turning_unhealthy_lets_a_smaller_request_pass_a_blocked_big_one() -> None:
    sched, _ = make(2)
    gpu0, gpu1 = slots(2)
    sched.submit(req("holder"))  # gpu0
    big, small = req("a", gpus=2), req("b")
    sched.submit(big)
    assert sched.submit(small) == []  # no overtaking while the big one can be granted
    assert sched.set_healthy(gpu0, False) == [Grant(small, (gpu1,))]
    assert [h.slots for h in sched.holders()] == [(gpu0,), (gpu1,)]
    assert sched.waiting == [big] and sched.positions() == {big.key: 1}


def test_set_healthy_of_an_unknown_slot_is_refused() -> None:
    sched, _ = make(1)
    with pytest.raises(ValueError, match="no slot"):
        sched.set_healthy(SlotId("gpu9"), False)


def test_slots_that_join_are_granted_in_their_pool() -> None:
    scheduler, _ = make(1)
    assert users(scheduler.submit(req("alice"))) == ["alice"]
    assert scheduler.submit(req("bob")) == []
    grants = scheduler.add_slots([SlotId("node2/gpu0"), SlotId("node2/gpu1")])
    assert [(g.request.user, g.slots) for g in grants] == [("bob", ("node2/gpu0",))]
    assert scheduler.free == ["node2/gpu1"]
    # Slots that name a pool no one configured make it.
    assert scheduler.add_slots([SlotId("node3/gpu0")], pool="batch") == []
    assert scheduler.pool_of(SlotId("node3/gpu0")).name == "batch"
    assert users(scheduler.submit(req("carol", pool="batch"))) == ["carol"]
    with pytest.raises(ValueError, match="already known"):
        scheduler.add_slots([SlotId("gpu0")])


def test_a_lease_spans_one_node() -> None:
    nodes = {SlotId("a/gpu0"): "a", SlotId("a/gpu1"): "a", SlotId("b/gpu0"): "b", SlotId("b/gpu1"): "b"}
    scheduler = Scheduler(list(nodes), nodes=nodes)
    alice, bob, erin = req("alice"), req("bob"), req("erin")
    for r in (alice, bob, erin):
        scheduler.submit(r)
    assert scheduler.free == ["b/gpu1"]  # one node is filled before the next
    scheduler.release([SlotId("a/gpu1")])
    # Two slots are free on two nodes, not on one: the pair waits, and nobody overtakes it.
    assert scheduler.submit(req("carol", gpus=2)) == []
    assert scheduler.submit(req("dave")) == []
    grants = scheduler.release([SlotId("b/gpu0")])
    assert [(g.request.user, g.slots) for g in grants] == [("carol", ("b/gpu0", "b/gpu1")),
                                                           ("dave", ("a/gpu1",))]
    with pytest.raises(ValueError, match="at most 2 slot.*on one node"):
        scheduler.submit(req("frank", gpus=3))


# -- which free slot a grant takes: warm workers first ---------------------

def test_a_lease_takes_a_warm_free_slot_over_a_cold_one_of_its_pool() -> None:
    sched, _ = make(3)
    gpu0, gpu1, gpu2 = slots(3)
    sched.set_readiness(gpu0, Readiness.STARTING)  # the slot a session just released
    sched.set_readiness(gpu1, Readiness.COLD)
    sched.set_readiness(gpu2, Readiness.WARM)
    alice = req("alice")
    assert sched.submit(alice) == [Grant(alice, (gpu2,))]


def test_with_no_warm_slot_a_lease_takes_the_one_whose_worker_started_first() -> None:
    sched, clock = make(3)
    gpu0, gpu1, gpu2 = slots(3)
    sched.set_readiness(gpu0, Readiness.COLD)
    sched.set_readiness(gpu2, Readiness.STARTING)
    clock.now += 1
    sched.set_readiness(gpu1, Readiness.STARTING)
    first, second, third = req("a"), req("b"), req("c")
    assert sched.submit(first)[0].slots == (gpu2,)  # it will be warm soonest
    assert sched.submit(second)[0].slots == (gpu1,)
    assert sched.submit(third)[0].slots == (gpu0,)  # no worker at all: a full start


def test_warm_slots_go_in_the_pools_order() -> None:
    sched, _ = make(3)
    for slot in slots(3):
        sched.set_readiness(slot, Readiness.WARM)
    assert [sched.submit(req(u))[0].slots for u in "abc"] == [(s,) for s in slots(3)]


def test_warmth_changes_which_slot_a_grant_takes_never_who_is_granted() -> None:
    sched, _ = make(2, max_wait=math.inf)
    gpu0, gpu1 = slots(2)
    sched.submit(req("holder"))  # gpu0
    sched.submit(req("holder"))  # gpu1
    low, normal, high = req("l", priority="low"), req("n"), req("h", priority="high")
    for request in (low, normal, high):
        assert sched.submit(request) == []
    before = sched.positions()
    sched.set_readiness(gpu1, Readiness.WARM)  # no grant, no new ranks
    assert sched.positions() == before
    sched.set_readiness(gpu0, Readiness.STARTING)
    assert sched.release([gpu0]) == [Grant(high, (gpu0,))]
    sched.set_readiness(gpu0, Readiness.STARTING)
    assert sched.release([gpu0]) == [Grant(normal, (gpu0,))]
    assert sched.positions() == {low.key: 1}


def test_a_warm_slot_of_another_pool_is_not_taken() -> None:
    gpu0, gpu1 = slots(2)
    sched = Scheduler([gpu0, gpu1], SchedulerConfig(pools=(PoolConfig("big", (gpu1,)),)))
    sched.set_readiness(gpu0, Readiness.STARTING)
    sched.set_readiness(gpu1, Readiness.WARM)
    alice = req("alice")
    assert sched.submit(alice) == [Grant(alice, (gpu0,))]


def test_a_several_slot_lease_takes_the_node_where_it_discards_fewest_warm_workers() -> None:
    # Such a lease starts a worker of its own on all its slots: warm workers
    # there are thrown away, and are better left to one-slot leases.
    nodes = {SlotId("a/gpu0"): "a", SlotId("a/gpu1"): "a", SlotId("b/gpu0"): "b", SlotId("b/gpu1"): "b"}
    sched = Scheduler(list(nodes), nodes=nodes)
    sched.set_readiness(SlotId("a/gpu0"), Readiness.WARM)
    sched.set_readiness(SlotId("a/gpu1"), Readiness.WARM)
    sched.set_readiness(SlotId("b/gpu1"), Readiness.STARTING)
    pair = req("alice", gpus=2)
    assert sched.submit(pair) == [Grant(pair, (SlotId("b/gpu0"), SlotId("b/gpu1")))]
    # The only node left with two free slots is all warm: granted there all the same.
    other = req("bob", gpus=2)
    assert sched.submit(other) == [Grant(other, (SlotId("a/gpu0"), SlotId("a/gpu1")))]


def test_on_its_node_a_several_slot_lease_takes_the_coldest_slots() -> None:
    sched, clock = make(4)
    gpu0, gpu1, gpu2, gpu3 = slots(4)
    sched.set_readiness(gpu0, Readiness.WARM)
    sched.set_readiness(gpu1, Readiness.STARTING)
    clock.now += 1
    sched.set_readiness(gpu2, Readiness.STARTING)  # warm later than gpu1
    sched.set_readiness(gpu3, Readiness.COLD)
    pair = req("alice", gpus=2)
    assert sched.submit(pair) == [Grant(pair, (gpu2, gpu3))]


def test_readiness_may_come_before_its_slot_joins() -> None:
    # A node's slots reach the warm pool before the scheduler hears of them.
    sched, _ = make(1)
    sched.set_readiness(SlotId("gpu0"), Readiness.STARTING)
    sched.set_readiness(SlotId("node2/gpu0"), Readiness.WARM)
    sched.add_slots([SlotId("node2/gpu0")])
    alice = req("alice")
    assert sched.submit(alice) == [Grant(alice, (SlotId("node2/gpu0"),))]
