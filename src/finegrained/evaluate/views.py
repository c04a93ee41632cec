"""Test-time views of the stored S x S crops, and scores averaged over them.

A view is a square window ``(y0, x0, h, w)`` in pixels of the stored crop, resampled to
``image_size`` by the same resampler as training and validation
(:func:`finegrained.train.augment.center_crop`), optionally mirrored left-right:

- ``center``: the validation view, the central window of side ``eval_crop_fraction * S``.
- ``ten_crop``: windows of that side at the 4 corners and the centre, each also mirrored
  (10 views; Krizhevsky et al. 2012).
- ``multi_scale``: the 10-crop at every window fraction of ``evaluation.multi_scale_fractions``
  (10 views per fraction).

Scores over views are averaged as probabilities (``average: softmax``, the mean of the
per-view softmaxes) or as logits (``average: logits``, the softmax of the mean logit).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from finegrained.plan.jobs import VIEWS
# The one resampler of the project (train/augment.py): the centre view here is
# bit-identical to the validation view.
from finegrained.train.augment import _resample

__all__ = ["VIEWS", "View", "average_scores", "make_view_logits", "render_view",
           "ten_crop_views", "view_boxes"]


#: A view: window (y0, x0, h, w) in pixels and whether it is mirrored.
View = tuple[tuple[float, float, float, float], bool]


def _window(height: int, width: int, fraction: float, where: str) -> tuple[float, ...]:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"window fraction must be in (0, 1], got {fraction}")
    side = fraction * min(height, width)
    y = {"top": 0.0, "centre": (height - side) / 2, "bottom": height - side}
    x = {"left": 0.0, "centre": (width - side) / 2, "right": width - side}
    vertical, horizontal = {"top_left": ("top", "left"), "top_right": ("top", "right"),
                            "bottom_left": ("bottom", "left"),
                            "bottom_right": ("bottom", "right"),
                            "centre": ("centre", "centre")}[where]
    return (float(y[vertical]), float(x[horizontal]), float(side), float(side))


def ten_crop_views(height: int, width: int, fraction: float) -> list[View]:
    """The 5 windows (corners, then centre) of side ``fraction`` x the shorter side, then
    the same 5 mirrored."""
    windows = [_window(height, width, fraction, where)
               for where in ("top_left", "top_right", "bottom_left", "bottom_right", "centre")]
    return [(box, False) for box in windows] + [(box, True) for box in windows]


def view_boxes(view: str, height: int, width: int, *, crop_fraction: float,
               multi_scale_fractions: Sequence[float] = ()) -> list[View]:
    """The windows of one named view (see the module docstring)."""
    if view == "center":
        return [(_window(height, width, crop_fraction, "centre"), False)]
    if view == "ten_crop":
        return ten_crop_views(height, width, crop_fraction)
    if view == "multi_scale":
        if not multi_scale_fractions:
            raise ValueError("multi_scale needs at least one window fraction")
        return [v for f in multi_scale_fractions for v in ten_crop_views(height, width, f)]
    raise ValueError(f"unknown view {view!r}; views are {VIEWS}")


def render_view(images: jax.Array, box, flip: bool, out: int) -> jax.Array:
    """One view of a batch ``[B, H, W, 3]`` (uint8 or float) -> float32 ``[B, out, out, 3]``."""
    boxes = jnp.broadcast_to(jnp.asarray(box, jnp.float32), (images.shape[0], 4))
    x = _resample(images, boxes, out)
    return x[:, :, ::-1, :] if flip else x


def make_view_logits(model, out: int):
    """A jitted ``(images, box, flip) -> float32 logits [B, C]`` of ``model`` in eval mode.

    The window and the mirror flag are arguments, not constants, so one program serves
    every view (windows of any size: the output shape is fixed)."""
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, images, box, flip_flag):
        net = nnx.merge(graphdef, state)
        x = _resample(images, jnp.broadcast_to(box, (images.shape[0], 4)), out)
        x = jnp.where(flip_flag, x[:, :, ::-1, :], x)
        return net(x).astype(jnp.float32)

    return lambda images, box, flip: logits(state, images, jnp.asarray(box, jnp.float32),
                                            jnp.asarray(bool(flip)))


def average_scores(logits: np.ndarray | jax.Array, average: str = "softmax") -> np.ndarray:
    """Class probabilities ``[B, C]`` from per-view logits ``[V, B, C]``: the mean of the
    views' softmaxes (``softmax``) or the softmax of their mean logit (``logits``)."""
    logits = jnp.asarray(logits, jnp.float32)
    if average == "softmax":
        probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
    elif average == "logits":
        probs = jax.nn.softmax(jnp.mean(logits, axis=0), axis=-1)
    else:
        raise ValueError(f"average must be 'softmax' or 'logits', got {average!r}")
    return np.asarray(probs)
