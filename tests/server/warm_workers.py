"""What a server says of its warm workers, read through its HTTP API."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from remote_gpu_kernel.api import ApiClient

__all__ = ["all_free_and_warm", "worker_waits"]


def worker_waits(api: ApiClient) -> dict[str, int]:
    """How many leases found their slots' worker warm, starting or cold (none),
    from the counts of ``rgpu_lease_worker_wait_seconds`` in ``/metrics``."""
    counts = {"warm": 0, "starting": 0, "cold": 0}
    for family in text_string_to_metric_families(api.metrics()):
        for sample in family.samples:
            if sample.name == "rgpu_lease_worker_wait_seconds_count":
                counts[sample.labels["found"]] = int(sample.value)
    return counts


def all_free_and_warm(api: ApiClient) -> bool:
    """Whether ``/api/status`` lists slots, each free with a warm worker."""
    slots = api.status()["slots"]
    return bool(slots) and all(s["warm"] and s["holder"] is None for s in slots)
