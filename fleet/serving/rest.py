"""The protocol over HTTP: a thin starlette adapter over :class:`~fleet.serving.service.InferenceService`.

Each handler reads, calls one service operation, and writes; decoding, validation and encoding
are :mod:`.protocol`'s. The body of an inference request is read in chunks into one buffer, so
``--max-request-bytes`` cuts an oversized upload off early (413) and the binary tensors are
viewed in place, not copied. While a request waits for its frames, the handler also listens for
the client disconnecting: a request nobody waits for leaves the queue (or, once its frame is in
the fleet, its result is dropped on arrival).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ErrorKind, ServingError, invalid
from .metrics import CONTENT_TYPE, ServingMetrics
from .protocol import decode_rest, encode_rest_parts, error_body
from .security import MISSING_TOKEN, OPEN_PATHS, bearer_ok
from .service import InferenceService, Pending

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
SMALL_BODY = 1 << 20  # repository requests: a config at most


class SentResponse(Response):
    """A response that calls ``on_sent`` once its last byte is handed to the server: the request's
    server-side time then includes sending, as Triton's request duration does. ``content`` may be
    a list of pieces (``encode_rest_parts``), sent one after the other without joining them."""

    def __init__(self, content: bytes | list[bytes | memoryview], status_code: int = 200,
                 headers: dict[str, str] | None = None, media_type: str | None = None,
                 on_sent: Callable[[], None] | None = None) -> None:
        self.parts = content if isinstance(content, list) else None
        if self.parts is not None:
            headers = {**(headers or {}), "content-length": str(sum(len(p) for p in self.parts))}
        super().__init__(b"" if self.parts is not None else content, status_code, headers, media_type)
        self.on_sent = on_sent

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if self.parts is None:
            await super().__call__(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            last = len(self.parts) - 1
            for i, part in enumerate(self.parts):
                await send({"type": "http.response.body", "body": part, "more_body": i < last})
        if self.on_sent is not None:
            self.on_sent()


def error_response(e: ServingError, on_sent: Callable[[], None] | None = None) -> Response:
    return SentResponse(error_body(e.message), e.kind.http_status, media_type="application/json", on_sent=on_sent)


def route_label(path: str) -> str:
    """A route without its model name and version, so metric labels stay few."""
    path = re.sub(r"^/v2/models/[^/]+", "/v2/models/{name}", path)
    path = re.sub(r"/versions/[^/]+", "/versions/{version}", path)
    return re.sub(r"^/v2/repository/models/[^/]+", "/v2/repository/models/{name}", path)


class Guard:
    """ASGI middleware: the bearer token on every path but health checks, and a request counter."""

    def __init__(self, app: ASGIApp, token: str | None, metrics: ServingMetrics) -> None:
        self.app, self.token, self.metrics = app, token, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        status = [500]

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if path not in OPEN_PATHS and self.token is not None:
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode("latin-1") or None
                if not bearer_ok(auth, self.token):
                    resp = Response(error_body(MISSING_TOKEN), 401, {"WWW-Authenticate": "Bearer"},
                                    media_type="application/json")
                    await resp(scope, receive, counting_send)
                    return
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http.labels(route_label(path), method, str(status[0])).inc()


async def read_body(request: Request, limit: int) -> bytearray:
    """The whole body in one buffer, refused with 413 as soon as it passes ``limit`` bytes.

    With a Content-Length the buffer is allocated once and filled in place (a 608x608 frame is
    4.4 MB: growing a buffer chunk by chunk costs about a millisecond more)."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > limit:
        raise ServingError(ErrorKind.TOO_LARGE, f"the request body is {size} bytes; this server accepts at "
                                                f"most {limit} (--max-request-bytes)")
    if size is not None:
        buf, n = bytearray(size), 0
        view = memoryview(buf)
        async for chunk in request.stream():
            if n + len(chunk) > size:
                raise invalid(f"the body is longer than its Content-Length ({size} bytes)")
            view[n:n + len(chunk)] = chunk
            n += len(chunk)
        if n != size:
            raise invalid(f"the body ended after {n} of its Content-Length {size} bytes")
        return buf
    grown = bytearray()
    async for chunk in request.stream():
        grown += chunk
        if len(grown) > limit:
            raise ServingError(ErrorKind.TOO_LARGE, f"the request body is over {limit} bytes, the most this server "
                                                    "accepts (--max-request-bytes)")
    return grown


async def wait_result(service: InferenceService, p: Pending, request: Request) -> Any:
    """The response of ``p``, or the error; gives up at its deadline or when the client disconnects."""
    fut = asyncio.wrap_future(p.future)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({fut, watch}, timeout=p.remaining(service.clock()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if fut in done:
        return fut.result()
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it now
    raise service.abandon(p, ErrorKind.CANCELLED if watch in done else ErrorKind.TIMEOUT)


class RestApi:
    """The handlers of one server, each one service call between reading and writing."""

    def __init__(self, service: InferenceService, metrics: ServingMetrics, max_request_bytes: int) -> None:
        self.service, self.metrics, self.max_request_bytes = service, metrics, max_request_bytes

    def _known(self, name: str) -> str:
        return name if name in self.service.entries else "_unknown"  # metric labels only for real models

    async def infer(self, request: Request) -> Response:
        service = self.service
        t0 = service.clock()
        name, version = request.path_params["name"], request.path_params.get("version", "")
        pending: Pending | None = None

        def sent(err: ServingError | None) -> Callable[[], None]:
            return lambda: service.finish(pending, self._known(name), err, service.clock() - t0)

        try:
            body = await read_body(request, self.max_request_bytes)
            req = decode_rest(name, version, body, request.headers.get("inference-header-content-length"))
            pending = service.submit(req, received=t0)
            content, header_len = encode_rest_parts(await wait_result(service, pending, request))
        except ServingError as e:
            return error_response(e, sent(e))
        headers = {"Inference-Header-Content-Length": str(header_len)} if header_len is not None else None
        return SentResponse(content, 200, headers, "application/octet-stream" if header_len is not None
                            else "application/json", sent(None))

    async def live(self, _: Request) -> Response:
        ok = self.service.live()
        return JSONResponse({"live": ok}, 200 if ok else 503)

    async def ready(self, _: Request) -> Response:
        ok = await run_in_threadpool(self.service.ready)
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    async def server_metadata(self, _: Request) -> Response:
        return JSONResponse(self.service.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        p = request.path_params
        return JSONResponse(self.service.model_metadata(p["name"], p.get("version", "")).to_json())

    async def model_ready(self, request: Request) -> Response:
        p = request.path_params
        ok = self.service.model_ready(p["name"], p.get("version", ""))
        return JSONResponse({"name": p["name"], "ready": ok}, 200 if ok else 503)

    async def index(self, request: Request) -> Response:
        doc = await _json_body(request)
        return JSONResponse(await run_in_threadpool(self.service.index, doc.get("ready", False) is True))

    async def load(self, request: Request) -> Response:
        config = (await _json_body(request)).get("parameters", {}).get("config")
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError as e:
                raise invalid(f"parameters.config must be a JSON object of config.toml keys: {e}") from None
        if config is not None and not isinstance(config, dict):
            raise invalid("parameters.config must be a JSON object of config.toml keys")
        await run_in_threadpool(self.service.load, request.path_params["name"], config)
        return JSONResponse({})

    async def unload(self, request: Request) -> Response:
        await run_in_threadpool(self.service.unload, request.path_params["name"])
        return JSONResponse({})

    async def scrape(self, _: Request) -> Response:
        return Response(await run_in_threadpool(self.metrics.exposition), media_type=CONTENT_TYPE)

    def routes(self) -> list[Route]:
        def errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            async def wrapped(request: Request) -> Response:
                try:
                    return await handler(request)
                except ServingError as e:
                    return error_response(e)
            return wrapped

        routes = [Route("/v2/health/live", errors(self.live)), Route("/v2/health/ready", errors(self.ready)),
                  Route("/v2", errors(self.server_metadata)), Route("/metrics", errors(self.scrape)),
                  Route("/v2/repository/index", errors(self.index), methods=["POST"]),
                  Route("/v2/repository/models/{name}/load", errors(self.load), methods=["POST"]),
                  Route("/v2/repository/models/{name}/unload", errors(self.unload), methods=["POST"])]
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [Route(base, errors(self.model_metadata)), Route(base + "/ready", errors(self.model_ready)),
                       Route(base + "/infer", self.infer, methods=["POST"])]
        return routes


def build_app(service: InferenceService, metrics: ServingMetrics, token: str | None = None,
              max_request_bytes: int = 64 << 20) -> ASGIApp:
    """The ASGI application of one server: routes, JSON errors for unknown paths, the guard."""
    app = Starlette(routes=RestApi(service, metrics, max_request_bytes).routes(),
                    exception_handlers={HTTPException: _http_error})
    return Guard(app, token, metrics)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, SMALL_BODY)
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the request body must be JSON: {e}") from None
    if not isinstance(doc, dict):
        raise invalid("the request body must be a JSON object")
    return doc


async def _http_error(_: Request, exc: Exception) -> Response:
    """Unknown routes and wrong methods, as the protocol's error object."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "")
    return Response(error_body(f"{detail or 'error'}: see /v2 for this server's protocol (KServe v2)"), status,
                    media_type="application/json")
