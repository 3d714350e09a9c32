"""Isolation of workers: who a user's code runs as, and what it can reach.

:mod:`.policy` chooses the server's mode (:mod:`.modes`) and keeps the
leases' session folders (:mod:`.tenant`); :mod:`.worker_isolation` is one
worker's part: what it starts with and takes on at lease time;
:mod:`.identities` and :mod:`.uid_registry` give each user a
uid of their own, unique on the host; :mod:`.sandbox` builds bubblewrap's
sandbox where the server is not root; :mod:`.cgroups`,
:mod:`.memory_limits` and :mod:`.process_limits` bound a worker's memory
and processes; :mod:`.devices` gives a worker its GPUs' device files and no
others; :mod:`.user_disks` gives each user a disk of their own and
:mod:`.folder_removal` deletes ended sessions' folders off the event loop.

Imports the worker process's confinement (the specs a worker is started
with) and nothing else of the server's.
"""

__all__: list[str] = []
