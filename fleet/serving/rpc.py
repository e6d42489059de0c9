"""The protocol over gRPC: ``inference.GRPCInferenceService``, a thin adapter over the service.

The messages and the servicer base come from the stubs generated into ``tritonclient.grpc``
(``service_pb2``, ``service_pb2_grpc``), so the wire format is exactly the one Triton's clients
speak and there is no proto to vendor or compile. Methods this server does not implement
(shared memory, traces, logging, model config, statistics) answer UNIMPLEMENTED from the base
class. Tensors go out as ``raw_output_contents`` (the only form ``tritonclient.grpc`` reads for
numeric outputs) and come in either raw or as typed ``contents``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from .errors import ErrorKind, ServingError, invalid
from .metrics import ServingMetrics
from .protocol import (DTYPES, InferRequest, InferResponse, InputTensor, RequestedOutput, parse_shape,
                       timeout_from_parameter)
from .security import MISSING_TOKEN, OPEN_RPCS, bearer_ok
from .service import InferenceService, Pending

# datatype -> the typed field of InferTensorContents that carries it
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


def param_value(p: Any) -> Any:
    """An ``InferParameter`` (or ``ModelRepositoryParameter``) as a Python value."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def decode_grpc(msg: Any) -> InferRequest:
    """A ``ModelInferRequest`` as the transport-free :class:`InferRequest`."""
    params = {k: param_value(v) for k, v in msg.parameters.items()}
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; give one per input, "
                      "in order, or none")
    inputs = []
    for i, t in enumerate(msg.inputs):
        if t.datatype not in DTYPES:
            raise invalid(f"input '{t.name}': datatype {t.datatype!r} is not supported; accepted: FP32 (FP16, FP64 "
                          "converted; UINT8 for models that declare preprocessing)")
        shape = parse_shape(list(t.shape), t.name)
        dt, count = DTYPES[t.datatype], math.prod(shape)
        if raw:
            if len(raw[i]) != count * dt.itemsize:
                raise invalid(f"input '{t.name}': raw_input_contents has {len(raw[i])} bytes but shape {list(shape)} of "
                              f"{t.datatype} needs {count * dt.itemsize}")
            data = np.frombuffer(raw[i], dtype=dt)
        else:
            field = CONTENTS.get(t.datatype)
            if field is None:
                raise invalid(f"input '{t.name}': {t.datatype} must be sent in raw_input_contents")
            data = np.asarray(getattr(t.contents, field), dtype=dt)
            if data.size != count:
                raise invalid(f"input '{t.name}': contents has {data.size} values but shape {list(shape)} needs {count}")
        inputs.append(InputTensor(t.name, t.datatype, shape, data))
    outputs = [RequestedOutput(o.name, True) for o in msg.outputs] or None
    return InferRequest(msg.model_name, msg.model_version, msg.id, inputs, outputs, True,
                        timeout_from_parameter(params.get("timeout")), params)


def encode_grpc(resp: InferResponse) -> Any:
    out = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version, id=resp.id)
    for o in resp.outputs:
        out.outputs.add(name=o.name, datatype=o.datatype, shape=list(o.shape))
        out.raw_output_contents.append(np.ascontiguousarray(o.data, dtype=DTYPES[o.datatype]).tobytes())
    return out


class Servicer(pbg.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """``inference.GRPCInferenceService`` on one :class:`InferenceService`."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.service.live())

    def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.service.ready())

    def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        m = self.service.server_metadata()
        return pb.ServerMetadataResponse(name=m["name"], version=m["version"], extensions=m["extensions"])

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = self.service.model_metadata(request.name, request.version)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name, versions=list(meta.versions), platform=meta.platform,
            inputs=[tm(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in meta.inputs],
            outputs=[tm(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in meta.outputs])

    def ModelInfer(self, request: Any, context: Any) -> Any:
        service = self.service
        t0 = service.clock()
        pending: Pending | None = None
        name = request.model_name if request.model_name in service.entries else "_unknown"
        try:
            req = decode_grpc(request)
            left = context.time_remaining()
            if left is not None and left < (req.timeout_s or float("inf")):
                req.timeout_s = max(left, 1e-3)  # the client's gRPC deadline
            pending = service.submit(req, received=t0)
            p = pending
            context.add_callback(lambda: None if p.future.done() else service.abandon(p, ErrorKind.CANCELLED))
            reply = encode_grpc(service.wait(pending))
        except ServingError as e:
            service.finish(pending, name, e, service.clock() - t0)
            raise
        service.finish(pending, name, None, service.clock() - t0)
        return reply

    def RepositoryIndex(self, request: Any, context: Any) -> Any:
        rows = self.service.index(request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        import json

        config = request.parameters.get("config")
        doc = None
        if config is not None:
            try:
                doc = json.loads(param_value(config))
            except (TypeError, json.JSONDecodeError) as e:
                raise invalid(f"parameters.config must be a JSON object of config.toml keys: {e}") from None
        self.service.load(request.model_name, doc)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        self.service.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class Guard(grpc.ServerInterceptor):  # type: ignore[misc]
    """The bearer token (``authorization`` metadata) on every method but ServerLive/ServerReady;
    ServingErrors become status codes; every call is counted by method and code."""

    def __init__(self, token: str | None, metrics: ServingMetrics) -> None:
        self.token, self.metrics = token, metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        meta = dict(details.invocation_metadata or ())
        allowed = method in OPEN_RPCS or bearer_ok(meta.get("authorization"), self.token)
        inner = handler.unary_unary

        def call(request: Any, context: Any) -> Any:
            code = "OK"
            try:
                if not allowed:
                    code = "UNAUTHENTICATED"
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
                return inner(request, context)
            except ServingError as e:
                code = e.kind.grpc_code
                context.abort(grpc.StatusCode[code], e.message)
            except Exception:
                code = "INTERNAL" if code == "OK" else code
                raise
            finally:
                self.metrics.grpc.labels(method, code).inc()

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def start_grpc(service: InferenceService, metrics: ServingMetrics, host: str, port: int, *,
               token: str | None = None, tls: tuple[bytes, bytes] | None = None, max_request_bytes: int = 64 << 20,
               workers: int = 32) -> tuple[Any, int]:
    """A started gRPC server and its bound port (``port=0`` picks a free one)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tilefleet-grpc"),
                         interceptors=[Guard(token, metrics)],
                         options=[("grpc.max_receive_message_length", max_request_bytes),
                                  ("grpc.max_send_message_length", -1)])
    pbg.add_GRPCInferenceServiceServicer_to_server(Servicer(service), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind the gRPC port {address}")
    server.start()
    return server, bound
