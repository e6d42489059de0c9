"""Serving: the fleet behind the Open Inference Protocol (KServe v2), over HTTP and gRPC.

- :mod:`.protocol`: decode, validate and encode requests (pure; both transports share it)
- :mod:`.errors`: one table of failure kinds with their HTTP status and gRPC code
- :mod:`.repository`: model folders with a ``config.toml`` each (pure parsing; the preprocessing hook)
- :mod:`.admission`: which waiting request enters the fleet next (bounded, priorities; pure)
- :mod:`.models`: building a served model, its metadata, whether models fit the devices together
- :mod:`.service`: the core both transports call (models, deployments, admission, timings)
- :mod:`.rest`, :mod:`.rpc`: thin starlette and grpcio adapters; :mod:`.server` starts both
- :mod:`.metrics`: Prometheus metrics, devices read from ``Deployment.stats()`` at scrape time
- :mod:`.security`: bearer token, TLS and the rule about binding beyond localhost
- :mod:`.loadtest`: open- and closed-loop load generation (schedules are pure)

The transports (starlette, uvicorn, grpcio, prometheus-client) are imported by the modules that
use them, so importing this package costs nothing.
"""
