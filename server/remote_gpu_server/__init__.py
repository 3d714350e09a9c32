"""The GPU server: ``rgpu serve``.

One package per responsibility, each a layer that imports only the layers
below it (``import-linter`` checks this; see ``pyproject.toml``):

- :mod:`.app`, :mod:`.config`, :mod:`.cli`: the composition root, the
  configuration and the ``rgpu serve`` / ``rgpu token`` / ``rgpu up``
  commands;
- :mod:`.frontdoor`: the port: TLS, the handshake, the HTTP API, the status
  views and metrics;
- :mod:`.connections`: one client's websocket and what it may hold;
- :mod:`.sessions`: leased sessions and batch jobs, how their cells stop,
  parking;
- :mod:`.cluster`: many machines, through Ray;
- :mod:`.workers`: the server's side of workers: the warm pool, launchers,
  the handle, causes of death, the data channel's server end;
- :mod:`.scheduling`: who gets the next GPU;
- :mod:`.environments`: the Python environments workers run in (``--env``);
- :mod:`.isolation`: who a worker runs as and what it can reach;
- :mod:`.gpus`: slots, NVML readings and health;
- :mod:`.processes`: a worker's processes: where they are, whose a process
  is, and the stop ladder;
- :mod:`.store`: SQLite or PostgreSQL, and the output journal;
- :mod:`.certificates`: the keys and certificates the server makes;
- :mod:`.worker_process`: the code that runs inside a worker process;
- :mod:`.errors`: the server's errors.

Everything here may use :mod:`remote_gpu_core`; nothing imports the client
(:mod:`remote_gpu_kernel`) or the JupyterLab extension.
"""

__all__: list[str] = []
