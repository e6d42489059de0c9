"""A served model: where it comes from, its metadata, its outputs by name, and whether it fits.

Kept apart from the service so the questions a load must answer before anything is shipped
(does the source build, what are its outputs called, do all models' weights fit the devices
together) are plain functions with plain inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import invalid
from .protocol import ModelMetadata, TensorSpec, datatype_of
from tiling.sources.files import MODEL_KINDS, model_input_shape

from .repository import ConfigError, ModelConfig

MIB = 2**20

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass(eq=False)
class ModelEntry:
    """One model of the server, loaded or not; ``reason`` says why it is not READY."""

    name: str
    config: ModelConfig | None
    state: str = UNAVAILABLE
    reason: str = "not loaded"
    deployment: Any = None
    metadata: ModelMetadata | None = None
    preprocess: Any = None  # tiling.Preprocess: the deployment takes raw UINT8 frames
    weight_bytes: int = 0
    peak_bytes: int = 0

    @property
    def ready(self) -> bool:
        return self.state == READY


def build_model(cfg: ModelConfig) -> tuple[nn.Module, torch.Tensor]:
    """The model and a seeded example batch at the configured (or the source's default) size."""
    import tiling
    from tiling import zoo

    if Path(cfg.source).is_absolute() or Path(cfg.source).suffix.lower() in MODEL_KINDS:
        try:  # a Darknet cfg, an ONNX file, a TorchScript file (tiling.load_model's kinds)
            model = tiling.load_model(cfg.source, input_shape=cfg.input_shape)
            found = model_input_shape(cfg.source, model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model '{cfg.name}': cannot load {cfg.source}: {e}") from None
        if found is None and cfg.input_shape is None:
            raise ConfigError(f"model '{cfg.name}': {cfg.source} does not say its input size; give "
                              "[input] shape = [C, H, W]")
        shape = found if found is not None else cfg.input_shape
    else:
        size = cfg.input_shape[1:] if cfg.input_shape else None
        try:
            zm = zoo.get(cfg.source, input_size=size)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"model '{cfg.name}': {e}") from None
        model, shape = zm.model, zm.input_shape
    if cfg.input_shape is not None:
        if cfg.input_shape[0] != shape[0]:
            raise ConfigError(f"model '{cfg.name}': input.shape has {cfg.input_shape[0]} channels but the model takes "
                              f"{shape[0]}")
        shape = cfg.input_shape
    g = torch.Generator().manual_seed(0)
    return model.eval(), torch.randn((1, *shape), generator=g)


def name_outputs(result: Any) -> list[tuple[str, torch.Tensor]]:
    """The model's result as named tensors: ``output`` for one tensor, ``output_0``... for a
    sequence, the keys for a dict (nested structures are flattened with ``.``-joined names)."""
    if isinstance(result, torch.Tensor):
        return [("output", result)]
    out: list[tuple[str, torch.Tensor]] = []

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append((prefix, x))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}_{i}" if prefix else f"output_{i}", v)
        else:
            raise invalid(f"the model returns a {type(x).__name__}; served models must return tensors")

    walk("", result)
    return out


def metadata_for(cfg: ModelConfig, example: torch.Tensor, result: Any) -> ModelMetadata:
    """Metadata from the example and the model's result on it: every shape with a -1 batch."""
    c, h, w = example.shape[1:]
    outputs = tuple(TensorSpec(n, datatype_of(t.detach().numpy().dtype), (-1, *t.shape[1:]))
                    for n, t in name_outputs(result))
    dtype, shape = "FP32", (-1, c, h, w)
    if cfg.preprocess is not None:  # raw camera frames, in their declared layout
        from .repository import build_preprocess

        dtype = "UINT8"
        shape = (-1, h, w, c) if build_preprocess(cfg.preprocess).layout == "hwc" else shape
    return ModelMetadata(cfg.name, (TensorSpec(cfg.input_name, dtype, shape),), outputs,
                         max_batch=cfg.max_batch, uint8=cfg.preprocess is not None)


def plan_memory(plan: Any) -> tuple[int, int]:
    """(weights every device holds, the largest tile's working memory) of a deployment's plan.

    Every device loads every stage's weights (a device takes tiles of any stage); the tail's
    weights are counted too because the tail runs on whichever device is best at the time.
    """
    weights = sum(s.weight_bytes for s in plan.stages)
    weights += sum(p.numel() * p.element_size() for p in plan.tail.gm.parameters()) if not plan.tail.empty else 0
    peak = max((t.peak_bytes for s in plan.stages for t in s.tiles), default=0)
    return weights, peak


def fit_error(name: str, new: tuple[int, int], loaded: dict[str, tuple[int, int]],
              devices: Sequence[dict[str, Any]]) -> str | None:
    """Why ``name`` does not fit beside the ``loaded`` models on the smallest alive device, or None.

    The rule: all models' weights plus the largest tile working set of any of them must fit the
    device's usable memory (tiles are staged one after another; weights stay resident).
    """
    alive = [d for d in devices if d.get("state", "alive") == "alive"]
    if not alive:
        return "the cluster has no alive device"
    small = min(alive, key=lambda d: d["usable_bytes"])
    weights = new[0] + sum(w for w, _ in loaded.values())
    peak = max([new[1], *(p for _, p in loaded.values())])
    if weights + peak <= small["usable_bytes"]:
        return None
    others = ", ".join(f"{n} {w / MIB:.1f} MiB" for n, (w, _) in loaded.items()) or "none"
    return (f"model '{name}' does not fit: its weights ({new[0] / MIB:.1f} MiB, on every device) with the loaded "
            f"models' ({others}) and the largest tile's working memory ({peak / MIB:.1f} MiB) need "
            f"{(weights + peak) / MIB:.1f} MiB, more than the {small['usable_bytes'] / MIB:.1f} MiB usable on "
            f"{small['id']} (the smallest device); unload a model or add devices with more memory")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
