"""Where models come from: files (ONNX, TorchScript, Darknet, pickled modules), images, the zoo.

Each source turns a file or a name into an ordinary ``nn.Module`` that the tiling core cuts like any
other; nothing in the core knows which source a model came from. ONNX and Pillow are imported only
when an ONNX model or an image is loaded.
"""

from __future__ import annotations

from . import zoo
from .darknet import load_darknet
from .files import MODEL_KINDS, ModelFileError, load_model, load_onnx
from .images import ImageError, load_images

__all__ = ["MODEL_KINDS", "ImageError", "ModelFileError", "load_darknet", "load_images", "load_model",
           "load_onnx", "zoo"]
