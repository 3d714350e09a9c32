"""The code that runs inside a worker process.

A worker is ``python -m remote_gpu_server.worker_process.kernel``: an
ipykernel (:mod:`.kernel`) that first confines itself (:mod:`.confinement`,
:mod:`.user_namespaces`), keeps its IOPub pipe private (:mod:`.iopub`),
moves variables and files through the data channel (:mod:`.transfer`: the
shared ring; :mod:`.sealed`: sealed records across hosts; :mod:`.files`),
fetches the files a cell opens from the notebook's folder (:mod:`.fetch`),
saves and restores its namespace when parked (:mod:`.parked_namespace`) and
explains its errors (:mod:`.errors`).

Imports only :mod:`remote_gpu_core`, the standard library and third-party
packages: never the rest of the server, which runs in another process. The
server imports the formats and specs defined here.
"""

__all__: list[str] = []
