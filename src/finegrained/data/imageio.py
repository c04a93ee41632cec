"""The one image decoder: file + box -> ``S x S x 3`` uint8 RGB crop.

Decisions, in the order they apply:

* **Format by content.** Pillow identifies files by their bytes, so a PNG named ``.jpg``
  decodes; the extension is never consulted.
* **Boxes are in stored-pixel coordinates.** NABirds ``sizes.txt`` lists the *stored*
  width/height and its boxes were drawn in browsers of 2014-15, which did not apply EXIF
  orientation, so the box is cut from the pixel grid as stored. The EXIF ``Orientation``
  tag is then applied to the crop, so the output shows the bird the way a viewer displays
  the photo. ``image_wh`` from a manifest is checked against the stored size.
* **Decode as little as possible.** For JPEG, when the crop will be shrunk 2x or more,
  Pillow's draft mode asks libjpeg-turbo for DCT-domain downscaling by 1/2, 1/4 or 1/8
  (the largest factor that still leaves at least ``S`` pixels along the crop's longer side),
  and the window is mapped through that factor exactly (a float source box for the resize,
  so a square window stays square). Decoding only the crop's rows/columns
  (``jpeg_crop_scanline``) is not reachable through pip-installable wheels without the
  system ``libturbojpeg``; see ``benchmarks/crop_throughput.py`` for the measurements.
* **Any mode to RGB.** Palette and alpha images are composited onto mid-grey
  (:data:`~finegrained.data.crop.PAD_VALUE`), 16-bit images are scaled to 8 bits, CMYK and
  greyscale are converted by Pillow.
* **High-quality resize.** Bicubic with ``reducing_gap``; the crop is letterboxed onto
  mid-grey when it is not square (see :mod:`finegrained.data.crop`), and the rectangle that
  holds image pixels comes with it (:class:`Crop`), so statistics can leave the padding out.
* **Bad files raise** :class:`~finegrained.errors.DataError` naming the file: missing,
  unidentifiable, truncated or otherwise undecodable, or holding several frames (an animated
  GIF, a multi-page TIFF, whatever its name says; a camera's MPO JPEG is one photo). Nothing global (such as
  ``ImageFile.LOAD_TRUNCATED_IMAGES``) is changed.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from finegrained.data.crop import (PAD_VALUE, Layout, crop_window, draft_request,
                                   letterbox_geometry, squeeze_limit)
from finegrained.errors import DataError

#: Exceptions Pillow raises on broken files (truncated data, bad headers, bad chunks).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  IndexError, Image.DecompressionBombError)

_ORIENTATION_TAG = 0x0112
#: EXIF orientation -> the transpose that turns stored pixels into the displayed image.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: The transposes that swap width and height.
_SWAPS_AXES = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270,
               Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90)

#: Formats whose extra frames are not other photos: a camera's multi-picture JPEG (MPO)
#: carries previews after its primary image, which is frame one.
SINGLE_PHOTO_FORMATS = ("MPO",)

#: Resize filter (bicubic: ~25% cheaper than Lanczos here, visually the same at these ratios)
#: and Pillow's reduction gap (box-reduce to within 2x of the target, then bicubic).
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 2.0


class Crop(NamedTuple):
    """A decoded crop: ``(S, S, 3)`` uint8 pixels and the :class:`~finegrained.data.crop.Layout`
    of the rectangle holding image pixels (the rest is :data:`PAD_VALUE` padding)."""

    pixels: np.ndarray
    content: Layout


def load_crop(path: str | os.PathLike, box_xywh: Sequence[float] | None, size: int,
              margin: float, aspect: str, *, image_wh: Sequence[int] | None = None,
              overflow: str = "pad", max_squeeze: float = 1.0) -> np.ndarray:
    """The pixels of :func:`decode_crop` (same arguments)."""
    return decode_crop(path, box_xywh, size, margin, aspect, image_wh=image_wh,
                       overflow=overflow, max_squeeze=max_squeeze).pixels


def decode_crop(path: str | os.PathLike, box_xywh: Sequence[float] | None, size: int,
                margin: float, aspect: str, *, image_wh: Sequence[int] | None = None,
                overflow: str = "pad", max_squeeze: float = 1.0) -> Crop:
    """Decode ``path`` and return the :class:`Crop` of ``box_xywh`` (``size x size`` pixels).

    ``box_xywh`` is ``(x, y, w, h)`` in stored pixels; ``None`` (or any NaN) means the whole
    image. ``margin`` and ``aspect`` are as in :func:`~finegrained.data.crop.crop_window`;
    ``overflow`` and ``max_squeeze`` decide how a square crop fits a box longer than the
    photo's short side (:func:`~finegrained.data.crop.squeeze_limit`).
    ``image_wh``, when given (a manifest's ``width``/``height``), must equal the stored size:
    a mismatch means the box belongs to another version of the file.
    """
    path = os.fspath(path)
    squeeze = squeeze_limit(aspect, overflow, max_squeeze)
    try:
        with Image.open(path) as im:
            return _crop_open_image(im, path, box_xywh, size, margin, aspect, image_wh, squeeze)
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        raise DataError(path, "not a recognised image format") from exc
    except _DECODE_ERRORS as exc:
        raise DataError(path, f"cannot decode image: {exc}") from exc


def _crop_open_image(im: Image.Image, path: str, box_xywh, size: int, margin: float,
                     aspect: str, image_wh, squeeze: float) -> Crop:
    frames = getattr(im, "n_frames", 1)
    if frames > 1 and im.format not in SINGLE_PHOTO_FORMATS:
        raise DataError(path, f"{im.format} file with {frames} frames (an animation or a "
                              f"multi-page file): which frame is the photo is not known")
    stored_w, stored_h = im.size
    if image_wh is not None and (int(image_wh[0]), int(image_wh[1])) != (stored_w, stored_h):
        raise DataError(path, f"stored image size {stored_w}x{stored_h} differs from the "
                              f"manifest's", value=tuple(int(v) for v in image_wh))
    if box_xywh is None or any(v is None or math.isnan(float(v)) for v in box_xywh):
        box_xywh = (0, 0, stored_w, stored_h)
    window = crop_window(box_xywh, (stored_w, stored_h), margin, aspect, source=path)
    window_w, window_h = window[2] - window[0], window[3] - window[1]
    orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    turned = transpose in _SWAPS_AXES

    # The output layout follows from the window in stored pixels, shown the way a viewer
    # shows it (a quarter turn swaps width and height).
    content = letterbox_geometry((window_h, window_w) if turned else (window_w, window_h),
                                 size, squeeze)
    target = (content.h, content.w) if turned else (content.w, content.h)

    # DCT scaling: the decoded image is 1/scale of the stored one, pixel i covering stored
    # pixels [i*scale, (i+1)*scale), so the window maps by plain division. The division is
    # kept exact (a float source box for the resize), never rounded edge by edge: rounding
    # left/top down and right/bottom up separately turned square windows into (n+1) x n
    # regions and left a one-pixel grey stripe.
    scale = _draft_scale(im, (window_w, window_h), size)
    im.load()
    if scale == 1:
        region, source_box = im.crop(window), None
    else:
        left, top, right, bottom = (v / scale for v in window)
        outer = (math.floor(left), math.floor(top), min(math.ceil(right), im.width),
                 min(math.ceil(bottom), im.height))
        region = im.crop(outer)
        source_box = (left - outer[0], top - outer[1], min(right, im.width) - outer[0],
                      min(bottom, im.height) - outer[1])
    region = to_rgb(region)
    if region.size != target or source_box is not None:
        region = region.resize(target, RESAMPLE, box=source_box, reducing_gap=REDUCING_GAP)
    if transpose is not None:
        region = region.transpose(transpose)
    return Crop(paste(region, content, size), content)


def _draft_scale(im: Image.Image, window_wh: tuple[int, int], size: int) -> int:
    """Ask a JPEG decoder for DCT downscaling that keeps >= ``size`` px on the window's long side.

    Returns the chosen factor (1, 2, 4 or 8); 1 for other formats or when not worth it
    (:func:`~finegrained.data.crop.jpeg_draft_factor` predicts it from the geometry alone).
    """
    stored_w = im.size[0]
    requested = draft_request(im.size, window_wh, size)
    if im.format not in ("JPEG", "MPO") or requested is None:  # MPO: camera JPEGs
        return 1
    result = im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else None, requested)
    if result is None:
        return 1
    _, box = result                      # (0, 0, stored_w / scale, stored_h / scale)
    return max(1, int(round(stored_w / box[2])))


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited onto mid-grey)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit data: Pillow's own conversion clips at 255 instead of scaling.
        values = np.asarray(im, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "F":
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (PAD_VALUE,) * 3 + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def paste(content: Image.Image, layout: Layout, size: int) -> np.ndarray:
    """Place resized RGB ``content`` at ``layout`` in a ``size x size`` mid-grey canvas."""
    pixels = np.asarray(content, dtype=np.uint8)
    if (layout.w, layout.h) == (size, size):
        return np.ascontiguousarray(pixels)
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[layout.y:layout.y + layout.h, layout.x:layout.x + layout.w] = pixels
    return out
