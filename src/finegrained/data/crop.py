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
* Every output is ``S x S``. A window that is not square is resized so that its longer side
  becomes ``S`` and *letterboxed*: the rest is filled with :data:`PAD_VALUE`, and the
  rectangle that holds image pixels (the *content*) is recorded with the crop.

Square crops and padding
------------------------
With ``aspect='square'`` context is given up before anything is padded. The square (box plus
margin) is shifted inside the photo; when it is longer than the photo's short side (the bird
fills the frame, common in NABirds) it shrinks to that short side, as long as the box itself
still fits in it. Only a box *longer than the photo's short side* cannot be held by any square
inside the photo; its window is the photo's short side by the box's long side, and
``overflow`` decides what happens to it:

* ``'pad'``: letterbox it (no distortion; grey bars);
* ``'squeeze'``: squeeze its longer side by up to ``max_squeeze`` (``1.33`` = the 4:3
  aspect range of random-resized-crop training), padding only what remains beyond that.

On the real NABirds geometry (all 48,562 images, S=256, margin 0.15) shrinking the square
takes the letterboxed crops from 46.9 % to 16.4 % and the padded share of crop pixels from
8.1 % to 2.0 %; ``squeeze`` with 1.333 leaves 1.6 % and 0.13 %
(``benchmarks/crop_throughput.py --geometry-only`` computes these from the annotation files).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

from finegrained.errors import DataError

#: Fill for letterbox padding and for transparent pixels: mid-grey. The pretrained networks
#: normalise inputs as ``(x - 128) / 128``, so padding becomes exactly 0 after normalisation
#: and carries no colour or edge the network could mistake for content.
PAD_VALUE = 128

ASPECTS = ("square", "keep")
#: How far a box may stick out of its photo, as a fraction of the photo's side on that axis.
#: Real boxes do (201 of NABirds' 48,562, by up to 21.6 % of the side; they are clamped); a
#: box further out is a corrupt line, e.g. ``1 1 1e308 1e308``, whose margin would overflow.
BOX_TOLERANCE = 0.25
#: What a square crop does with a box longer than the photo's short side (see module doc).
OVERFLOWS = ("pad", "squeeze")


class Layout(NamedTuple):
    """Where the resized window goes in the ``S x S`` output: ``(x, y)`` offset and size.

    The content rectangle of a crop: the rest of the output is padding.
    """

    x: int
    y: int
    w: int
    h: int


def crop_window(box_xywh: Sequence[float], image_wh: Sequence[int], margin: float, aspect: str,
                *, source: str | os.PathLike = "<box>") -> tuple[int, int, int, int]:
    """Return the ``(left, top, right, bottom)`` window to cut for a box, inside the image.

    ``aspect='square'``: a square of side ``max(w, h)`` (after the margin), centred on the box
    centre and shifted, not shrunk, to lie inside the image. A square longer than the
    image's short side shrinks to that side (less context) if the box still fits in it;
    otherwise the window spans the short side and the box's extent along the long side, and
    is not square. ``aspect='keep'``: the margined box clamped to the image.

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
    check_box((x, y, w, h), (img_w, img_h), source=source)

    cx, cy = x + w / 2.0, y + h / 2.0
    mw, mh = w * (1.0 + 2.0 * margin), h * (1.0 + 2.0 * margin)
    if aspect == "keep":
        left, right = _clamp_span(cx - mw / 2.0, cx + mw / 2.0, img_w)
        top, bottom = _clamp_span(cy - mh / 2.0, cy + mh / 2.0, img_h)
        return left, top, right, bottom

    # The box's pixels inside the image, as integer edges.
    box_left, box_right = max(0, math.floor(x)), min(img_w, math.ceil(x + w))
    box_top, box_bottom = max(0, math.floor(y)), min(img_h, math.ceil(y + h))
    short = min(img_w, img_h)
    side = max(1, int(round(max(mw, mh))))
    if side <= short:
        side_w = side_h = side
    elif max(box_right - box_left, box_bottom - box_top) <= short:
        side_w = side_h = short                     # give up context, not pixels
    elif img_w <= img_h:       # the box alone is longer than the short side (here: the width)
        side_w, side_h = img_w, box_bottom - box_top
    else:
        side_w, side_h = box_right - box_left, img_h
    left, right = _place(cx, side_w, img_w, box_left, box_right)
    top, bottom = _place(cy, side_h, img_h, box_top, box_bottom)
    return left, top, right, bottom


def check_box(box_xywh: Sequence[float], image_wh: Sequence[int] | None, *,
              source: str | os.PathLike = "<box>", line: int | None = None) -> None:
    """Raise :class:`DataError` for a box no crop can be cut from: a non-finite value, zero or
    negative width/height, or (when ``image_wh`` is known) no pixel inside the image or an
    edge more than :data:`BOX_TOLERANCE` of the image's side outside it.

    Boxes that only partly leave the image are fine (they are clamped). The one rule for
    both the annotation reader and the cropper.
    """
    x, y, w, h = (float(v) for v in box_xywh)
    value = " ".join(str(v) for v in box_xywh)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DataError(source, "bounding box has a non-finite value", line=line, value=value)
    if w <= 0 or h <= 0:
        raise DataError(source, "bounding box has zero or negative area", line=line,
                        value=value)
    if image_wh is None:
        return
    img_w, img_h = int(image_wh[0]), int(image_wh[1])
    if img_w <= 0 or img_h <= 0:
        raise DataError(source, "image has zero size", line=line, value=(img_w, img_h))
    if x >= img_w or y >= img_h or x + w <= 0 or y + h <= 0:
        raise DataError(source, f"bounding box does not overlap the {img_w}x{img_h} image",
                        line=line, value=value)
    tx, ty = BOX_TOLERANCE * img_w, BOX_TOLERANCE * img_h
    if x < -tx or y < -ty or x + w > img_w + tx or y + h > img_h + ty:
        raise DataError(source, f"bounding box leaves the {img_w}x{img_h} image by more than "
                                f"{BOX_TOLERANCE:.0%} of its side", line=line, value=value)


def _place(centre: float, side: int, limit: int, box_lo: int, box_hi: int) -> tuple[int, int]:
    """Span of length ``side`` centred on ``centre``, shifted into ``[0, limit)`` and, where
    it can, over the whole box extent ``[box_lo, box_hi)``."""
    if side >= limit:
        return 0, limit
    start = int(round(centre - side / 2.0))
    lo, hi = max(0, box_hi - side), min(box_lo, limit - side)
    if lo > hi:                        # the box is longer than the span: stay inside the image
        lo, hi = 0, limit - side
    start = min(max(start, lo), hi)
    return start, start + side


def _clamp_span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Round a float span to integer edges and clamp it to ``[0, limit]``, keeping >= 1 pixel."""
    start = min(max(int(round(lo)), 0), limit - 1)
    stop = max(min(int(round(hi)), limit), start + 1)
    return start, stop


def squeeze_limit(aspect: str, overflow: str, max_squeeze: float) -> float:
    """The largest aspect distortion a crop may get: 1 (none) unless a square crop squeezes."""
    if overflow not in OVERFLOWS:
        raise ValueError(f"unknown overflow {overflow!r}; expected one of {OVERFLOWS}")
    if not max_squeeze >= 1:
        raise ValueError(f"max_squeeze must be >= 1, got {max_squeeze}")
    return float(max_squeeze) if aspect == "square" and overflow == "squeeze" else 1.0


def letterbox_geometry(crop_wh: Sequence[float], size: int,
                       max_squeeze: float = 1.0) -> Layout:
    """Fit a ``w x h`` crop into ``size x size``.

    The longer side becomes ``size``; the shorter keeps the aspect, stretched by up to
    ``max_squeeze`` towards ``size`` (1 = no distortion). The result is centred; the rest of
    the output is padding. Returns the content :class:`Layout` ``(x, y, w, h)``.
    """
    w, h = float(crop_wh[0]), float(crop_wh[1])
    if w <= 0 or h <= 0 or size <= 0:
        raise ValueError(f"letterbox needs positive sizes, got crop {w}x{h} into {size}")
    scale = size / max(w, h)
    new_w = min(size, max(1, int(round(w * scale * (max_squeeze if w < h else 1.0)))))
    new_h = min(size, max(1, int(round(h * scale * (max_squeeze if h < w else 1.0)))))
    return Layout((size - new_w) // 2, (size - new_h) // 2, new_w, new_h)


def padded_pixels(layout: Layout, size: int) -> int:
    """Number of padding pixels of an ``S x S`` crop with this content layout."""
    return size * size - layout.w * layout.h


def jpeg_draft_factor(image_wh: Sequence[int], window_wh: Sequence[int], size: int) -> int:
    """The DCT scaling factor (1, 2, 4 or 8) a JPEG crop is decoded at (see imageio).

    The request keeps at least ``size`` pixels along the window's longer side, and is only
    made when the window is shrunk 2x or more; the factor is Pillow's choice for that request
    (the largest of 8, 4, 2, 1 not above ``min(W // req_w, H // req_h)``).
    """
    request = draft_request(image_wh, window_wh, size)
    if request is None:
        return 1
    fits = min(int(image_wh[0]) // request[0], int(image_wh[1]) // request[1])
    return next(f for f in (8, 4, 2, 1) if fits >= f)


def draft_request(image_wh: Sequence[int], window_wh: Sequence[int],
                  size: int) -> tuple[int, int] | None:
    """The size to ask a JPEG decoder's draft mode for, or None when not worth it."""
    long_side = max(window_wh)
    if long_side < 2 * size:
        return None
    img_w, img_h = int(image_wh[0]), int(image_wh[1])
    return (max(1, math.ceil(img_w * size / long_side)),
            max(1, math.ceil(img_h * size / long_side)))
