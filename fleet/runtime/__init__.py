"""The runtime: the client API (:mod:`.client`: ``connect``, ``Cluster``), deployments
(:mod:`.deployment`), the driver that runs the pure scheduler against Ray (:mod:`.driver`), where
devices come from (:mod:`.nodes`), the auto-planner (:mod:`.planner`), how a plan is wired into
scheduler tiles (:mod:`.wiring`) and per-deployment statistics (:mod:`.stats`).
"""
