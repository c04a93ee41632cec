"""The one rule that compares results on the validation split (``protocol.select_by``).

Every choice the pipeline makes on validation goes through :func:`better`: the best epoch of
a training run (and its early stopping), the L2 strength of the L-BFGS probe, the phase of a
two-stage job, and the grid point of a sweep. No JAX here: the Snakefile imports it.

- ``val_top1``: the higher validation top-1; ties go to the lower validation loss.
- ``val_loss``: the lower validation loss; ties go to the higher top-1. On a small
  validation split (150 photos: one photo is 0.67 points of top-1) the loss moves smoothly
  where top-1 moves in steps, so it picks less noisy epochs and grid points.

A NaN loss ranks last. On a full tie the earlier candidate stays (epochs, grid order).
"""

from __future__ import annotations

import math

SELECT_BY = ("val_top1", "val_loss")
RULES = {
    "val_top1": "highest validation top-1; ties: lower validation loss, then the earlier",
    "val_loss": "lowest validation loss; ties: higher validation top-1, then the earlier",
}


def check_select_by(select_by: str) -> str:
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {SELECT_BY}, got {select_by!r}")
    return select_by


def selection_key(top1: float, loss: float, select_by: str) -> tuple[float, float]:
    """A sort key: the smaller, the better."""
    loss = math.inf if math.isnan(float(loss)) else float(loss)
    if check_select_by(select_by) == "val_top1":
        return (-float(top1), loss)
    return (loss, -float(top1))


def better(candidate: dict, incumbent: dict | None, select_by: str) -> bool:
    """Whether the row ``candidate`` beats ``incumbent`` (None: anything does); rows carry
    ``val_top1`` and ``val_loss``."""
    if incumbent is None:
        return True
    return (selection_key(candidate["val_top1"], candidate["val_loss"], select_by)
            < selection_key(incumbent["val_top1"], incumbent["val_loss"], select_by))
