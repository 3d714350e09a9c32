"""Leased sessions: what a user's lease runs, and how it ends.

:mod:`.manager` opens, attaches, keeps through a disconnect, parks and
releases sessions; :mod:`.session` is one lease: its cells, pushes, pulls,
files (:mod:`.files`; those a running cell fetches from its notebook's
folder, :mod:`.fetching`) and widgets. A session owns its worker across
restarts (:mod:`.session_worker`), what it writes to the store
(:mod:`.recorder`: each cell's output bounded, :mod:`.output_bound`, and
journaled, and a cell's job, written late when the database was away,
:mod:`.unrecorded`), and the stopper of its running cell
(:mod:`.stopping`: interrupts, restarts, timeouts). :mod:`.parking` parks a
session and resumes it (:mod:`.parked`: what a parked session holds);
:mod:`.batch` runs scripts as jobs with leases of their own;
:mod:`.disk_watch` stops the cells of a user past their disk limit where
the server measures it.

Imports workers, scheduling, isolation, gpus and the store; the front door
and connections import it.
"""

__all__: list[str] = []
