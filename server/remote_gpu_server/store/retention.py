"""Output retention: ``rgpu serve --keep-output DAYS`` prunes old journals in the background.

The output journal is what grows: every line a cell or batch job printed.
:func:`prune_outputs_forever` deletes, now and then, the journal of every
session (a notebook's lease, or one attempt of a batch job) released more
than ``DAYS`` ago (:meth:`~.store.Store.prune_outputs`). Jobs, attempts and
sessions stay, so ``rgpu jobs``, ``rgpu job`` and ``rgpu usage`` keep their
rows and totals; only the output of those jobs is gone. A database that is
away is tried again at the next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from . import Store

__all__ = ["prune_period", "prune_outputs_forever"]

log = logging.getLogger("remote_gpu_server")

#: The longest pause between two rounds, in seconds.
MAX_PERIOD = 3600.0


def prune_period(keep_days: float) -> float:
    """Seconds between two rounds: a tenth of what is kept, at least 1 s, at most an hour."""
    return min(MAX_PERIOD, max(1.0, keep_days * 86400 / 10))


async def prune_outputs_forever(store: Store, keep_days: float,
                                clock: Callable[[], float] = time.time) -> None:
    """Prune journals older than ``keep_days`` now and then, until cancelled."""
    if keep_days <= 0:
        raise ValueError("--keep-output needs a number of days above 0")
    period = prune_period(keep_days)
    while True:
        try:
            deleted = await store.prune_outputs(before=clock() - keep_days * 86400)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is away: the next round tries again
            log.warning("pruning old output failed (%s); trying again in %.0f s", exc, period)
        else:
            if deleted:
                log.info("pruned %d output row(s) of sessions released more than %g day(s) ago",
                         deleted, keep_days)
        await asyncio.sleep(period)
