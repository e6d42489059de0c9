"""The Open Inference Protocol (KServe v2) as pure functions: decode, validate, encode.

Why pure: both transports (REST in :mod:`.rest`, gRPC in :mod:`.rpc`) turn their wire format into
the same :class:`InferRequest`, one :func:`check_request` validates it against the model's
metadata, and the REST encoding is a function of a response. Every rule is therefore tested once,
without a server, and the two transports cannot disagree about what a valid request is.

REST bodies follow the binary tensor data extension: a JSON header, then raw tensor bytes, the
header's length in the ``Inference-Header-Content-Length`` HTTP header; each binary input says its
byte count in ``parameters.binary_data_size``. Outputs are binary when the request asks
(``parameters.binary_data`` per output, or ``binary_data_output`` for the whole request).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import invalid, not_found

# datatype name -> numpy dtype (little-endian on the wire, as the protocol says)
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
CONVERTED = ("FP16", "FP64")  # accepted for an FP32 input and converted (exact for FP16, rounded for FP64)
VERSION = "1"  # every model has one version; "" means "the server's choice", i.e. this one


def datatype_of(dtype: np.dtype[Any]) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype.newbyteorder("<") or dt == dtype:
            return name
    raise invalid(f"numpy dtype {dtype} has no protocol datatype; accepted: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as metadata declares it; -1 in ``shape`` is any size (the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelMetadata:
    """What a client may send a model: one FP32 ``(-1, C, H, W)`` input, at most ``max_batch`` frames.

    ``uint8`` is True when the model declares preprocessing: then UINT8 frames are accepted and the
    preprocessing hook, not this module, checks their shape.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = 8
    uint8: bool = False
    platform: str = "tilefleet"
    versions: tuple[str, ...] = (VERSION,)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "versions": list(self.versions), "platform": self.platform,
                "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # flat, of DTYPES[datatype]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    model: str
    version: str
    id: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool = False  # the request-wide default for outputs it does not list
    timeout_s: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    binary: bool = False


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]


@dataclass
class CheckedInput:
    """A validated request's frames: float32 ``(N, C, H, W)`` (or raw UINT8 for the preprocessing hook)."""

    batch: np.ndarray
    single: bool  # the request sent (C, H, W): the response drops the batch dimension again
    outputs: list[RequestedOutput]
    raw_uint8: bool = False


# --------------------------------------------------------------------------------------------------
# REST decoding
# --------------------------------------------------------------------------------------------------

def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tail of a REST body (``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise invalid(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 <= n <= len(body):
        raise invalid(f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def decode_rest(model: str, version: str, body: bytes, header_length: str | None = None) -> InferRequest:
    """A REST inference body (JSON, or JSON plus binary tensors) as an :class:`InferRequest`."""
    head, binary = split_body(body, header_length)
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = "" if header_length else " (binary tensors need the Inference-Header-Content-Length header)"
        raise invalid(f"the request body is not valid JSON: {e}{hint}") from None
    if not isinstance(doc, dict):
        raise invalid(f"the request body must be a JSON object, got {type(doc).__name__}")
    params = _object(doc.get("parameters", {}), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise invalid("'inputs' must be a non-empty list of tensors {name, shape, datatype, data}")
    inputs, offset = [], 0
    for i, t in enumerate(raw_inputs):
        tensor, offset = _rest_tensor(_object(t, f"inputs[{i}]"), binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise invalid(f"the body has {len(binary)} bytes of binary tensor data but the inputs' binary_data_size "
                      f"add up to {offset}")
    binary_all = _flag(params.get("binary_data_output", False), "parameters.binary_data_output")
    outputs = None
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise invalid("'outputs' must be a list of {name, parameters}")
        outputs = [_rest_output(_object(o, f"outputs[{i}]"), binary_all) for i, o in enumerate(doc["outputs"])]
    rid = doc.get("id", "")
    return InferRequest(model, version, rid if isinstance(rid, str) else str(rid), inputs, outputs, binary_all,
                        timeout_from_parameter(params.get("timeout")), params)


def _rest_tensor(t: dict[str, Any], binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    name, datatype, shape = _tensor_header(t)
    dt = DTYPES[datatype]
    count = math.prod(shape)
    params = _object(t.get("parameters", {}), f"input '{name}' parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
        if size != count * dt.itemsize:
            raise invalid(f"input '{name}': binary_data_size is {size} bytes but shape {list(shape)} of {datatype} "
                          f"needs {count * dt.itemsize}")
        if offset + size > len(binary):
            raise invalid(f"input '{name}': binary_data_size {size} goes past the end of the body's binary data "
                          f"({len(binary) - offset} bytes left)")
        data = np.frombuffer(binary[offset:offset + size], dtype=dt)
        return InputTensor(name, datatype, shape, data), offset + size
    if "data" not in t:
        raise invalid(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    try:
        data = np.asarray(t["data"], dtype=dt).ravel()
    except (ValueError, TypeError, OverflowError) as e:
        raise invalid(f"input '{name}': 'data' is not a (nested) list of {datatype} values: {e}") from None
    if data.size != count:
        raise invalid(f"input '{name}': 'data' has {data.size} values but shape {list(shape)} needs {count}")
    return InputTensor(name, datatype, shape, data), offset


def _tensor_header(t: dict[str, Any]) -> tuple[str, str, tuple[int, ...]]:
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("every input needs a 'name' (a string)")
    datatype = t.get("datatype")
    if datatype not in DTYPES:
        raise invalid(f"input '{name}': datatype {datatype!r} is not supported; accepted: FP32 "
                      f"({', '.join(CONVERTED)} converted; UINT8 for models that declare preprocessing)")
    return name, datatype, parse_shape(t.get("shape"), name)


def parse_shape(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise invalid(f"input '{name}': 'shape' must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise invalid(f"input '{name}': shape {list(shape)} has a negative dimension")
    return tuple(int(d) for d in shape)


def _rest_output(o: dict[str, Any], binary_all: bool) -> RequestedOutput:
    name = o.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("every requested output needs a 'name' (a string)")
    params = _object(o.get("parameters", {}), f"output '{name}' parameters")
    if params.get("classification"):
        raise invalid(f"output '{name}': the classification extension is not supported; ask for the raw tensor")
    return RequestedOutput(name, _flag(params.get("binary_data", binary_all), f"output '{name}' binary_data"))


def timeout_from_parameter(value: Any) -> float | None:
    """The protocol's ``timeout`` request parameter (microseconds, as Triton) in seconds; 0 or absent: none."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise invalid(f"parameters.timeout is in microseconds (a non-negative number), got {value!r}")
    return value / 1e6 if value else None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{what} must be true or false, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# validation against the model
# --------------------------------------------------------------------------------------------------

def check_version(meta: ModelMetadata, version: str) -> None:
    if version not in ("", *meta.versions):
        raise not_found(f"model '{meta.name}' has no version '{version}'; versions: {', '.join(meta.versions)}")


def check_request(req: InferRequest, meta: ModelMetadata) -> CheckedInput:
    """Validate every field of ``req`` against ``meta``; the frames ready for ``Deployment.submit``."""
    check_version(meta, req.version)
    spec = meta.inputs[0]
    names = [t.name for t in req.inputs]
    unknown = [n for n in names if n not in {s.name for s in meta.inputs}]
    if unknown:
        raise invalid(f"model '{meta.name}' has no input {unknown[0]!r}; its inputs: "
                      f"{', '.join(s.name for s in meta.inputs)}")
    if len(names) != len(set(names)):
        raise invalid(f"input '{spec.name}' is given more than once")
    if spec.name not in names:
        raise invalid(f"model '{meta.name}' needs input '{spec.name}' ({spec.datatype} {list(spec.shape)})")
    t = req.inputs[names.index(spec.name)]
    outputs = _check_outputs(req, meta)
    if t.datatype == "UINT8" and meta.uint8:
        return CheckedInput(t.data.reshape(t.shape), len(t.shape) == 3, outputs, raw_uint8=True)
    if t.datatype != "FP32" and t.datatype not in CONVERTED:
        extra = "" if meta.uint8 else "; UINT8 only for models that declare preprocessing"
        raise invalid(f"input '{t.name}': datatype {t.datatype} is not accepted; this model takes FP32 "
                      f"({', '.join(CONVERTED)} converted{extra})")
    chw = spec.shape[1:]
    if len(t.shape) not in (3, 4) or tuple(t.shape[-3:]) != chw:
        raise invalid(f"input '{t.name}': shape {list(t.shape)} does not match; expected [N, {', '.join(map(str, chw))}]"
                      f" or [{', '.join(map(str, chw))}]")
    n = t.shape[0] if len(t.shape) == 4 else 1
    if not 1 <= n <= meta.max_batch:
        raise invalid(f"input '{t.name}': batch of {n} frames; this model takes 1 to {meta.max_batch} per request")
    batch = t.data.reshape((n, *chw))
    if batch.dtype != np.float32:
        batch = batch.astype(np.float32)
    if not np.isfinite(batch).all():
        raise invalid(f"input '{t.name}' contains NaN or Inf; send finite values")
    return CheckedInput(batch, len(t.shape) == 3, outputs)


def _check_outputs(req: InferRequest, meta: ModelMetadata) -> list[RequestedOutput]:
    known = [s.name for s in meta.outputs]
    if req.outputs is None:
        return [RequestedOutput(n, req.binary_output) for n in known]
    for o in req.outputs:
        if o.name not in known:
            raise invalid(f"model '{meta.name}' has no output {o.name!r}; its outputs: {', '.join(known)}")
    return list(req.outputs)


# --------------------------------------------------------------------------------------------------
# REST encoding
# --------------------------------------------------------------------------------------------------

def encode_rest(resp: InferResponse) -> tuple[bytes, int | None]:
    """The REST body of a response and, when some output is binary, the JSON header's length."""
    parts, header_length = encode_rest_parts(resp)
    return b"".join(parts), header_length


def encode_rest_parts(resp: InferResponse) -> tuple[list[bytes | memoryview], int | None]:
    """:func:`encode_rest` as the pieces to send one after the other: the JSON header, then each
    binary output as a view of its array, so the server writes the tensors without copying them
    (``tobytes`` and a join made two copies of a 1.4 MB output, and a fresh 1.4 MB buffer, on every
    request)."""
    outs, blobs = [], []
    for o in resp.outputs:
        entry: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if o.binary:
            arr = np.ascontiguousarray(o.data, dtype=DTYPES[o.datatype])
            entry["parameters"] = {"binary_data_size": arr.nbytes}
            blobs.append(arr)
        else:
            entry["data"] = np.asarray(o.data).ravel().tolist()
        outs.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model, "model_version": resp.version, "outputs": outs}
    if resp.id:
        doc["id"] = resp.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return [head], None
    return [head, *(memoryview(a).cast("B") for a in blobs)], len(head)


def error_body(message: str) -> bytes:
    """The protocol's error object."""
    return json.dumps({"error": message}).encode()
