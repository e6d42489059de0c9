"""The ``tilefleet`` command line: one subcommand a job, each with a ``--help`` that teaches."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import commands

DESCRIPTION = """\
tilefleet splits CNN inference across a cluster of heterogeneous edge devices.

It fuses a stack of convolutional layers, cuts the stack's output into a grid of tiles
(DeepThings' Fused Tile Partitioning), and computes each tile from its own slightly larger
input region, so that tiles can run on different devices with no communication inside
the stack. The result is exactly the untiled model's output.
"""

EPILOG = """\
examples:
  tilefleet demo                               YOLOv2 layers 0-15 tiled 5x5, checked against torch
  tilefleet demo --grid 3x3 --reuse            the same with DeepThings' overlap reuse
  tilefleet plan --model vgg16 --grid 2x2      how a zoo model would be cut
  tilefleet plan --cfg yolov2.cfg --upto 16    the same for a Darknet config
  tilefleet models                             the model zoo

Run 'tilefleet COMMAND --help' for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tilefleet", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="plan, run and check YOLOv2 layers 0-15 tiled in this process",
                       description="Partition YOLOv2 layers 0-15 (DeepThings' workload) into a grid of fused "
                                   "tiles, run every tile in this process from its own input region, stitch, "
                                   "and check the result against the untiled model.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--grid", default="5x5", help="tile grid ROWSxCOLS on the fused stack's output (38x38)")
    d.add_argument("--size", type=int, default=608, help="input height and width")
    d.add_argument("--reuse", action="store_true", help="checkerboard order with DeepThings' overlap reuse")
    d.add_argument("--even", action="store_true",
                   help="even cuts (round(i*size/n)) instead of DeepThings' ceil(size/n) tiles")
    d.add_argument("--tiles", action="store_true", help="also print one row per tile")
    d.set_defaults(func=commands.demo)

    pl = sub.add_parser("plan", help="show how a model would be partitioned (no execution)",
                        description="Partition a zoo model or a Darknet .cfg and print the plan: stages, grids, "
                                    "redundancy, per-tile peak memory, where fusion stops and why.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = pl.add_mutually_exclusive_group()
    src.add_argument("--model", default="yolov2-16", help="a zoo model (see 'tilefleet models')")
    src.add_argument("--cfg", help="a Darknet .cfg file")
    pl.add_argument("--size", type=int, help="input height and width (default: the model's own)")
    pl.add_argument("--grid", default="5x5", help="ROWSxCOLS, or several comma-separated, one per stage")
    pl.add_argument("--stages", help="comma-separated layer boundaries, e.g. 4,8,12")
    pl.add_argument("--upto", help="stop fusion before this layer index (or after this module name)")
    pl.add_argument("--reuse", action="store_true", help="checkerboard overlap reuse")
    pl.add_argument("--tiles", action="store_true", help="also print one row per tile")
    pl.add_argument("--check", action="store_true", help="also run the plan and compare with the untiled model")
    pl.set_defaults(func=commands.plan)

    m = sub.add_parser("models", help="list the model zoo", description="List the models built in code.")
    m.set_defaults(func=commands.models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError) as e:  # our typed errors derive from these
        print(f"tilefleet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
