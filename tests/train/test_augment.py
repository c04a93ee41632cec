"""On-device augmentation: shapes, identities, exact flips and lighting, key determinism."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finegrained.train import augment as aug
from finegrained.train.augment import (Augmentation, Lighting, lighting_from_stats,
                                       lighting_offset, pca_alpha)
from helpers.training import crop_and_flip

NONE = Augmentation.none()
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
    augmentation = crop_and_flip(scale_jitter=0.2, brightness=0.3, contrast=0.3, saturation=0.3,
                                 pca_lighting=0.1)
    out = augment_batch(images, jax.random.key(0), augmentation, 16, lighting)
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
    augmentation = dataclasses.replace(NONE, flip=1.0)
    out = augment_batch(images, jax.random.key(0), augmentation, 24)
    np.testing.assert_allclose(out, np.asarray(images, np.float32)[:, :, ::-1], atol=1e-3)
    half = dataclasses.replace(NONE, flip=0.5)
    outs = np.asarray(augment_batch(jnp.tile(images[:1], (64, 1, 1, 1)), jax.random.key(1),
                                    half, 24))
    flipped = [np.allclose(o, outs[0][:, ::-1], atol=1e-3) and not np.allclose(o, outs[0])
               for o in outs]
    assert 10 < sum(flipped) < 54   # per-example coin, not one coin per batch


def test_pca_lighting_adds_exact_offset(images, lighting):
    augmentation = dataclasses.replace(NONE, pca_lighting=0.5)
    key = jax.random.key(7)
    out = np.asarray(augment_batch(images, key, augmentation, 24, lighting), np.float64)
    delta = out - np.asarray(images, np.float64)
    alpha = np.asarray(pca_alpha(key, augmentation, 4), np.float64)
    expected = (lighting.eigvec.astype(np.float64)
                @ (alpha * np.sqrt(lighting.eigval.astype(np.float64))).T).T   # [B, 3]
    np.testing.assert_allclose(delta, np.broadcast_to(expected[:, None, None, :], delta.shape),
                               atol=2e-3)
    np.testing.assert_allclose(lighting_offset(jnp.asarray(alpha, jnp.float32), lighting),
                               expected, rtol=1e-5, atol=1e-4)
    assert np.abs(expected).max() > 1.0   # the test actually moved pixels


def test_lighting_needs_statistics(images):
    with pytest.raises(ValueError, match="stats"):
        aug.augment_batch(images, jax.random.key(0), crop_and_flip(pca_lighting=0.1), 16)


def test_keys_decide_the_output(images, lighting):
    augmentation = crop_and_flip(scale_jitter=0.3, brightness=0.2, contrast=0.2, saturation=0.2,
                                 pca_lighting=0.1)
    fn = lambda k: augment_batch(images, k, augmentation, 16, lighting)  # noqa: E731
    a, b, c = fn(jax.random.key(0)), fn(jax.random.key(0)), fn(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # every example gets its own draw: identical inputs give different views
    same = augment_batch(jnp.tile(images[:1], (4, 1, 1, 1)), jax.random.key(2), augmentation, 16,
                         lighting)
    assert not np.allclose(same[0], same[1])


def test_colour_jitter_stays_in_range(images):
    augmentation = dataclasses.replace(NONE, brightness=0.9, contrast=0.9, saturation=0.9)
    out = np.asarray(augment_batch(images, jax.random.key(5), augmentation, 24))
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert not np.allclose(out, np.asarray(images, np.float32))


def test_random_crop_zooms_in(images):
    augmentation = dataclasses.replace(NONE, crop_area=(0.25, 0.25))
    # a horizontal ramp: a crop of a quarter of the area spans about half the range
    ramp = jnp.broadcast_to(jnp.linspace(0, 255, 64)[None, None, :, None],
                            (8, 64, 64, 3)).astype(jnp.uint8)
    out = np.asarray(augment_batch(ramp, jax.random.key(0), augmentation, 32))
    spans = out[:, 16, -1, 0] - out[:, 16, 0, 0]
    assert np.all((spans > 90) & (spans < 160)), spans


def test_lighting_from_stats_short_and_long_keys():
    eigvec = np.array([[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    short = lighting_from_stats({"eigval": [3, 2, 1], "eigvec": eigvec.tolist()})
    long = lighting_from_stats({"eigenvalues": [3, 2, 1], "eigenvectors": eigvec.tolist()})
    for light in (short, long):
        assert isinstance(light, Lighting)
        assert light.eigval.dtype == np.float32 and light.eigval.tolist() == [3.0, 2.0, 1.0]
        np.testing.assert_array_equal(light.eigvec, eigvec.astype(np.float32))


# --- rotation -----------------------------------------------------------------------------

ROTATE = dataclasses.replace(NONE, rotation=30.0)


def _ramp(batch: int = 4, side: int = 64) -> jnp.ndarray:
    """I[y, x] = 2x + y: exact in uint8, and bilinear interpolation of it is exact."""
    yy, xx = np.mgrid[:side, :side]
    image = np.repeat((2 * xx + yy)[..., None], 3, axis=-1).astype(np.uint8)
    return jnp.asarray(np.broadcast_to(image, (batch, side, side, 3)))


def test_rotation_off_keeps_the_unrotated_resampler_bit_for_bit(images):
    augmentation = crop_and_flip(scale_jitter=0.2, flip=0.0, rotation=0.0, hue=0.0)

    @jax.jit
    def unrotated(images, key):   # the crop as it was before rotation existed
        boxes = aug._sample_boxes(jax.random.split(key, 6)[0], augmentation, 4, 24, 24)
        return aug._resample(images, boxes, 16)

    key = jax.random.key(4)
    np.testing.assert_array_equal(augment_batch(images, key, augmentation, 16),
                                  unrotated(images, key))


def test_rotated_crop_shapes_and_keys(images):
    augmentation = crop_and_flip(rotation=45.0, hue=0.2, brightness=0.2)
    out = augment_batch(images, jax.random.key(0), augmentation, 16)
    assert out.shape == (4, 16, 16, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, augment_batch(images, jax.random.key(0), augmentation, 16))
    assert not np.allclose(out, augment_batch(images, jax.random.key(1), augmentation, 16))
    # one angle per example, within the configured range
    angles = np.asarray(aug.rotation_angles(jax.random.key(0), augmentation, 4))
    assert np.all(np.abs(angles) <= 45.0) and len(set(angles.tolist())) == 4


@pytest.mark.parametrize("augmentation", [
    dataclasses.replace(NONE, rotation=45.0),
    crop_and_flip(crop_area=(0.08, 1.0), aspect_ratio=(0.5, 2.0), scale_jitter=0.3,
                  rotation=45.0)])
def test_rotation_shows_no_empty_corners(augmentation):
    # A constant image stays that constant everywhere, with random boxes too. (The sampler
    # extends edge pixels, so this alone cannot see a box poking out: the geometry and
    # the exact sample positions are checked by the next two tests.)
    const = jnp.full((16, 40, 40, 3), 200, jnp.uint8)
    out = np.asarray(augment_batch(const, jax.random.key(2), augmentation, 24))
    np.testing.assert_allclose(out, 200.0, atol=1e-3)


def test_fitted_rotated_box_lies_inside_and_is_the_largest():
    key = jax.random.key(9)
    augmentation = crop_and_flip(crop_area=(0.05, 1.0), aspect_ratio=(0.3, 3.0), scale_jitter=0.5)
    height, width = 30, 50
    boxes = aug._sample_boxes(key, augmentation, 256, height, width)
    angles = jax.random.uniform(jax.random.key(10), (256,), minval=-np.pi, maxval=np.pi)
    fitted = np.asarray(aug._fit_rotated_boxes(boxes, angles, height, width), np.float64)
    cy, cx, h, w = fitted.T
    a = np.asarray(angles, np.float64)
    corners_y = cy[:, None] + np.stack([np.cos(a) * sy * h / 2 + np.sin(a) * sx * w / 2
                                        for sy in (-1, 1) for sx in (-1, 1)], 1)
    corners_x = cx[:, None] + np.stack([-np.sin(a) * sy * h / 2 + np.cos(a) * sx * w / 2
                                        for sy in (-1, 1) for sx in (-1, 1)], 1)
    eps = 1e-3
    assert corners_y.min() >= -eps and corners_y.max() <= height + eps
    assert corners_x.min() >= -eps and corners_x.max() <= width + eps
    # shrunk only as far as needed: either the box kept its size, or its rotated copy
    # spans the full height or width of the image
    sampled = np.asarray(boxes, np.float64)
    kept = np.isclose(h, sampled[:, 2], rtol=1e-5) & np.isclose(w, sampled[:, 3], rtol=1e-5)
    span_h = corners_y.max(1) - corners_y.min(1)
    span_w = corners_x.max(1) - corners_x.min(1)
    touches = np.isclose(span_h, height, atol=1e-3) | np.isclose(span_w, width, atol=1e-3)
    assert np.all(kept | touches) and (~kept).sum() > 50
    np.testing.assert_allclose(h / w, sampled[:, 2] / sampled[:, 3], rtol=1e-5)  # same shape


def test_rotation_matches_the_analytic_warp_of_a_ramp():
    # Full crop of a 64x64 ramp rotated by theta: the box side shrinks to 64 / (|cos|+|sin|)
    # about the centre, and output pixel (i, j) reads the ramp at the rotated offset.
    augmentation = dataclasses.replace(NONE, rotation=40.0)
    key = jax.random.key(3)
    out = np.asarray(augment_batch(_ramp(), key, augmentation, 32), np.float64)
    theta = np.deg2rad(np.asarray(aug.rotation_angles(key, augmentation, 4), np.float64))
    assert np.all(np.abs(theta) > np.deg2rad(1.0))   # the draws did rotate
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    side = 64.0 / (np.abs(cos) + np.abs(sin))
    t = (np.arange(32) + 0.5) / 32 - 0.5
    dy, dx = t[None, :, None] * side, t[None, None, :] * side
    y = 32 + cos * dy + sin * dx - 0.5
    x = 32 - sin * dy + cos * dx - 0.5
    np.testing.assert_allclose(out[..., 0], 2 * x + y, atol=2e-3)
    np.testing.assert_allclose(out[..., 2], out[..., 0])


def test_quarter_turn_is_rot90_and_zero_turn_is_identity(images):
    boxes = jnp.tile(jnp.asarray([[12.0, 12.0, 24.0, 24.0]]), (4, 1))   # (cy, cx, h, w)
    rotate = jax.jit(aug._rotated_resample, static_argnums=3)
    quarter = rotate(images, boxes, jnp.full((4,), np.pi / 2), 24)
    np.testing.assert_allclose(quarter, np.rot90(np.asarray(images, np.float32), 1, (1, 2)),
                               atol=1e-3)   # counter-clockwise, like np.rot90
    np.testing.assert_allclose(rotate(images, boxes, jnp.zeros(4), 24),
                               np.asarray(images, np.float32), atol=1e-3)
    # shrinking by 2 supersamples 2x2 per output pixel: exactly the 2x2 block means
    half = rotate(images, boxes, jnp.zeros(4), 12)
    blocks = np.asarray(images, np.float32).reshape(4, 12, 2, 12, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(half, blocks, atol=1e-3)


def test_each_example_draws_its_own_rotation(images):
    augmentation = dataclasses.replace(NONE, rotation=30.0)
    same = np.asarray(augment_batch(jnp.tile(images[:1], (4, 1, 1, 1)), jax.random.key(5),
                                    augmentation, 16))
    assert all(not np.allclose(same[0], same[i]) for i in range(1, 4))


# --- hue ----------------------------------------------------------------------------------

shift_hue = jax.jit(aug.shift_hue)


def test_hue_shift_keeps_grays_and_a_full_turn(images):
    x = np.asarray(images, np.float32)
    gray = np.repeat(x[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(shift_hue(gray, jnp.asarray([0.1, 0.25, -0.4, 0.5])), gray)
    for turns in (0.0, 1.0, -1.0):
        np.testing.assert_allclose(shift_hue(x, jnp.full((4,), turns)), x, atol=1e-3)


def test_hue_shift_rotates_primaries_and_keeps_value_and_chroma(images):
    prim = np.zeros((3, 1, 1, 3), np.float32)
    prim[0, ..., 0], prim[1, ..., 1], prim[2, ..., 2] = 255.0, 200.0, 100.0   # R, G, B
    third = np.asarray(shift_hue(prim, jnp.full((3,), 1 / 3)))
    np.testing.assert_allclose(third[:, 0, 0], [[0, 255, 0], [0, 0, 200], [100, 0, 0]],
                               atol=1e-3)   # red -> green -> blue -> red
    np.testing.assert_allclose(np.asarray(shift_hue(prim[:1], jnp.asarray([-1 / 6])))[0, 0, 0],
                               [255, 0, 255], atol=1e-3)   # red - 60 degrees = magenta
    x = np.asarray(images, np.float32)
    out = np.asarray(shift_hue(x, jnp.asarray([0.1, 0.3, -0.2, 0.45])))
    np.testing.assert_allclose(out.max(-1), x.max(-1), atol=1e-3)   # value
    np.testing.assert_allclose(out.min(-1), x.min(-1), atol=1e-3)   # value - chroma
    assert np.abs(out - x).max() > 50


def test_hue_jitter_in_augment_batch(images):
    augmentation = dataclasses.replace(NONE, hue=0.5)
    key = jax.random.key(6)
    out = np.asarray(augment_batch(images, key, augmentation, 24))
    expected = np.asarray(shift_hue(np.asarray(images, np.float32),
                                    aug.hue_shifts(key, augmentation, 4)))
    np.testing.assert_allclose(out, np.clip(expected, 0, 255), atol=1e-3)
    assert out.min() >= 0.0 and out.max() <= 255.0
    same = np.asarray(augment_batch(jnp.tile(images[:1], (4, 1, 1, 1)), key, augmentation, 24))
    assert all(not np.allclose(same[0], same[i]) for i in range(1, 4))   # per example
    gray = jnp.full((4, 24, 24, 3), 77, jnp.uint8)
    np.testing.assert_allclose(augment_batch(gray, key, augmentation, 24), 77.0, atol=1e-3)


def test_the_jax_free_is_augmented_agrees_with_the_augmentation():
    """The workflow asks a config block (no JAX on the head node), the job its Augmentation.
    Every setting is the schema's and is one of the two kinds the planning layer knows (a
    crop range, or a magnitude whose zero disables it): a new setting cannot be missed."""
    from finegrained.plan.augment import CROP_RANGES, RANDOM_MAGNITUDES, is_augmented
    from finegrained.plan.schema import SCHEMA, validate_config

    fields = [f.name for f in dataclasses.fields(Augmentation)]
    assert fields == list(SCHEMA["$defs"]["augment"]["properties"])
    off = dataclasses.asdict(Augmentation.none())
    ranges = [name for name in fields if isinstance(off[name], tuple)]
    assert (tuple(ranges), tuple(n for n in fields if n not in ranges)) == (
        CROP_RANGES, RANDOM_MAGNITUDES)
    schema_default = validate_config({})["features"]["augment"]
    cases = [(off, False), (schema_default, True)]
    cases += [({**off, name: [0.5, 1.0]}, True) for name in ranges]
    cases += [({**off, name: 0.1}, True) for name in fields if name not in ranges]
    for case, expected in cases:
        assert is_augmented(case) == is_augmented(Augmentation.from_dict(case)) == expected, case
