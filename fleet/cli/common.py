"""Small pieces every command shares: grid arguments and progress bars."""

from __future__ import annotations

from typing import Any


def parse_grid(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a grid looks like 5x5 (rows x cols), got {text!r}") from None
    return (r, c)


def check_in_flight(in_flight: int | None, mode: str) -> None:
    """``--in-flight`` is a throughput-mode knob: refuse it where it would be silently ignored."""
    if in_flight is None:
        return
    if in_flight < 1:
        raise ValueError(f"--in-flight must be at least 1 frame, got {in_flight}")
    if mode == "latency":
        raise ValueError("--in-flight applies to --mode throughput; latency mode runs one frame at a time, so "
                         "each frame's latency is its own. Add --mode throughput, or drop --in-flight")


def progress(total: int, desc: str, unit: str = "tile") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def grid_arg(text: str) -> Any:
    return "auto" if text == "auto" else parse_grid(text)


def progress_iter(items: list[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)


def add_model_args(p: Any, default: str | None = "yolov2-16") -> None:
    """The model flags every command shares: a zoo name or a file, its weights, its frames' preprocessing."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=default,
                     help="a zoo model (see 'tilefleet models') or a model file: .onnx, Darknet .cfg, TorchScript .pt")
    src.add_argument("--onnx", metavar="FILE", help="an ONNX file (the same as --model FILE.onnx)")
    src.add_argument("--cfg", help="a Darknet .cfg file")
    p.add_argument("--weights", help="weights for --cfg (Darknet .weights) or a state dict for a PyTorch file")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a whole pickled module (torch.save(model)): unpickling runs the file's code")
    p.add_argument("--size", type=int, help="input height and width (default: the model's own)")
    p.add_argument("--preprocess", metavar="SPEC",
                   help="frames are raw uint8 and normalised on the devices: imagenet, darknet, none, with "
                        "overrides such as 'imagenet,layout=hwc' (see docs/models.md)")


def workload(args: Any) -> Any:
    """The model and an example frame the command's flags describe (:func:`fleet.bench.runner.load_workload`)."""
    from fleet.bench.runner import load_workload

    return load_workload(getattr(args, "onnx", None) or args.model, args.cfg, args.size,
                         weights=getattr(args, "weights", None), trust=bool(getattr(args, "trust_pickle", False)),
                         preprocess=getattr(args, "preprocess", None))
