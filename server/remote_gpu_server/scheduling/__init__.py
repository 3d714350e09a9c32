"""Who gets the next GPU: all of the policy, no I/O of its own.

:mod:`.scheduler` decides (priorities, fair share, quotas, aging, pools,
with an injected clock), :mod:`.queues` keeps the waiting requests and
:mod:`.leases` what was granted; :mod:`.broker` runs it for the server:
grants, queue positions, usage from the store.

Imports the store only.
"""

__all__: list[str] = []
