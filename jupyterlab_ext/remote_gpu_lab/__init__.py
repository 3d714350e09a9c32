"""The "Remote GPU" sidebar for JupyterLab and the jupyter_server extension behind it.

The browser asks this server extension (``/remote-gpu/...``); the extension
asks the GPU server's HTTP API with the URL and token from the user's
configuration (:class:`remote_gpu_core.login.ClientConfig`), so the
token stays on the server side and never reaches the browser.
"""

from __future__ import annotations

from typing import Any

from remote_gpu_core import __version__

from .handlers import setup_handlers

__all__ = ["LABEXTENSION", "__version__", "setup_handlers"]

#: The name in ``package.json``: the folder under ``share/jupyter/labextensions``.
LABEXTENSION = "remote-gpu-lab"


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": LABEXTENSION}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "remote_gpu_lab"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    setup_handlers(server_app.web_app)
    server_app.log.info("remote_gpu_lab: Remote GPU sidebar handlers under /remote-gpu/")
