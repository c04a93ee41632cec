"""Low-precision storage (``train.precision``): stochastic rounding is unbiased and differs
from round-to-nearest; updates under half a bfloat16 ulp vanish with nearest and survive with
stochastic rounding; a run stores bfloat16 parameters and optimizer state, reports their
bytes, writes float32 weights, and is reproducible."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.models.params import flatten_state
from finegrained.train import precision as low_precision
from finegrained.train.loop import fit
from finegrained.train.precision import FLOAT32, Precision
from finegrained.train.settings import default_settings
from finegrained.train.steps import make_train_step
from helpers.training import TinyNet, coloured_squares, crop_and_flip, train_state

BF16_SR = Precision("bfloat16", "stochastic", "bfloat16")
BF16_NEAREST = Precision("bfloat16", "nearest", "float32")


def _bf16_neighbours(x: float) -> tuple[float, float]:
    lower = float(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16))
    if lower > x:
        lower = float(jnp.nextafter(jnp.bfloat16(lower), jnp.bfloat16(-np.inf)))
    upper = float(jnp.nextafter(jnp.bfloat16(lower), jnp.bfloat16(np.inf)))
    return lower, upper


@pytest.mark.parametrize("x", [1.0 + 2.0 ** -10, -3.3, 0.1234567, 1e-3 + 1.7e-6])
def test_stochastic_rounding_is_unbiased_and_differs_from_nearest(x):
    n = 200_000
    rounded = np.asarray(low_precision.round_stochastic(
        jnp.full((n,), x, jnp.float32), jax.random.key(0)), np.float64)
    lower, upper = _bf16_neighbours(x)
    assert set(np.unique(rounded)) <= {lower, upper}       # only the two neighbours
    p_up = (x - lower) / (upper - lower)
    bound = 5 * (upper - lower) * np.sqrt(p_up * (1 - p_up) / n)   # 5 standard errors
    assert abs(rounded.mean() - x) <= bound, (rounded.mean(), x, bound)
    nearest = float(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16))
    assert np.mean(rounded != nearest) > 0.01               # not round-to-nearest
    # the same key gives the same rounding (a run is reproducible)
    again = np.asarray(low_precision.round_stochastic(
        jnp.full((n,), x, jnp.float32), jax.random.key(0)), np.float64)
    np.testing.assert_array_equal(rounded, again)


def test_exact_and_non_finite_values_are_kept():
    x = jnp.asarray([1.0, 0.5, -2.0, 0.0, np.inf, -np.inf, np.nan], jnp.float32)
    out = np.asarray(low_precision.round_stochastic(x, jax.random.key(1)), np.float32)
    np.testing.assert_array_equal(out[:6], np.asarray(x)[:6])
    assert np.isnan(out[6])


def test_updates_below_half_an_ulp_stall_with_nearest_and_survive_stochastic_rounding():
    """Gradient descent on 0.5 * (w - 2)^2 from w = 1 at lr 1e-4: every update (<= 1e-4) is
    under half a bfloat16 ulp at 1 (2^-8 = 0.0039)."""
    steps, lr, target = 2000, 1e-4, 2.0
    tx = optax.sgd(lr)

    def run(precision, key):
        w = jnp.ones((1000,), jnp.float32)
        w = low_precision.store(w, precision)
        state = tx.init(w.astype(jnp.float32))

        def body(carry, i):
            w, state = carry
            grad = w.astype(jnp.float32) - target
            updates, state = tx.update(grad, state)
            if precision.full:
                w = w + updates
            else:
                w = low_precision.apply_updates(w, updates, precision, jax.random.fold_in(key, i))
            return (w, state), None
        (w, _), _ = jax.lax.scan(body, (w, state), jnp.arange(steps))
        return np.asarray(w, np.float64)

    fp32 = run(FLOAT32, jax.random.key(0))
    expected = target - (1 - lr) ** steps
    np.testing.assert_allclose(fp32, expected, rtol=1e-4)            # 1.181
    nearest = run(BF16_NEAREST, jax.random.key(0))
    np.testing.assert_array_equal(nearest, 1.0)                       # stalled: never moved
    stochastic = run(BF16_SR, jax.random.key(0))
    assert abs(stochastic.mean() - expected) < 0.01, stochastic.mean()  # tracks float32
    assert stochastic.std() < 0.1


def test_precision_values_are_checked():
    with pytest.raises(ConfigError, match="rounding"):
        Precision("bfloat16", "up", "float32")
    with pytest.raises(ConfigError, match="float16"):
        Precision("float16", "nearest", "float32")


def _images():
    return coloured_squares(64, seed=4)


def test_bfloat16_state_is_stored_as_such_and_moves():
    model = TinyNet(4, rngs=nnx.Rngs(5))
    full = train_state(TinyNet(4, rngs=nnx.Rngs(5)), lr=0.05, optimizer="momentum")
    state = train_state(model, lr=0.05, optimizer="momentum", precision=BF16_SR)
    for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.bfloat16
    assert low_precision.nbytes(state.params) * 2 == low_precision.nbytes(full.params)
    settings = default_settings(image_size=20, eval_crop_fraction=1.0, compute_dtype="float32",
                                augment=crop_and_flip(), precision=BF16_SR)
    step = make_train_step(settings.step_options())
    images, labels = _images()
    batch = {"image": jnp.asarray(images[:16]), "label": jnp.asarray(labels[:16])}
    new, metrics = step(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    before, after = jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(new.params)
    assert all(b.dtype == a.dtype == jnp.bfloat16 for b, a in zip(before, after))
    assert any(not np.array_equal(np.asarray(b, np.float32), np.asarray(a, np.float32))
               for b, a in zip(before, after))


def test_a_bfloat16_run_is_reproducible_reports_its_bytes_and_writes_float32_weights():
    settings = default_settings(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0,
                                image_size=20, eval_crop_fraction=1.0, compute_dtype="float32",
                                augment=crop_and_flip(), seed=0, num_devices=1,
                                log_every_steps=0)

    def run(precision):
        model = TinyNet(4, rngs=nnx.Rngs(5))
        result = fit(model, _images(), coloured_squares(32, seed=5),
                     dataclasses.replace(settings, precision=precision), log_fn=None)
        return result, flatten_state(model)

    (r32, w32), (sr_a, w_a), (sr_b, w_b), (near, w_near) = (
        run(FLOAT32), run(BF16_SR), run(BF16_SR), run(BF16_NEAREST))
    for key in w_a:
        assert w_a[key].dtype == np.float32, key            # weights files hold float32
        np.testing.assert_array_equal(w_a[key], w_b[key])   # same seed, same rounding
    assert any(not np.array_equal(w_a[k], w_near[k]) for k in w_a)
    assert any(not np.array_equal(w_a[k], w32[k]) for k in w_a)
    trained = w32["head/kernel"]
    np.testing.assert_allclose(w_a["head/kernel"], trained, atol=0.05)   # close to float32
    row32, row_sr, row_near = r32.history[-1], sr_a.history[-1], near.history[-1]
    assert row_sr["param_bytes"] * 2 == row32["param_bytes"]
    # the moments halve; the optimizer's integer step counts stay as they are
    assert row_sr["opt_state_bytes"] * 2 == pytest.approx(row32["opt_state_bytes"], abs=16)
    assert row_near["opt_state_bytes"] == row32["opt_state_bytes"]   # float32 moments
    assert np.isfinite(row_sr["train_loss"]) and row_sr["train_loss"] < r32.history[0]["train_loss"] * 1.5
