"""The "Remote GPU" Jupyter kernel: a notebook kernel whose cells run on a leased GPU.

Jupyter starts it as ``python -m remote_gpu_kernel.kernel -f CONNECTION``
(the kernelspec that ``rgpu kernel install`` writes, see
:mod:`remote_gpu_kernel.kernelspec`). It runs in the notebook's own
machine and reaches the GPU server through the asyncio client
(:class:`~remote_gpu_kernel.session.AsyncSession`), on the kernel's event
loop.

- :mod:`.kernel`: :class:`RemoteGpuKernel`, the ipykernel ``Kernel`` that
  answers the notebook, and its application;
- :mod:`.cells`: how a cell is read (``%gpu`` lines, ``%%local``);
- :mod:`.lease`: the kernel's hold on its GPU session (lease lazily,
  resume after a dropped connection);
- :mod:`.output`: publishing on IOPub under the notebook's requests;
- :mod:`.comms`: the notebook's comm messages (widgets), forwarded to the
  worker's comms;
- :mod:`.stdin`: a remote ``input()`` answered by the notebook;
- :mod:`.local`: the local namespace where ``%%local`` cells run;
- :mod:`.history`: the kernel's own input history.

It imports the client (never the server) and the shared core.
"""

from __future__ import annotations

from .kernel import LOCAL_LANGUAGE_INFO, RemoteGpuKernel, RemoteGpuKernelApp, main

__all__ = ["LOCAL_LANGUAGE_INFO", "RemoteGpuKernel", "RemoteGpuKernelApp", "main"]
