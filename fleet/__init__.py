"""fleet: devices, clusters and the client that drives the scheduler with Ray.

    import fleet
    with fleet.connect(emulate="pi3*4") as cluster:
        dep = cluster.deploy(model, example, grid=(5, 5))
        y = dep(x)
"""

from __future__ import annotations

from typing import Any

__all__ = ["Cluster", "ClusterClosed", "Deployment", "FrameFailed", "connect"]


def __getattr__(name: str) -> Any:  # Ray is imported only when the client is used
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("fleet.runtime.client"), name)
    raise AttributeError(name)
