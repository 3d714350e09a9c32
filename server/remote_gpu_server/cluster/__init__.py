"""Many GPU machines behind one server, through Ray.

:mod:`.nodes` is the head's view of the cluster: its nodes and their GPUs
as slots, watched, and their readings; :mod:`.launcher` starts a Ray actor
per worker on the node the scheduler chose; :mod:`.host` is the actor that
runs on a node and starts the worker there with the node's own isolation;
:mod:`.fence` is Ray's token authentication as the cluster's fence, and how
each node isolates.

Imports workers, isolation and gpus; only the composition root imports it.
"""

__all__: list[str] = []
