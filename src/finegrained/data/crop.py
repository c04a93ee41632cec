"""Crop geometry: where to cut a bounding box out of an image, and how to fit it into S x S.

Pure arithmetic on numbers, no pixels, so every rule here is easy to test and to reason about.
:mod:`finegrained.data.imageio` applies it to decoded images.

Conventions
-----------
* Boxes are ``(x, y, w, h)`` in pixels of the *stored* image (x, y = top-left corner), as in
  NABirds ``bounding_boxes.txt``. Boxes may stick out of the image; they are clamped here.
* Windows are ``(left, top, right, bottom)`` integer pixel edges with ``right``/``bottom``
  exclusive, so a window's size is ``(right - left, bottom - top)``, as in ``PIL.Image.crop``.
* ``margin`` is a fraction of the box's own size added on *each* side: a ``w x h`` box with
  margin ``m`` becomes ``w * (1 + 2m)`` by ``h * (1 + 2m)``, centred on the same point. So
  margin 0.1 shows 10% of the box width of context left and right, 10% of its height above
  and below; margin 0 is the box itself.
* Every output is ``S x S``. A window that is not square (``aspect='keep'``, or a square that
  did not fit in the image) is *letterboxed*: its longer side is resized to ``S`` and the rest
  is filled with :data:`PAD_VALUE`.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from finegrained.errors import DataError

#: Fill for letterbox padding and for transparent pixels: mid-grey. The pretrained networks
#: normalise inputs as ``(x - 128) / 128``, so padding becomes exactly 0 after normalisation
#: and carries no colour or edge the network could mistake for content.
PAD_VALUE = 128

ASPECTS = ("square", "keep")


def crop_window(box_xywh: Sequence[float], image_wh: Sequence[int], margin: float, aspect: str,
                *, source: str | os.PathLike = "<box>") -> tuple[int, int, int, int]:
    """Return the ``(left, top, right, bottom)`` window to cut for a box, inside the image.

    ``aspect='square'``: a square of side ``max(w, h)`` (after the margin), centred on the box
    centre and shifted, not shrunk, to lie inside the image; only when the square is larger
    than the image along an axis is it clamped to the image on that axis (the final resize
    then letterboxes). ``aspect='keep'``: the margined box clamped to the image.

    ``source`` names the image in errors. Raises :class:`DataError` for a box with zero or
    negative width/height, a box that does not overlap the image, a negative margin or an
    unknown aspect.
    """
    if aspect not in ASPECTS:
        raise DataError(source, f"unknown aspect {aspect!r}; expected one of {ASPECTS}")
    if not margin >= 0:
        raise DataError(source, "crop margin must be >= 0", value=margin)
    x, y, w, h = (float(v) for v in box_xywh)
    img_w, img_h = int(image_wh[0]), int(image_wh[1])
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DataError(source, "bounding box has a non-finite value", value=tuple(box_xywh))
    if w <= 0 or h <= 0:
        raise DataError(source, "bounding box has zero area", value=tuple(box_xywh))
    if img_w <= 0 or img_h <= 0:
        raise DataError(source, "image has zero size", value=(img_w, img_h))
    if x >= img_w or y >= img_h or x + w <= 0 or y + h <= 0:
        raise DataError(source, f"bounding box lies outside the {img_w}x{img_h} image",
                        value=tuple(box_xywh))

    cx, cy = x + w / 2.0, y + h / 2.0
    mw, mh = w * (1.0 + 2.0 * margin), h * (1.0 + 2.0 * margin)
    if aspect == "square":
        side = max(1, int(round(max(mw, mh))))
        left, right = _place(cx, side, img_w)
        top, bottom = _place(cy, side, img_h)
    else:
        left, right = _clamp_span(cx - mw / 2.0, cx + mw / 2.0, img_w)
        top, bottom = _clamp_span(cy - mh / 2.0, cy + mh / 2.0, img_h)
    return left, top, right, bottom


def _place(centre: float, side: int, limit: int) -> tuple[int, int]:
    """Span of length ``side`` centred on ``centre``, shifted into ``[0, limit)`` (clamped if longer)."""
    if side >= limit:
        return 0, limit
    start = int(round(centre - side / 2.0))
    start = min(max(start, 0), limit - side)
    return start, start + side


def _clamp_span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Round a float span to integer edges and clamp it to ``[0, limit]``, keeping >= 1 pixel."""
    start = min(max(int(round(lo)), 0), limit - 1)
    stop = max(min(int(round(hi)), limit), start + 1)
    return start, stop


def letterbox_geometry(crop_wh: Sequence[int], size: int) -> tuple[int, int, int, int]:
    """Fit a ``w x h`` crop into ``size x size`` keeping its aspect.

    Returns ``(new_w, new_h, offset_x, offset_y)``: resize the crop to ``new_w x new_h`` (the
    longer side becomes ``size``) and paste it at the offset, centred; the rest is padding.
    """
    w, h = int(crop_wh[0]), int(crop_wh[1])
    if w <= 0 or h <= 0 or size <= 0:
        raise ValueError(f"letterbox needs positive sizes, got crop {w}x{h} into {size}")
    scale = size / max(w, h)
    new_w = min(size, max(1, int(round(w * scale))))
    new_h = min(size, max(1, int(round(h * scale))))
    return new_w, new_h, (size - new_w) // 2, (size - new_h) // 2
