"""Named Python environments: the interpreters workers run in.

The server's own Python is the environment ``default``; ``rgpu serve --env
NAME=PYTHON`` adds more, each an interpreter of a virtual or conda
environment that holds the worker's few requirements. This package owns:

- :mod:`.check`: what a worker needs of an interpreter, and
  :func:`~.check.check_interpreter`, which runs it and says what is missing
  and the pip line that adds it (``rgpu env check PYTHON``);
- :mod:`.catalog`: :class:`~.catalog.Environment` (a checked interpreter:
  its version, prefix, the folders it reads code from, its key packages)
  and :class:`~.catalog.Environments`, the server's set of them;
- :mod:`.worker_code`: the read-only folder that holds only the worker's
  own code (:mod:`remote_gpu_core` and :mod:`remote_gpu_server.worker_process`),
  put on the ``sys.path`` of a named environment's workers so that nothing
  of this project is installed into that environment.

Which environment a slot's warm worker runs is the pool's choice
(:mod:`..workers.pool`); which one a lease asks for is the client's.
"""

from __future__ import annotations

from .catalog import DEFAULT_ENVIRONMENT, Environment, Environments, parse_environment
from .check import REQUIREMENTS, EnvironmentCheck, Requirement, check_interpreter
from .worker_code import WorkerCode

__all__ = ["DEFAULT_ENVIRONMENT", "REQUIREMENTS", "Environment", "EnvironmentCheck", "Environments",
           "Requirement", "WorkerCode", "check_interpreter", "parse_environment"]
