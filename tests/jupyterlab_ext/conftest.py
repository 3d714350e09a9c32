"""pytest-jupyter's server fixtures, for the sidebar's tests only.

They are imported here rather than loaded with ``pytest_plugins``: that would
apply the plugin's autouse fixtures (an event loop and a ``ServerApp``
clean-up) and its async-test hooks to every test of the suite, while a
conftest's fixtures and hooks stay in its own folder.
"""

from __future__ import annotations

import pytest

pytest.importorskip("jupyter_server", reason="pip install -e '.[dev]' (jupyterlab, pytest-jupyter)")

from pytest_jupyter.jupyter_server import *  # noqa: E402,F403
