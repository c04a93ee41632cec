"""On-device augmentation: shapes, identities, exact flips and lighting, key determinism."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finegrained.train import augment as aug
from finegrained.train.augment import (AugmentConfig, Lighting, lighting_from_stats,
                                       lighting_offset, pca_alpha)

NONE = AugmentConfig.none()
# Jitted as the train step uses them (eager execution compiles every op: slow on CPU).
augment_batch = jax.jit(aug.augment_batch, static_argnums=(2, 3))
center_crop = jax.jit(aug.center_crop, static_argnums=(1, 2))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def lighting():
    # A real-looking decomposition: orthonormal columns, descending variances (0..255 scale).
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    return lighting_from_stats({"eigenvalues": [3000.0, 200.0, 40.0],
                                "eigenvectors": q.tolist()})


def test_shapes_and_dtype(images, lighting):
    cfg = AugmentConfig(scale_jitter=0.2, brightness=0.3, contrast=0.3, saturation=0.3,
                        pca_lighting=0.1)
    out = augment_batch(images, jax.random.key(0), cfg, 16, lighting)
    assert out.shape == (4, 16, 16, 3) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    ev = center_crop(images, 16)
    assert ev.shape == (4, 16, 16, 3) and ev.dtype == jnp.float32


def test_identity_when_everything_is_off(images):
    out = augment_batch(images, jax.random.key(3), NONE, 16)
    np.testing.assert_allclose(out, center_crop(images, 16, crop_fraction=1.0), atol=1e-4)
    same = augment_batch(images, jax.random.key(3), NONE, 24)   # no resize: the pixels
    np.testing.assert_allclose(same, np.asarray(images, np.float32), atol=1e-3)


def test_center_crop_full_size_is_input(images):
    np.testing.assert_allclose(center_crop(images, 24, 1.0), np.asarray(images, np.float32),
                               atol=1e-3)
    # crop fraction 0.5 at output 12 = the central 12x12 pixels exactly
    np.testing.assert_allclose(center_crop(images, 12, 0.5),
                               np.asarray(images[:, 6:18, 6:18], np.float32), atol=1e-3)


def test_flip_flips_exactly(images):
    cfg = dataclasses.replace(NONE, flip=1.0)
    out = augment_batch(images, jax.random.key(0), cfg, 24)
    np.testing.assert_allclose(out, np.asarray(images, np.float32)[:, :, ::-1], atol=1e-3)
    half = dataclasses.replace(NONE, flip=0.5)
    outs = np.asarray(augment_batch(jnp.tile(images[:1], (64, 1, 1, 1)), jax.random.key(1),
                                    half, 24))
    flipped = [np.allclose(o, outs[0][:, ::-1], atol=1e-3) and not np.allclose(o, outs[0])
               for o in outs]
    assert 10 < sum(flipped) < 54   # per-example coin, not one coin per batch


def test_pca_lighting_adds_exact_offset(images, lighting):
    cfg = dataclasses.replace(NONE, pca_lighting=0.5)
    key = jax.random.key(7)
    out = np.asarray(augment_batch(images, key, cfg, 24, lighting), np.float64)
    delta = out - np.asarray(images, np.float64)
    alpha = np.asarray(pca_alpha(key, cfg, 4), np.float64)
    expected = (lighting.eigvec.astype(np.float64)
                @ (alpha * np.sqrt(lighting.eigval.astype(np.float64))).T).T   # [B, 3]
    np.testing.assert_allclose(delta, np.broadcast_to(expected[:, None, None, :], delta.shape),
                               atol=2e-3)
    np.testing.assert_allclose(lighting_offset(jnp.asarray(alpha, jnp.float32), lighting),
                               expected, rtol=1e-5, atol=1e-4)
    assert np.abs(expected).max() > 1.0   # the test actually moved pixels


def test_lighting_needs_statistics(images):
    with pytest.raises(ValueError, match="stats"):
        aug.augment_batch(images, jax.random.key(0), AugmentConfig(pca_lighting=0.1), 16)


def test_keys_decide_the_output(images, lighting):
    cfg = AugmentConfig(scale_jitter=0.3, brightness=0.2, contrast=0.2, saturation=0.2,
                        pca_lighting=0.1)
    fn = lambda k: augment_batch(images, k, cfg, 16, lighting)  # noqa: E731
    a, b, c = fn(jax.random.key(0)), fn(jax.random.key(0)), fn(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # every example gets its own draw: identical inputs give different views
    same = augment_batch(jnp.tile(images[:1], (4, 1, 1, 1)), jax.random.key(2), cfg, 16,
                         lighting)
    assert not np.allclose(same[0], same[1])


def test_colour_jitter_stays_in_range(images):
    cfg = dataclasses.replace(NONE, brightness=0.9, contrast=0.9, saturation=0.9)
    out = np.asarray(augment_batch(images, jax.random.key(5), cfg, 24))
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert not np.allclose(out, np.asarray(images, np.float32))


def test_random_crop_zooms_in(images):
    cfg = dataclasses.replace(NONE, crop_area=(0.25, 0.25))
    # a horizontal ramp: a crop of a quarter of the area spans about half the range
    ramp = jnp.broadcast_to(jnp.linspace(0, 255, 64)[None, None, :, None],
                            (8, 64, 64, 3)).astype(jnp.uint8)
    out = np.asarray(augment_batch(ramp, jax.random.key(0), cfg, 32))
    spans = out[:, 16, -1, 0] - out[:, 16, 0, 0]
    assert np.all((spans > 90) & (spans < 160)), spans


def test_lighting_from_stats_short_keys():
    light = lighting_from_stats({"eigval": [3, 2, 1], "eigvec": np.eye(3).tolist()})
    assert isinstance(light, Lighting) and light.eigvec.shape == (3, 3)
