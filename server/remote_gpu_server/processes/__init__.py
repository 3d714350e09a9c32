"""A worker's processes: where they are, whose a process is, and how they stop.

:mod:`.ladder` finds every process a worker started (its tree, its
cgroups, its own namespaces, its mark) and stops them: SIGTERM, then
SIGKILL; :mod:`.owners` tells which worker a process (one NVML found on a
GPU, say) belongs to, looked at the same ways.

Imports nothing of the server's: the workers (stopping them) and the GPU
readings (whose process holds a GPU) both use it.
"""

__all__: list[str] = []
