"""fleet: devices, clusters and the client that drives the scheduler with Ray.

    import fleet
    with fleet.connect(emulate="pi3*4") as cluster:
        dep = cluster.deploy(model, example, grid=(5, 5))
        y = dep(x)
"""

from __future__ import annotations

from typing import Any

__all__ = ["Cluster", "ClusterClosed", "Deployment", "FrameCancelledError", "FrameFailed", "connect"]


def __getattr__(name: str) -> Any:  # Ray is imported only when the client is used
    if name in __all__:
        import importlib

        where = "fleet.runtime.driver" if name == "FrameCancelledError" else "fleet.runtime.client"
        return getattr(importlib.import_module(where), name)
    raise AttributeError(name)
