"""The sidebar's error joins the project's tree, with its reason as its code."""

from __future__ import annotations

import pickle

from remote_gpu_core.errors import RemoteGpuError
from remote_gpu_lab import gpu_api
from remote_gpu_lab.errors import GpuApiError


def test_a_sidebar_failure_is_an_error_of_the_tree_whose_code_is_its_reason() -> None:
    error = GpuApiError(502, "unreachable", "The Remote GPU server is not reachable.", "Start it.")
    assert isinstance(error, RemoteGpuError)
    assert error.code == "unreachable" and str(error) == "The Remote GPU server is not reachable."
    assert error.to_json("ws://h:1") == {"reason": "unreachable", "message": "The Remote GPU server is not "
                                         "reachable.", "hint": "Start it.", "url": "ws://h:1"}
    assert gpu_api.GpuApiError is GpuApiError
    assert pickle.loads(pickle.dumps(error)) == error
