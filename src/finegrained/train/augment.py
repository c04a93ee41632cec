"""Random augmentation on the accelerator: jittable, static shapes, per-example randomness.

``augment_batch(images, rng, augmentation, out_size, lighting)`` turns a uint8 batch
``[B, S, S, 3]`` into float32 ``[B, out, out, 3]`` on the 0..255 scale (the model
normalises inside). Every
example draws its own crop box, rotation, flip and colour changes (``[B, ...]`` arrays of
random numbers from ``rng``), so the result depends only on ``rng`` and the batch, never on
how the batch is sharded.

Order: crop box (random-resized crop x scale jitter) -> [rotation: the box is shrunk and
moved until its rotated copy lies inside the image] -> resample to ``out`` -> flip ->
colour jitter (brightness, contrast, saturation, hue; clipped to 0..255) -> PCA lighting
(AlexNet; not clipped, as in the original recipe).

Resampling uses ``jax.image.scale_and_translate`` (bilinear, antialiased when shrinking):
the box is dynamic but the output shape is static, so one compiled step serves every batch.
The deterministic evaluation view, :func:`center_crop`, uses the same resampler, so an
augmentation with every magnitude at zero and a full crop is exactly ``center_crop(x, out,
crop_fraction=1.0)``. A rotated box is an affine warp that ``scale_and_translate`` cannot
express, so with ``rotation > 0`` the crop goes through :func:`_rotated_resample` instead
(bilinear gather, box-filter antialiasing by supersampling); with ``rotation == 0`` the
rotation code is not traced at all and the output is bit-identical to the unrotated path.

The random draws: ``jax.random.split(rng, 6)`` gives the box, flip, brightness, contrast,
saturation and lighting keys; rotation and hue use ``jax.random.fold_in(rng, 6)`` and
``fold_in(rng, 7)``, so adding them left the six older streams unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from finegrained.errors import ConfigError

# ITU-R BT.601 luma weights, as torchvision / tf.image use for grayscale.
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Every augmentation magnitude; the zero value of each disables it. The values come
    from the config (``$defs/augment`` of the schema, where their defaults live).

    crop_area: (min, max) fraction of the image area kept by the random-resized crop
      (Inception uses (0.08, 1.0)); (1.0, 1.0) with aspect_ratio (1, 1) keeps the full image.
    aspect_ratio: (min, max) width/height ratio of the crop box, sampled log-uniformly.
    scale_jitter: the box side is further divided by f ~ U(1, 1 + scale_jitter), i.e. the
      image is zoomed in by up to that factor before a random crop (VGG/ResNet-style scale
      augmentation); 0 disables.
    rotation: maximum rotation in degrees; each example turns its crop by an angle drawn
      from U(-rotation, rotation) (positive = counter-clockwise). The box is first shrunk
      about its centre to the largest size whose rotated copy fits inside the image, and
      moved inside if needed, so no empty corners show; 0 disables (and keeps the
      unrotated resampler).
    flip: probability of a horizontal flip (0.5 usual, 0 disables).
    brightness / contrast / saturation: factor drawn from U(1 - m, 1 + m); 0 disables.
    hue: hue rotation drawn from U(-hue, hue), as a fraction of the colour circle
      (torchvision's ColorJitter hue, at most 0.5), done in HSV so each pixel keeps its
      largest and smallest channel (value and saturation); 0 disables.
    pca_lighting: sigma of AlexNet lighting noise alpha ~ N(0, sigma) per principal axis
      (0.1 in AlexNet), see :func:`lighting_offset`; 0 disables. Needs the
      eigen-decomposition from the stats JSON.
    """

    crop_area: tuple[float, float]
    aspect_ratio: tuple[float, float]
    scale_jitter: float
    rotation: float
    flip: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    pca_lighting: float

    @classmethod
    def none(cls) -> "Augmentation":
        """No augmentation at all: the full image, no flip, no colour change (the view an
        un-augmented training step and the evaluation share)."""
        return cls(crop_area=(1.0, 1.0), aspect_ratio=(1.0, 1.0), scale_jitter=0.0,
                   rotation=0.0, flip=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
                   hue=0.0, pca_lighting=0.0)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Augmentation":
        """From a config ``augment`` block (every key given, as the validated config has)."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(d) != fields:
            raise ConfigError(f"augment: unknown keys {sorted(set(d) - fields)}, missing keys "
                              f"{sorted(fields - set(d))}")
        for key in ("crop_area", "aspect_ratio"):
            d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    def replace(self, **changes) -> "Augmentation":
        return dataclasses.replace(self, **changes)


class Lighting(NamedTuple):
    """Eigen-decomposition of the RGB covariance of training pixels on the 0..255 scale
    (``finegrained.data.stats``): eigval [3] eigenvalues (variances, descending),
    eigvec [3, 3] eigenvectors as columns."""

    eigval: np.ndarray
    eigvec: np.ndarray


def lighting_from_stats(stats: Mapping) -> Lighting:
    """Read the eigen-decomposition from the stats JSON (dict). Accepts the keys written by
    ``finegrained.data.stats`` (``eigenvalues``/``eigenvectors``) and the short
    ``eigval``/``eigvec``."""
    eigval = stats["eigenvalues"] if "eigenvalues" in stats else stats["eigval"]
    eigvec = stats["eigenvectors"] if "eigenvectors" in stats else stats["eigvec"]
    return Lighting(np.asarray(eigval, np.float32).reshape(3),
                    np.asarray(eigvec, np.float32).reshape(3, 3))


def lighting_offset(alpha: jax.Array, lighting: Lighting) -> jax.Array:
    """Per-image RGB offset ``eigvec @ (alpha * sqrt(eigval))`` for ``alpha`` [B, 3].

    Each principal axis is scaled by its standard deviation (the convention documented in
    ``finegrained.data.stats``), so ``alpha ~ N(0, sigma)`` is in units of the pixel
    spread along that axis and the offset has the pixels' 0..255 scale whatever scale the
    statistics were computed on.
    """
    std = jnp.sqrt(jnp.clip(jnp.asarray(lighting.eigval, jnp.float32), 0.0, None))
    eigvec = jnp.asarray(lighting.eigvec, jnp.float32)
    return jnp.einsum("ij,bj->bi", eigvec, alpha * std[None, :])


def _resample_box(image: jax.Array, box: jax.Array, out: int) -> jax.Array:
    """Resample the box ``(y0, x0, h, w)`` (pixels) of one HWC float image to ``out x out``."""
    y0, x0, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([out / h, out / w])
    translation = jnp.stack([-y0 * scale[0], -x0 * scale[1]])
    return jax.image.scale_and_translate(
        image, (out, out, image.shape[-1]), (0, 1), scale, translation,
        method="linear", antialias=True)


def _resample(images: jax.Array, boxes: jax.Array, out: int) -> jax.Array:
    images = images.astype(jnp.float32)
    return jax.vmap(_resample_box, in_axes=(0, 0, None))(images, boxes, out)


def center_crop(images: jax.Array, out: int, crop_fraction: float = 0.875) -> jax.Array:
    """Deterministic evaluation view: the central square of side ``crop_fraction`` x the
    shorter side, resized to ``out`` (the same as resizing the shorter side to
    ``out / crop_fraction`` and cutting the central ``out x out``). uint8 or float in,
    float32 0..255 out."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    batch, height, width = images.shape[:3]
    side = crop_fraction * min(height, width)
    box = jnp.asarray([(height - side) / 2, (width - side) / 2, side, side], jnp.float32)
    return _resample(images, jnp.broadcast_to(box, (batch, 4)), out)


def _sample_boxes(rng: jax.Array, augmentation: Augmentation, batch: int, height: int,
                  width: int) -> jax.Array:
    """Crop boxes ``(y0, x0, h, w)`` in pixels, ``[batch, 4]``, one per example."""
    u = jax.random.uniform(rng, (batch, 5))
    low, high = augmentation.crop_area
    area = low + u[:, 0] * (high - low)
    lo, hi = np.log(augmentation.aspect_ratio[0]), np.log(augmentation.aspect_ratio[1])
    ratio = jnp.exp(lo + u[:, 1] * (hi - lo))
    # Fractions of the image height and width: fh * fw = area, fw / fh = ratio.
    fh = jnp.sqrt(area / ratio)
    fw = jnp.sqrt(area * ratio)
    if augmentation.scale_jitter > 0:
        zoom = 1.0 + u[:, 2] * augmentation.scale_jitter
        fh, fw = fh / zoom, fw / zoom
    # Boxes wider/taller than the image are clipped (instead of Inception's rejection loop).
    h = jnp.clip(fh, 0.0, 1.0) * height
    w = jnp.clip(fw, 0.0, 1.0) * width
    y0 = u[:, 3] * (height - h)
    x0 = u[:, 4] * (width - w)
    return jnp.stack([y0, x0, h, w], axis=1).astype(jnp.float32)


def _fit_rotated_boxes(boxes: jax.Array, angles: jax.Array, height: int,
                       width: int) -> jax.Array:
    """Boxes ``(cy, cx, h, w)`` (centre and size, pixels) whose copy rotated by ``angles``
    (radians) about its centre lies inside ``[0, height] x [0, width]``.

    Each sampled box ``(y0, x0, h, w)`` is shrunk about its centre by the largest factor
    <= 1 that lets the rotated box's bounding box fit in the image, then placed so that its
    bounding box takes the same relative position in the free range as the sampled box did
    (a box flush with the left edge stays flush with it; a full-image box stays centred).
    """
    y0, x0, h, w = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    cos, sin = jnp.abs(jnp.cos(angles)), jnp.abs(jnp.sin(angles))
    # Height and width of the rotated box's axis-aligned bounding box.
    bound_h, bound_w = h * cos + w * sin, h * sin + w * cos
    shrink = jnp.minimum(1.0, jnp.minimum(height / bound_h, width / bound_w))

    def place(start, side, bound, size):
        free = size - side
        position = jnp.where(free > 0, start / jnp.where(free > 0, free, 1.0), 0.5)
        return bound / 2 + jnp.clip(position, 0.0, 1.0) * (size - bound)

    cy = place(y0, h, bound_h * shrink, height)
    cx = place(x0, w, bound_w * shrink, width)
    return jnp.stack([cy, cx, h * shrink, w * shrink], axis=1)


def _bilinear(image: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
    """Bilinear sample of one HWC image at array coordinates ``y``, ``x`` (pixel centres at
    integers; any shape). Coordinates are clamped to the outer pixel centres: the boxes lie
    inside the image, so this only ever extends the edge pixels over their own outer half.

    Each sample gathers its 2x2 neighbourhood in one gather, together with the
    neighbours' own coordinates (two extra channels), and weighs them by the tent
    ``max(0, 1 - |y - py|) * max(0, 1 - |x - px|)``. The weights come from the coordinates
    actually gathered, not from a second ``floor``: XLA may recompute ``y``, ``x`` in each
    fusion with different rounding (seen on CPU), and a floor that disagrees with the
    gather by one pixel at an integer coordinate would read the wrong neighbour at full
    weight. With the tent, such a disagreement costs one rounding error.
    """
    height, width, channels = image.shape
    grid_y, grid_x = jnp.meshgrid(jnp.arange(height, dtype=image.dtype),
                                  jnp.arange(width, dtype=image.dtype), indexing="ij")
    packed = jnp.concatenate([image, grid_y[..., None], grid_x[..., None]], axis=-1)
    y = jnp.clip(y, 0.0, height - 1.0)
    x = jnp.clip(x, 0.0, width - 1.0)
    # Top-left of the 2x2 neighbourhood (dynamic_slice keeps it inside the image).
    y_lo = jnp.floor(y).astype(jnp.int32).ravel()
    x_lo = jnp.floor(x).astype(jnp.int32).ravel()
    patches = jax.vmap(lambda i, j: jax.lax.dynamic_slice(
        packed, (i, j, 0), (2, 2, channels + 2)))(y_lo, x_lo)      # [N, 2, 2, C + 2]
    wy = jnp.maximum(0.0, 1.0 - jnp.abs(y.reshape(-1, 1, 1) - patches[..., channels]))
    wx = jnp.maximum(0.0, 1.0 - jnp.abs(x.reshape(-1, 1, 1) - patches[..., channels + 1]))
    # (a sum, not an einsum: a GPU dot may round float32 operands to TF32)
    values = jnp.sum((wy * wx)[..., None] * patches[..., :channels], axis=(1, 2))
    return values.reshape(*y.shape, channels)


def _rotated_resample_box(image: jax.Array, box: jax.Array, angle: jax.Array, out: int,
                          supersample: int) -> jax.Array:
    """Resample the box ``(cy, cx, h, w)`` of one HWC float image, rotated by ``angle``
    (radians, counter-clockwise as displayed) about its centre, to ``out x out``.

    Each output pixel averages ``supersample**2`` bilinear samples spread evenly over its
    footprint in the box (a box filter: antialiasing when the box is larger than ``out``).
    """
    cy, cx, h, w = box[0], box[1], box[2], box[3]
    n = out * supersample
    # Sample positions across the box, as fractions of its side centred on 0.
    t = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n - 0.5
    dy, dx = t[:, None] * h, t[None, :] * w
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # Output offset (dy, dx) reads the image at the offset turned by the angle; pixel
    # (i, j) covers [i, i + 1) x [j, j + 1), so its centre is at array index (i, j) + 0.5.
    y = cy + cos * dy + sin * dx - 0.5
    x = cx - sin * dy + cos * dx - 0.5
    samples = _bilinear(image, y, x)
    return samples.reshape(out, supersample, out, supersample, -1).mean(axis=(1, 3))


def _rotated_resample(images: jax.Array, boxes: jax.Array, angles: jax.Array,
                      out: int) -> jax.Array:
    """Rotated crops ``[B, out, out, C]`` of the boxes ``(cy, cx, h, w)`` (see
    :func:`_fit_rotated_boxes`); ``angles`` [B] in radians."""
    height, width = images.shape[1:3]
    # Static: enough samples per output pixel to cover the largest possible shrink.
    supersample = max(1, int(np.ceil(max(height, width) / out)))
    images = images.astype(jnp.float32)
    return jax.vmap(_rotated_resample_box, in_axes=(0, 0, 0, None, None))(
        images, boxes, angles, out, supersample)


def _grayscale(images: jax.Array) -> jax.Array:
    return jnp.einsum("bhwc,c->bhw", images, jnp.asarray(_LUMA, images.dtype))[..., None]


def _uniform(rng: jax.Array, batch: int, magnitude: float) -> jax.Array:
    return jax.random.uniform(rng, (batch,), minval=-magnitude, maxval=magnitude)


def _uniform_factor(rng: jax.Array, batch: int, magnitude: float) -> jax.Array:
    return jax.random.uniform(rng, (batch, 1, 1, 1), minval=1.0 - magnitude,
                              maxval=1.0 + magnitude)


def shift_hue(images: jax.Array, delta: jax.Array) -> jax.Array:
    """Rotate the hue of float RGB images ``[B, H, W, 3]`` by ``delta`` [B] turns (1.0 is the
    full colour circle: 1/3 takes red to green) in HSV space.

    Each pixel keeps its value V (largest channel) and chroma C (largest - smallest
    channel), so grays are untouched and nothing leaves the input's range. The HSV hue H'
    (in sextants, 0..6) comes from the usual piecewise formula and the result from the
    closed form ``channel_n = V - C * clip(min(k, 4 - k), 0, 1)``, ``k = (n + H') mod 6``
    with n = 5, 3, 1 for R, G, B.
    """
    r, g, b = images[..., 0:1], images[..., 1:2], images[..., 2:3]
    value = jnp.max(images, axis=-1, keepdims=True)
    chroma = value - jnp.min(images, axis=-1, keepdims=True)
    safe = jnp.where(chroma > 0, chroma, 1.0)   # grays: hue is arbitrary and C = 0
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    hue = jnp.where(r == value, bc - gc, jnp.where(g == value, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = hue + 6.0 * delta.reshape(-1, 1, 1, 1)
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0], images.dtype) + hue, 6.0)
    return value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def augment_batch(images: jax.Array, rng: jax.Array, augmentation: Augmentation, out_size: int,
                  lighting: Lighting | None = None) -> jax.Array:
    """Random training view of a uint8 batch ``[B, H, W, 3]`` -> float32 ``[B, out, out, 3]``."""
    if augmentation.pca_lighting > 0 and lighting is None:
        raise ValueError("pca_lighting > 0 needs the eigval/eigvec Lighting from the stats JSON")
    batch, height, width = images.shape[:3]
    k_box, k_flip, k_bright, k_contrast, k_sat, k_light = jax.random.split(rng, 6)
    # Later additions fold in 6 and 7 instead of splitting more keys, so the six streams
    # above (and every older configuration's output) stay as they were.
    k_rotation, k_hue = jax.random.fold_in(rng, 6), jax.random.fold_in(rng, 7)

    boxes = _sample_boxes(k_box, augmentation, batch, height, width)
    if augmentation.rotation > 0:
        angles = jnp.deg2rad(_uniform(k_rotation, batch, augmentation.rotation))
        boxes = _fit_rotated_boxes(boxes, angles, height, width)
        x = _rotated_resample(images, boxes, angles, out_size)
    else:
        x = _resample(images, boxes, out_size)

    if augmentation.flip > 0:
        flip = jax.random.bernoulli(k_flip, augmentation.flip, (batch, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1, :], x)

    colour = False
    if augmentation.brightness > 0:
        x = x * _uniform_factor(k_bright, batch, augmentation.brightness)
        colour = True
    if augmentation.contrast > 0:
        mean = jnp.mean(_grayscale(x), axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * _uniform_factor(k_contrast, batch, augmentation.contrast) + mean
        colour = True
    if augmentation.saturation > 0:
        gray = _grayscale(x)
        x = (x - gray) * _uniform_factor(k_sat, batch, augmentation.saturation) + gray
        colour = True
    if augmentation.hue > 0:
        x = shift_hue(x, _uniform(k_hue, batch, augmentation.hue))
        colour = True
    if colour:
        x = jnp.clip(x, 0.0, 255.0)

    if augmentation.pca_lighting > 0:
        alpha = augmentation.pca_lighting * jax.random.normal(k_light, (batch, 3))
        x = x + lighting_offset(alpha, lighting)[:, None, None, :]
    return x


def pca_alpha(rng: jax.Array, augmentation: Augmentation, batch: int) -> jax.Array:
    """The lighting ``alpha`` that :func:`augment_batch` draws for ``rng`` (for tests and
    inspection)."""
    k_light = jax.random.split(rng, 6)[5]
    return augmentation.pca_lighting * jax.random.normal(k_light, (batch, 3))


def rotation_angles(rng: jax.Array, augmentation: Augmentation, batch: int) -> jax.Array:
    """The per-example rotations in degrees that :func:`augment_batch` draws for ``rng``."""
    return _uniform(jax.random.fold_in(rng, 6), batch, augmentation.rotation)


def hue_shifts(rng: jax.Array, augmentation: Augmentation, batch: int) -> jax.Array:
    """The per-example hue shifts (turns) that :func:`augment_batch` draws for ``rng``."""
    return _uniform(jax.random.fold_in(rng, 7), batch, augmentation.hue)


__all__: Sequence[str] = ("Augmentation", "Lighting", "lighting_from_stats", "lighting_offset",
                          "augment_batch", "center_crop", "shift_hue", "pca_alpha",
                          "rotation_angles", "hue_shifts")
