"""``python -m remote_gpu_kernel.kernel -f CONNECTION``: what the kernelspec starts."""

from __future__ import annotations

from .kernel import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
