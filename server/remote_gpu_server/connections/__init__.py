"""One client's websocket: the sans-I/O protocol in, requests as tasks.

:mod:`.connection` runs one client's connection within the bounds of
:mod:`.limits` (what one client may send) and :mod:`.memory` (what its
messages make the server hold, a push's backpressure), and answers what it
refuses through :mod:`.refusals` (the answers it owes, what a refusal for
size says); :mod:`.per_user`
bounds each user's open connections and :mod:`.heap_trim` gives their memory
back once they close.

Imports sessions, scheduling and the store; only the front door imports it.
"""

__all__: list[str] = []
