"""What the server leases: slots, and what NVML says of them.

:mod:`.slots` names the slots (GPUs or CPU slots) and their inventory;
:mod:`.discovery` finds this host's; :mod:`.readings` reads their use and
health (NVML, or the workers' processes on CPU slots) and :mod:`.history`
keeps minutes of it; :mod:`.xid` watches NVML's Xid events.

Imports nothing of the server's.
"""

__all__: list[str] = []
