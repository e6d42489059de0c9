"""The model repository: one folder per model, each with a ``config.toml``.

    models/
      detector/config.toml        source = "yolov2-16"
      tiny/config.toml            source = "tiny.cfg"   (a Darknet cfg beside it)

A config names the model's source (a zoo name, or a file relative to its folder), its input
(name, ``[C, H, W]``, datatype), how to deploy it (grid, stages, mode, reuse), an optional
``priority`` for the admission queue and an optional ``preprocess`` declaration. Parsing is pure
and strict: an unknown key is an error that lists the accepted ones, because a typo silently
ignored (``gird = "5x5"``) deploys the wrong plan. A folder whose config fails is reported NOT
READY with the reason; the other models are unaffected.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any



CONFIG = "config.toml"
TOP_KEYS = {"source", "input_size", "priority", "max_batch", "max_in_flight", "preprocess", "input", "deploy"}
INPUT_KEYS = {"name", "shape", "datatype"}
DEPLOY_KEYS = {"grid", "stages", "mode", "reuse"}
DEFAULT_INPUT = "input"


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the file, the key and what is accepted."""


@dataclass(frozen=True)
class ModelConfig:
    """One model as the repository (or ``tilefleet serve --model``) declares it."""

    name: str
    source: str  # a zoo name, or a path (absolute once resolved against the folder)
    input_name: str = DEFAULT_INPUT
    input_shape: tuple[int, int, int] | None = None  # (C, H, W); None: the source's own
    grid: str = "auto"  # "auto" or "RxC"
    stages: tuple[int, ...] | None = None
    mode: str = "latency"
    reuse: bool = False
    priority: int = 0
    max_batch: int = 8
    max_in_flight: int | None = None  # None: 2 per alive device
    preprocess: str | dict[str, Any] | None = None

    def deploy_kwargs(self) -> tuple[Any, dict[str, Any]]:
        """(grid, keyword arguments) for ``Cluster.deploy``."""
        kw: dict[str, Any] = {"mode": self.mode}
        if self.grid == "auto":
            return "auto", kw
        r, c = (int(v) for v in self.grid.lower().split("x"))
        kw["reuse"] = self.reuse
        if self.stages:
            kw["stages"] = list(self.stages)
        return (r, c), kw


def single(model: str, input_name: str = DEFAULT_INPUT, **kw: Any) -> ModelConfig:
    """``tilefleet serve --model NAME|FILE``: a zoo model under its name, a file under its stem."""
    if "grid" in kw:
        kw["grid"] = _grid({"grid": kw["grid"]}, "--grid")
    path = Path(model)
    if path.suffix == ".cfg" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"model file {model} does not exist")
        return ModelConfig(path.stem, str(path.resolve()), input_name=input_name, **kw)
    return ModelConfig(model, model, input_name=input_name, **kw)


def parse(name: str, text: str, folder: Path | None = None) -> ModelConfig:
    """A ``config.toml``'s text as a :class:`ModelConfig` (file paths resolved against ``folder``)."""
    where = f"{folder / CONFIG if folder else CONFIG}"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    return parse_doc(name, doc, folder, where)


def parse_doc(name: str, doc: dict[str, Any], folder: Path | None, where: str) -> ModelConfig:
    """A parsed config document (TOML, or JSON from a load request) as a :class:`ModelConfig`."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: a config must be a table of keys, got {type(doc).__name__}")
    _keys(doc, TOP_KEYS, where, "")
    source = doc.get("source")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: 'source' must name the model: a zoo name (tilefleet models) or a file "
                          f"relative to the folder, e.g. source = \"yolov2-16\"")
    if folder is not None and ("/" in source or "." in source):
        path = (folder / source).resolve()
        if not path.is_file():
            raise ConfigError(f"{where}: source file {source!r} does not exist in {folder}")
        source = str(path)
    inp = _table(doc, "input", where)
    dep = _table(doc, "deploy", where)
    _keys(inp, INPUT_KEYS, where, "input.")
    _keys(dep, DEPLOY_KEYS, where, "deploy.")
    return ModelConfig(
        name=name, source=source, input_name=_str(inp, "name", DEFAULT_INPUT, where, "input."),
        input_shape=_shape(doc, inp, where), grid=_grid(dep, where), stages=_stages(dep, where),
        mode=_choice(dep, "mode", ("latency", "throughput"), where), reuse=_bool(dep, "reuse", where),
        priority=_int(doc, "priority", 0, where, lo=-1000, hi=1000), max_batch=_int(doc, "max_batch", 8, where, lo=1),
        max_in_flight=_int(doc, "max_in_flight", None, where, lo=1), preprocess=_preprocess(doc, where))


def scan(root: Path) -> dict[str, ModelConfig | ConfigError]:
    """Every model folder under ``root``: its config, or why it cannot be used."""
    if not root.is_dir():
        raise ConfigError(f"model repository {root} is not a directory")
    out: dict[str, ModelConfig | ConfigError] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[folder.name] = read(root, folder.name)
    return out


def read(root: Path, name: str) -> ModelConfig | ConfigError:
    folder = root / name
    if not (folder / CONFIG).is_file():
        return ConfigError(f"{folder}: no {CONFIG} (a model folder needs one naming at least its 'source')")
    try:
        return parse(name, (folder / CONFIG).read_text(), folder)
    except ConfigError as e:
        return e
    except (OSError, UnicodeDecodeError) as e:
        return ConfigError(f"{folder / CONFIG}: cannot be read: {e}")


def from_dict(name: str, doc: dict[str, Any], folder: Path | None) -> ModelConfig:
    """A config given as JSON in a load request (``parameters.config``): the same keys as the TOML."""
    return parse_doc(name, doc, folder, "the load request's config")


# --- the preprocessing hook ---------------------------------------------------------------------------

def build_preprocess(spec: str | dict[str, Any] | None) -> Any:
    """The one place a model's ``preprocess`` declaration becomes a :class:`tiling.Preprocess` (the
    project's single definition): the model is then deployed for raw UINT8 frames, which travel to
    the devices as bytes and are normalised there. A bad declaration is a :class:`ConfigError`."""
    if spec is None:
        return None
    import tiling

    try:
        return tiling.Preprocess.parse(spec)
    except tiling.PreprocessError as e:
        raise ConfigError(f"preprocess: {e}") from None


# --- field parsers --------------------------------------------------------------------------------

def _keys(doc: dict[str, Any], allowed: set[str], where: str, prefix: str) -> None:
    bad = sorted(set(doc) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown key {prefix}{bad[0]}; accepted: {', '.join(prefix + k for k in sorted(allowed))}")


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return v


def _str(doc: dict[str, Any], key: str, default: str, where: str, prefix: str = "") -> str:
    v = doc.get(key, default)
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: {prefix}{key} must be a non-empty string, got {v!r}")
    return v


def _int(doc: dict[str, Any], key: str, default: int | None, where: str, lo: int = 0,
         hi: int | None = None) -> Any:
    v = doc.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise ConfigError(f"{where}: {key} must be an integer from {lo}" + (f" to {hi}" if hi is not None else "")
                          + f", got {v!r}")
    return v


def _bool(doc: dict[str, Any], key: str, where: str) -> bool:
    v = doc.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: deploy.{key} must be true or false, got {v!r}")
    return v


def _choice(doc: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> str:
    v = doc.get(key, choices[0])
    if v not in choices:
        raise ConfigError(f"{where}: deploy.{key} must be one of {', '.join(choices)}, got {v!r}")
    return str(v)


def _shape(doc: dict[str, Any], inp: dict[str, Any], where: str) -> tuple[int, int, int] | None:
    dt = inp.get("datatype", "FP32")
    if dt not in ("FP32", "UINT8"):
        raise ConfigError(f"{where}: input.datatype must be FP32 (or UINT8 with preprocess), got {dt!r}")
    if dt == "UINT8" and "preprocess" not in doc:
        raise ConfigError(f"{where}: input.datatype UINT8 needs a 'preprocess' declaration")
    if "input_size" in doc and "shape" in inp:
        raise ConfigError(f"{where}: give input.shape or input_size, not both")
    if "input_size" in doc:
        s = doc["input_size"]
        if isinstance(s, int) and not isinstance(s, bool) and s > 0:
            return (3, s, s)
        raise ConfigError(f"{where}: input_size must be a positive integer (H = W), got {s!r}")
    shape = inp.get("shape")
    if shape is None:
        return None
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ConfigError(f"{where}: input.shape must be [C, H, W] of positive integers (no batch), got {shape!r}")
    return (shape[0], shape[1], shape[2])


def _grid(dep: dict[str, Any], where: str) -> str:
    g = dep.get("grid", "auto")
    if g == "auto":
        return g
    try:
        r, c = (int(v) for v in str(g).lower().split("x"))
        if r < 1 or c < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{where}: deploy.grid must be 'auto' or ROWSxCOLS such as '2x2', got {g!r}") from None
    return f"{r}x{c}"


def _stages(dep: dict[str, Any], where: str) -> tuple[int, ...] | None:
    s = dep.get("stages")
    if s is None:
        return None
    if not isinstance(s, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s):
        raise ConfigError(f"{where}: deploy.stages must be a list of layer indices such as [4, 8], got {s!r}")
    if dep.get("grid", "auto") == "auto":
        raise ConfigError(f"{where}: deploy.stages needs an explicit deploy.grid (auto chooses stages itself)")
    return tuple(s)


def _preprocess(doc: dict[str, Any], where: str) -> str | dict[str, Any] | None:
    p = doc.get("preprocess")
    if p is None:
        return None
    if not ((isinstance(p, str) and p) or isinstance(p, dict)):
        raise ConfigError(f"{where}: preprocess must be a string or a table, got {p!r}")
    try:
        build_preprocess(p)  # checked when the config is read: a bad one leaves the model NOT READY
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return p
