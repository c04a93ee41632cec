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
  and the window is mapped through that factor. Decoding only the crop's rows/columns
  (``jpeg_crop_scanline``) is not reachable through pip-installable wheels without the
  system ``libturbojpeg``; see ``benchmarks/crop_throughput.py`` for the measurements.
* **Any mode to RGB.** Palette and alpha images are composited onto mid-grey
  (:data:`~finegrained.data.crop.PAD_VALUE`), 16-bit images are scaled to 8 bits, CMYK and
  greyscale are converted by Pillow.
* **High-quality resize.** Bicubic with ``reducing_gap``; the crop is letterboxed onto
  mid-grey when it is not square (see :mod:`finegrained.data.crop`).
* **Bad files raise** :class:`~finegrained.errors.DataError` naming the file: missing,
  unidentifiable, truncated or otherwise undecodable. Nothing global (such as
  ``ImageFile.LOAD_TRUNCATED_IMAGES``) is changed.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from finegrained.data.crop import PAD_VALUE, crop_window, letterbox_geometry
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

#: Resize filter (bicubic: ~25% cheaper than Lanczos here, visually the same at these ratios)
#: and Pillow's reduction gap (box-reduce to within 2x of the target, then bicubic).
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 2.0


def load_crop(path: str | os.PathLike, box_xywh: Sequence[float] | None, size: int,
              margin: float, aspect: str, *,
              image_wh: Sequence[int] | None = None) -> np.ndarray:
    """Decode ``path`` and return the crop of ``box_xywh`` as a ``(size, size, 3)`` uint8 array.

    ``box_xywh`` is ``(x, y, w, h)`` in stored pixels; ``None`` (or any NaN) means the whole
    image. ``margin`` and ``aspect`` are as in :func:`~finegrained.data.crop.crop_window`.
    ``image_wh``, when given (a manifest's ``width``/``height``), must equal the stored size:
    a mismatch means the box belongs to another version of the file.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            return _crop_open_image(im, path, box_xywh, size, margin, aspect, image_wh)
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        raise DataError(path, "not a recognised image format") from exc
    except _DECODE_ERRORS as exc:
        raise DataError(path, f"cannot decode image: {exc}") from exc


def _crop_open_image(im: Image.Image, path: str, box_xywh, size: int, margin: float,
                     aspect: str, image_wh) -> np.ndarray:
    stored_w, stored_h = im.size
    if image_wh is not None and (int(image_wh[0]), int(image_wh[1])) != (stored_w, stored_h):
        raise DataError(path, f"stored image size {stored_w}x{stored_h} differs from the "
                              f"manifest's", value=tuple(int(v) for v in image_wh))
    if box_xywh is None or any(v is None or math.isnan(float(v)) for v in box_xywh):
        box_xywh = (0, 0, stored_w, stored_h)
    left, top, right, bottom = crop_window(box_xywh, (stored_w, stored_h), margin, aspect,
                                           source=path)
    orientation = im.getexif().get(_ORIENTATION_TAG, 1)

    # DCT scaling: the decoded image is 1/scale of the stored one, pixel i covering stored
    # pixels [i*scale, (i+1)*scale), so the window maps by plain division.
    scale = _draft_scale(im, (right - left, bottom - top), size)
    im.load()
    region = im.crop(_scaled_box((left, top, right, bottom), scale, im.size))
    region = to_rgb(region)
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        region = region.transpose(transpose)
    return letterbox(region, size)


def _draft_scale(im: Image.Image, window_wh: tuple[int, int], size: int) -> int:
    """Ask a JPEG decoder for DCT downscaling that keeps >= ``size`` px on the window's long side.

    Returns the chosen factor (1, 2, 4 or 8); 1 for other formats or when not worth it.
    """
    long_side = max(window_wh)
    if im.format not in ("JPEG", "MPO") or long_side < 2 * size:  # MPO: camera JPEGs
        return 1
    stored_w, stored_h = im.size
    # Pillow picks the largest factor f in {8, 4, 2, 1} with f <= stored // requested.
    requested = (max(1, math.ceil(stored_w * size / long_side)),
                 max(1, math.ceil(stored_h * size / long_side)))
    result = im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else None, requested)
    if result is None:
        return 1
    _, box = result
    return max(1, int(round(stored_w / box[2])))


def _scaled_box(window: tuple[int, int, int, int], scale: int,
                decoded_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """Map a stored-pixel window onto an image decoded at 1/``scale``, keeping >= 1 pixel."""
    if scale == 1:
        return window
    left, top, right, bottom = window
    w, h = decoded_wh
    new_left = min(left // scale, w - 1)
    new_top = min(top // scale, h - 1)
    new_right = max(min(-(-right // scale), w), new_left + 1)
    new_bottom = max(min(-(-bottom // scale), h), new_top + 1)
    return new_left, new_top, new_right, new_bottom


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


def letterbox(region: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to fit ``size x size`` keeping its aspect; pad with mid-grey."""
    new_w, new_h, off_x, off_y = letterbox_geometry(region.size, size)
    if region.size != (new_w, new_h):
        region = region.resize((new_w, new_h), RESAMPLE, reducing_gap=REDUCING_GAP)
    pixels = np.asarray(region, dtype=np.uint8)
    if (new_w, new_h) == (size, size):
        return np.ascontiguousarray(pixels)
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[off_y:off_y + new_h, off_x:off_x + new_w] = pixels
    return out
