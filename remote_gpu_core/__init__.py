"""What every part of remote-gpu-kernel shares: the client, the server, the
code inside a worker and the JupyterLab extension.

- :mod:`.protocol`: the sans-I/O protocol (messages, framing,
  serialization of variables, limits), tested with bytes, no sockets;
- :mod:`.ids`: the ids that cross between the parts;
- :mod:`.errors`: the one error tree, rooted at :class:`~.errors.RemoteGpuError`;
- :mod:`.sizes`: sizes in and out (``8G``, ``512 MiB``);
- :mod:`.tls`: how a client checks a server (certificates, tokens in clear
  only to loopback);
- :mod:`.login`: the server and token a user saved (``rgpu login``);
- :mod:`.ipykernel_app`: ipykernel as the Remote GPU kernel and every
  worker run it.

Importable without websockets or an event loop; imports no other package of
this project.
"""

__all__ = ["__version__"]

#: The version of every part (they are one distribution).
__version__ = "0.1.0"
