"""Random augmentation on the accelerator: jittable, static shapes, per-example randomness.

``augment_batch(images, rng, cfg, out_size, lighting)`` turns a uint8 batch ``[B, S, S, 3]``
into float32 ``[B, out, out, 3]`` on the 0..255 scale (the model normalises inside). Every
example draws its own crop box, flip and colour changes (``[B, ...]`` arrays of random
numbers from ``rng``), so the result depends only on ``rng`` and the batch, never on how
the batch is sharded.

Order: crop box (random-resized crop x scale jitter) -> resample to ``out`` -> flip ->
colour jitter (brightness, contrast, saturation; clipped to 0..255) -> PCA lighting
(AlexNet; not clipped, as in the original recipe).

Resampling uses ``jax.image.scale_and_translate`` (bilinear, antialiased when shrinking):
the box is dynamic but the output shape is static, so one compiled step serves every batch.
The deterministic evaluation view, :func:`center_crop`, uses the same resampler, so an
augmentation with every magnitude at zero and a full crop is exactly ``center_crop(x, out,
crop_fraction=1.0)``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ITU-R BT.601 luma weights, as torchvision / tf.image use for grayscale.
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation magnitude; the zero value of each disables it.

    crop_area: (min, max) fraction of the image area kept by the random-resized crop
      (Inception uses (0.08, 1.0)); (1.0, 1.0) with aspect_ratio (1, 1) keeps the full image.
    aspect_ratio: (min, max) width/height ratio of the crop box, sampled log-uniformly.
    scale_jitter: the box side is further divided by f ~ U(1, 1 + scale_jitter), i.e. the
      image is zoomed in by up to that factor before a random crop (VGG/ResNet-style scale
      augmentation); 0 disables.
    flip: probability of a horizontal flip (0.5 usual, 0 disables).
    brightness / contrast / saturation: factor drawn from U(1 - m, 1 + m); 0 disables.
    pca_lighting: sigma of AlexNet lighting noise alpha ~ N(0, sigma) per principal axis
      (0.1 in AlexNet), see :func:`lighting_offset`; 0 disables. Needs the
      eigen-decomposition from the stats JSON.
    """

    crop_area: tuple[float, float] = (0.25, 1.0)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    scale_jitter: float = 0.0
    flip: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    pca_lighting: float = 0.0

    @classmethod
    def none(cls) -> "AugmentConfig":
        """No augmentation at all: full image, no flip, no colour change."""
        return cls(crop_area=(1.0, 1.0), aspect_ratio=(1.0, 1.0), scale_jitter=0.0, flip=0.0)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "AugmentConfig":
        d = dict(d or {})
        for key in ("crop_area", "aspect_ratio"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


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


def _sample_boxes(rng: jax.Array, cfg: AugmentConfig, batch: int, height: int,
                  width: int) -> jax.Array:
    """Crop boxes ``(y0, x0, h, w)`` in pixels, ``[batch, 4]``, one per example."""
    u = jax.random.uniform(rng, (batch, 5))
    area = cfg.crop_area[0] + u[:, 0] * (cfg.crop_area[1] - cfg.crop_area[0])
    lo, hi = np.log(cfg.aspect_ratio[0]), np.log(cfg.aspect_ratio[1])
    ratio = jnp.exp(lo + u[:, 1] * (hi - lo))
    # Fractions of the image height and width: fh * fw = area, fw / fh = ratio.
    fh = jnp.sqrt(area / ratio)
    fw = jnp.sqrt(area * ratio)
    if cfg.scale_jitter > 0:
        zoom = 1.0 + u[:, 2] * cfg.scale_jitter
        fh, fw = fh / zoom, fw / zoom
    # Boxes wider/taller than the image are clipped (instead of Inception's rejection loop).
    h = jnp.clip(fh, 0.0, 1.0) * height
    w = jnp.clip(fw, 0.0, 1.0) * width
    y0 = u[:, 3] * (height - h)
    x0 = u[:, 4] * (width - w)
    return jnp.stack([y0, x0, h, w], axis=1).astype(jnp.float32)


def _grayscale(images: jax.Array) -> jax.Array:
    return jnp.einsum("bhwc,c->bhw", images, jnp.asarray(_LUMA, images.dtype))[..., None]


def _uniform_factor(rng: jax.Array, batch: int, magnitude: float) -> jax.Array:
    return jax.random.uniform(rng, (batch, 1, 1, 1), minval=1.0 - magnitude,
                              maxval=1.0 + magnitude)


def augment_batch(images: jax.Array, rng: jax.Array, cfg: AugmentConfig, out_size: int,
                  lighting: Lighting | None = None) -> jax.Array:
    """Random training view of a uint8 batch ``[B, H, W, 3]`` -> float32 ``[B, out, out, 3]``."""
    if cfg.pca_lighting > 0 and lighting is None:
        raise ValueError("pca_lighting > 0 needs the eigval/eigvec Lighting from the stats JSON")
    batch, height, width = images.shape[:3]
    k_box, k_flip, k_bright, k_contrast, k_sat, k_light = jax.random.split(rng, 6)

    boxes = _sample_boxes(k_box, cfg, batch, height, width)
    x = _resample(images, boxes, out_size)

    if cfg.flip > 0:
        flip = jax.random.bernoulli(k_flip, cfg.flip, (batch, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1, :], x)

    colour = False
    if cfg.brightness > 0:
        x = x * _uniform_factor(k_bright, batch, cfg.brightness)
        colour = True
    if cfg.contrast > 0:
        mean = jnp.mean(_grayscale(x), axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * _uniform_factor(k_contrast, batch, cfg.contrast) + mean
        colour = True
    if cfg.saturation > 0:
        gray = _grayscale(x)
        x = (x - gray) * _uniform_factor(k_sat, batch, cfg.saturation) + gray
        colour = True
    if colour:
        x = jnp.clip(x, 0.0, 255.0)

    if cfg.pca_lighting > 0:
        alpha = cfg.pca_lighting * jax.random.normal(k_light, (batch, 3))
        x = x + lighting_offset(alpha, lighting)[:, None, None, :]
    return x


def pca_alpha(rng: jax.Array, cfg: AugmentConfig, batch: int) -> jax.Array:
    """The lighting ``alpha`` that :func:`augment_batch` draws for ``rng`` (for tests/inspection)."""
    k_light = jax.random.split(rng, 6)[5]
    return cfg.pca_lighting * jax.random.normal(k_light, (batch, 3))


__all__: Sequence[str] = ("AugmentConfig", "Lighting", "lighting_from_stats", "lighting_offset",
                          "augment_batch", "center_crop", "pca_alpha")
