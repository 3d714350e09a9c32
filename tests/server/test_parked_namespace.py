"""A namespace saved to a folder and loaded back, as a parked worker does it (no server)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from remote_gpu_server.worker_process import parked_namespace as pn


def run(code: str) -> dict[str, Any]:
    """A namespace as a notebook's cells would leave it."""
    ns: dict[str, Any] = {"__builtins__": __builtins__, "__name__": "__main__"}
    exec(code, ns)
    return ns


def park(ns: dict[str, Any], folder: Path, limit: int | None = None) -> pn.Saved:
    names = pn.savable_names(ns, {})
    return pn.save({n: ns[n] for n in names}, folder, limit, namespace=ns)


def restore(folder: Path) -> tuple[dict[str, Any], pn.Restored]:
    ns: dict[str, Any] = {"__builtins__": __builtins__, "__name__": "__main__"}
    restored = pn.load(folder, ns)
    ns.update(restored.values)
    return ns, restored


def test_arrays_come_back_equal_and_still_shared(tmp_path: Path) -> None:
    ns = run("import numpy as np\n"
             "a = np.arange(1_000_000, dtype=np.float32).reshape(1000, 1000)\n"
             "b = a\n"
             "t = a.T\n"  # not contiguous: saved as a copy
             "s = np.array([(1, 2.5)], dtype=[('x', 'i4'), ('y', 'f8')])\n"
             "empty = np.zeros((0, 3))\n"
             "scalar = np.float64(2.5)\n"
             "objects = np.array([1, 'x', None], dtype=object)\n"
             "holder = {'a': a}\n")
    saved = park(ns, tmp_path / "p")
    assert not saved.unsaved
    back, restored = restore(tmp_path / "p")
    assert not restored.failed
    np.testing.assert_array_equal(back["a"], ns["a"])
    assert back["b"] is back["a"] and back["holder"]["a"] is back["a"]
    np.testing.assert_array_equal(back["t"], ns["t"])
    assert back["s"].dtype == ns["s"].dtype and back["s"][0]["y"] == 2.5
    assert back["empty"].shape == (0, 3) and back["scalar"] == 2.5
    assert list(back["objects"]) == [1, "x", None]
    back["a"][0, 0] = 42  # fresh writable memory, not the file's
    assert ns["a"][0, 0] == 0


def test_tensors_model_and_optimizer_keep_their_sharing(tmp_path: Path) -> None:
    ns = run("import torch\n"
             "torch.manual_seed(0)\n"
             "t = torch.arange(12.0).reshape(3, 4)\n"
             "row = t[1]\n"
             "half = torch.ones(5, dtype=torch.bfloat16)\n"
             "w = torch.randn(3, requires_grad=True)\n"
             "model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))\n"
             "opt = torch.optim.Adam(model.parameters(), lr=0.01)\n"
             "model(torch.ones(2, 4)).sum().backward()\n"
             "opt.step()\n")
    park(ns, tmp_path / "p")
    back, restored = restore(tmp_path / "p")
    assert not restored.failed and not restored.notes
    assert torch.equal(back["t"], ns["t"]) and back["half"].dtype == torch.bfloat16
    assert back["row"].untyped_storage().data_ptr() == back["t"].untyped_storage().data_ptr()
    back["t"][1, 0] = -1  # a view of the restored storage, as before
    assert back["row"][0] == -1
    assert back["w"].requires_grad and back["w"].is_leaf
    params = list(back["model"].parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in params)
    assert back["opt"].param_groups[0]["params"][0] is params[0]
    assert set(back["opt"].state) == set(params)  # Adam's moments, keyed by the same parameters
    x = torch.ones(2, 4)
    assert torch.equal(back["model"](x), ns["model"](x))
    back["model"](x).sum().backward()
    back["opt"].step()  # trains the restored model's own parameters
    assert not torch.equal(params[0], ns["model"][0].weight)


def test_functions_and_classes_from_cells_see_the_new_namespace(tmp_path: Path) -> None:
    ns = run("import torch\n"
             "scale = 2\n"
             "def double(x):\n"
             "    return x * scale\n"
             "class Net(torch.nn.Module):\n"
             "    def __init__(self):\n"
             "        super().__init__()\n"
             "        self.linear = torch.nn.Linear(2, 2)\n"
             "    def forward(self, x):\n"
             "        return double(self.linear(x))\n"
             "net = Net()\n"
             "square = lambda v: v * v\n")
    park(ns, tmp_path / "p")
    back, restored = restore(tmp_path / "p")
    assert not restored.failed
    assert back["double"](21) == 42
    back["scale"] = 10  # a later cell rebinds a global: the function sees it
    assert back["double"](1) == 10
    assert back["double"].__globals__ is back
    assert type(back["net"]) is back["Net"] and isinstance(back["net"], torch.nn.Module)
    assert back["net"](torch.ones(2)).shape == (2,) and back["square"](3) == 9
    assert back["__builtins__"] is __builtins__


def test_what_cannot_be_pickled_is_named_and_only_it_is_left_out(tmp_path: Path) -> None:
    ns = run("import numpy as np\n"
             "x = np.ones(10)\n"
             "fh = open(" + repr(os.devnull) + ")\n"
             "with open(" + repr(os.devnull) + ") as done:\n    pass\n"
             "gen = (i for i in range(3))\n"
             "lock = __import__('threading').Lock()\n"
             "kept = [1, 2, 3]\n")
    ns["sock"] = socket.socket()
    try:
        saved = park(ns, tmp_path / "p")
    finally:
        ns["sock"].close()
        ns["fh"].close()
    assert set(saved.unsaved) == {"fh", "done", "gen", "lock", "sock"}
    assert "open file" in saved.unsaved["fh"] and "generator" in saved.unsaved["gen"]
    assert saved.unsaved["done"] == f"cannot save a closed file ({os.devnull!r})"
    back, restored = restore(tmp_path / "p")
    assert set(restored.unsaved) == {"fh", "done", "gen", "lock", "sock"}
    assert set(restored.values) == {"np", "x", "kept"}
    assert back["kept"] == [1, 2, 3]


class Fragile:
    """Pickles fine; cannot be loaded (as an object that reconnects somewhere at load)."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise ConnectionError("the database it talks to is not reachable from here")


def test_a_name_that_cannot_be_loaded_loses_only_itself_and_what_refers_into_it(tmp_path: Path) -> None:
    shared = [1, 2]
    ns = {"__builtins__": __builtins__, "shared": shared, "fragile": Fragile(shared),
          "holder": {"f": None}, "alone": {"k": "v"}}
    ns["holder"]["f"] = ns["fragile"]
    park(ns, tmp_path / "p")
    back, restored = restore(tmp_path / "p")
    assert "not reachable" in restored.failed["fragile"]
    assert "fragile" in restored.failed["holder"]
    assert back["shared"] == [1, 2] and back["alone"] == {"k": "v"}


def test_a_limit_stops_the_save_and_leaves_nothing(tmp_path: Path) -> None:
    ns = run("import numpy as np\nbig = np.ones(1_000_000)\n")
    with pytest.raises(pn.ParkQuotaExceeded):
        park(ns, tmp_path / "p", limit=1_000_000)
    assert not (tmp_path / "p").exists()
    saved = park(ns, tmp_path / "p", limit=9_000_000)
    assert 8_000_000 <= saved.nbytes <= 9_000_000
    assert sum(f.stat().st_size for f in (tmp_path / "p").iterdir()) >= saved.nbytes


def test_cut_short_files_are_reported_not_loaded(tmp_path: Path) -> None:
    ns = run("import numpy as np\nx = np.ones(100_000)\ny = [1]\n")
    park(ns, tmp_path / "p")
    blobs = tmp_path / "p" / "blobs.bin"
    os.truncate(blobs, blobs.stat().st_size // 2)
    back, restored = restore(tmp_path / "p")
    assert "cut short" in restored.failed["x"]
    assert back["y"] == [1]


def test_no_saved_namespace_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pn.load(tmp_path / "nothing")


def test_saving_again_replaces_the_folder(tmp_path: Path) -> None:
    park(run("a = 1\nb = 2\n"), tmp_path / "p")
    park(run("c = 3\n"), tmp_path / "p")
    back, _ = restore(tmp_path / "p")
    assert "a" not in back and back["c"] == 3


def test_tensors_of_a_missing_device_stay_on_the_cpu_and_say_so() -> None:
    loader = pn._Loader.__new__(pn._Loader)
    loader.off_device = {}
    assert loader._device(torch, "cpu") == "cpu"
    if not torch.cuda.is_available():
        assert loader._device(torch, "cuda:0") == "cpu"
        assert loader.off_device == {"cuda:0": 1}


def test_ipython_names_are_not_saved() -> None:
    hidden = {"In": [], "Out": {}, "exit": object()}
    ns = {"In": hidden["In"], "Out": hidden["Out"], "exit": hidden["exit"], "_": 1, "__": 2, "_i3": "x",
          "_5": 5, "_ih": [], "__name__": "__main__", "_private": 1, "data": 2, "i": 3}
    assert sorted(pn.savable_names(ns, hidden)) == ["_private", "data", "i"]


@pytest.mark.gpu
def test_cuda_tensors_come_back_on_their_device(tmp_path: Path) -> None:
    ns = run("import torch\n"
             "g = torch.arange(1000.0, device='cuda:0')\n"
             "view = g[10:20]\n"
             "model = torch.nn.Linear(8, 8).cuda()\n"
             "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
             "cpu = torch.ones(3)\n")
    park(ns, tmp_path / "p")
    back, restored = restore(tmp_path / "p")
    assert not restored.failed and not restored.notes
    assert back["g"].device == torch.device("cuda:0") and torch.equal(back["g"].cpu(), ns["g"].cpu())
    assert back["view"].untyped_storage().data_ptr() == back["g"].untyped_storage().data_ptr()
    assert back["model"].weight.device.type == "cuda" and back["cpu"].device.type == "cpu"
    assert back["opt"].param_groups[0]["params"][0] is back["model"].weight
