"""Where models come from: the Darknet importer and the built-in zoo (seeded weights, no downloads).

Each source turns a file or a name into an ordinary ``nn.Module`` that the tiling core cuts like any
other; nothing in the core knows which source a model came from.
"""

from __future__ import annotations

from . import zoo
from .darknet import load_darknet

__all__ = ["load_darknet", "zoo"]
