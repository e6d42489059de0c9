"""Both ports of one server around one service: what ``tilefleet serve`` and the tests start.

HTTP runs on uvicorn in a thread of its own (its event loop never waits on the fleet: handlers
await futures), gRPC on grpcio's thread pool. Both share the service, the metrics registry and
the security settings, so a token or TLS certificate applies to both ports alike.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import ServingMetrics
from .repository import ConfigError, ModelConfig
from .security import Security, SecurityError, bind_refusal, read_token, tls_files
from .service import InferenceService, ServiceOptions

log = logging.getLogger("tilefleet.serving")


@dataclass
class ServeOptions:
    """How to listen; ``port=0`` / ``grpc_port=0`` pick free ports, ``grpc_port=None`` turns gRPC off."""

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = 8001
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False
    max_request_bytes: int = 64 << 20
    service: ServiceOptions = field(default_factory=ServiceOptions)

    def security(self) -> Security:
        """Read and check the access settings; raises :class:`SecurityError` before anything binds."""
        token = read_token(self.token_file) if self.token_file else None
        why = bind_refusal(self.host, token, self.insecure)
        if why:
            raise SecurityError(why)
        cert, key = tls_files(self.tls_cert, self.tls_key)
        return Security(token, cert, key)


class Server:
    """A running server: ``service``, ``url``, ``grpc_address``; ``stop()`` ends both ports."""

    def __init__(self, cluster: Any, configs: dict[str, ModelConfig | ConfigError], opts: ServeOptions, *,
                 repository_dir: Path | None = None, version: str = "0") -> None:
        self.opts = opts
        self.security = opts.security()
        self.metrics = ServingMetrics()
        self.service = InferenceService(cluster, configs, repository_dir=repository_dir, options=opts.service,
                                        metrics=self.metrics, version=version)
        self.metrics.attach(self.service.deployments, self.service.queue_state)
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None
        self._grpc: Any = None
        self.port = 0
        self.grpc_port: int | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.security.tls else "http"
        return f"{scheme}://{self._host_for_url()}:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"{self._host_for_url()}:{self.grpc_port}"

    def _host_for_url(self) -> str:
        h = self.opts.host
        return "127.0.0.1" if h in ("0.0.0.0", "") else (f"[{h}]" if ":" in h else h)

    def start(self, timeout: float = 30.0) -> Server:
        import uvicorn

        from .rest import build_app
        from .rpc import start_grpc

        sec, o = self.security, self.opts
        app = build_app(self.service, self.metrics, sec.token, o.max_request_bytes)
        config = uvicorn.Config(app, host=o.host, port=o.port, log_level="warning", access_log=False,
                                lifespan="off", ssl_certfile=str(sec.tls_cert) if sec.tls_cert else None,
                                ssl_keyfile=str(sec.tls_key) if sec.tls_key else None)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, name="tilefleet-http", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                self.stop()
                raise OSError(f"the HTTP server did not start on {o.host}:{o.port} (port in use?)")
            time.sleep(0.02)
        self.port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        if o.grpc_port is not None:
            tls = (sec.tls_cert.read_bytes(), sec.tls_key.read_bytes()) if sec.tls_cert and sec.tls_key else None
            try:
                self._grpc, self.grpc_port = start_grpc(self.service, self.metrics, o.host, o.grpc_port,
                                                        token=sec.token, tls=tls,
                                                        max_request_bytes=o.max_request_bytes)
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """Stop taking requests, then unload the models (the cluster stays the caller's)."""
        if self._grpc is not None:
            self._grpc.stop(grace=2).wait(5)
            self._grpc = None
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._uvicorn = None
        self.service.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["SecurityError", "ServeOptions", "Server"]
