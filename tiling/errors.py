"""Typed errors of the tiling core: each says what was wrong and what is accepted."""

from __future__ import annotations


class TilingError(ValueError):
    """Base of every error the tiling core raises on bad input."""


class GridError(TilingError):
    """A grid, weights or cuts that do not describe a partition of the output."""


class InputMismatch(TilingError):
    """A frame whose type, rank, channels, size or dtype differ from the plan's example."""


class NotTileable(TilingError):
    """A model (or ``upto=``/``stages=``) that leaves nothing to fuse into tiles."""


class TraceFailure(TilingError):
    """``torch.fx`` could not trace the model, even with untraceable submodules made leaves."""


class NoPlanFits(NotTileable):
    """No plan of the model fits the devices' memory; ``need_bytes`` is the smallest budget one
    device needs (for the best-fitting plan tried), ``budget_bytes`` the largest there is."""

    def __init__(self, message: str, need_bytes: int = 0, budget_bytes: int = 0) -> None:
        super().__init__(message)
        self.need_bytes = need_bytes
        self.budget_bytes = budget_bytes


class TrainingModeWarning(UserWarning):
    """The model was in training mode; tilefleet tiled its eval-mode copy instead."""
