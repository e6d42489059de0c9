"""tiling: exact fused-tile partitioning of CNNs (DeepThings' FTP), pure torch, no Ray.

    plan = tiling.partition(model, example, grid=(5, 5))
    y = plan.run(x)          # equals model(x)
"""

from __future__ import annotations

from .errors import (GridError, InputMismatch, NoPlanFits, NotTileable, TilingError, TraceFailure,
                     TrainingModeWarning)
from .geometry import Box, deepthings_cuts, even_cuts, weighted_cuts
from .plan import Partitioner, Plan, Stage, Tail, Tile, partition, rel_error, run_stage
from .preprocess import Preprocess, PreprocessError, with_preprocess
from .program import StageProgram
from .reduce import ReducePoint, combine, partial_key
from .regions import Piece, TileGeometry
from .sources import load_darknet, load_images, load_model, load_onnx, zoo

__all__ = [
    "Box", "GridError", "InputMismatch", "NoPlanFits", "NotTileable", "Partitioner", "Piece", "Plan", "Preprocess", "PreprocessError",
    "ReducePoint", "Stage", "StageProgram", "Tail", "Tile", "TileGeometry", "TilingError", "TraceFailure", "TrainingModeWarning", "combine",
    "deepthings_cuts", "even_cuts", "load_darknet", "load_images", "load_model", "load_onnx", "partial_key",
    "partition", "rel_error", "run_stage", "weighted_cuts", "with_preprocess", "zoo",
]
