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


def pytest_configure(config: pytest.Config) -> None:
    """A browser assertion waits up to 20 s, not Playwright's 5: JupyterLab
    draws a notebook in well under a second on a quiet machine, and in
    several on a busy one; a wait that is the behaviour says its own."""
    try:
        from playwright.sync_api import expect
    except ImportError:
        return
    expect.set_options(timeout=20_000)
