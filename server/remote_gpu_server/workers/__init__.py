"""The server's side of workers.

:mod:`.pool` keeps a warm worker per free slot and asks a launcher
(:mod:`.launcher`: the interface; :mod:`.local_launcher`: this host) for
processes; :mod:`.worker` is the server's handle of one worker (its signed
Jupyter channels, read by :mod:`.fast_session`), :mod:`.transfer_comm` the
server's own comm on it (pushes, pulls, parking) and :mod:`.datachannel`
the data channel's server end that carries their bytes; :mod:`.output`
reads its stdout into the log. :mod:`.comms` keeps the comms open in its
kernel. Stopping and death (with
:mod:`..processes`' stop ladder): :mod:`.death` (why a worker died),
:mod:`.drain` (a slot comes back only once no stopped process holds it),
:mod:`.gpu_fence` (a worker found on a GPU it did not lease is stopped).

Imports isolation, gpus and the worker process's own modules (for the
formats both ends share); sessions and the cluster import it.
"""

__all__: list[str] = []
