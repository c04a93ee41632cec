"""The shifted-sum depthwise conv is the grouped conv: same outputs and gradients for
strides 1 and 2, odd and even sizes, any channel count; MobileNetV2 gives the same logits
and loss gradients with either, with the same parameters; "auto" picks by backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from finegrained.errors import ConfigError
from finegrained.models import build_model, flatten_state
from finegrained.models import depthwise
from finegrained.models.depthwise import grouped_depthwise_conv, shifted_depthwise_conv
from finegrained.train.steps import cross_entropy, set_compute_dtype

RTOL = 1e-5


def rngs(seed=0):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def random(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def assert_close(got, want, rtol=RTOL):
    """Relative to the largest magnitude of ``want`` (sums of signed terms may be ~0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("size", range(1, 17))
@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_padding_is_lax_same(size, kernel, stride):
    assert depthwise.same_padding(size, kernel, stride) == tuple(
        lax.padtype_to_pads((size,), (kernel,), (stride,), "SAME")[0])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (13, 14), (14, 13)])
@pytest.mark.parametrize("channels", [1, 6, 32])
def test_shifted_equals_grouped_outputs_and_gradients(stride, hw, channels):
    x = random((2, *hw, channels), 0)
    kernel = random((3, 3, 1, channels), 1)
    bias = random((channels,), 2)
    out_shape = (2, -(-hw[0] // stride), -(-hw[1] // stride), channels)
    cotangent = random(out_shape, 3)

    def loss(conv):
        return lambda x, k, b: jnp.sum(conv(x, k, stride, bias=b) * cotangent)

    want = grouped_depthwise_conv(x, kernel, stride, bias=bias)
    got = shifted_depthwise_conv(x, kernel, stride, bias=bias)
    assert got.shape == want.shape == out_shape
    assert_close(got, want)
    grads_want = jax.jit(jax.grad(loss(grouped_depthwise_conv), argnums=(0, 1, 2)))(
        x, kernel, bias)
    grads_got = jax.jit(jax.grad(loss(shifted_depthwise_conv), argnums=(0, 1, 2)))(
        x, kernel, bias)
    for g, w in zip(grads_got, grads_want):
        assert_close(g, w)


@pytest.mark.parametrize("kernel_hw,stride", [((5, 5), 1), ((5, 5), 2), ((1, 3), (2, 1)),
                                              ((2, 2), 2)])
def test_other_kernel_sizes_and_strides(kernel_hw, stride):
    x = random((1, 9, 10, 4), 0)
    kernel = random((*kernel_hw, 1, 4), 1)
    assert_close(shifted_depthwise_conv(x, kernel, stride),
                 grouped_depthwise_conv(x, kernel, stride))


@pytest.mark.parametrize("stride", [1, 2])
def test_matches_nnx_grouped_conv(stride):
    """The kernel layout is nnx.Conv's: its own parameters give its own output."""
    conv = nnx.Conv(8, 8, (3, 3), strides=stride, padding="SAME", feature_group_count=8,
                    rngs=rngs())
    conv.bias[...] = random((8,), 5)
    x = random((2, 14, 14, 8), 4)
    assert_close(shifted_depthwise_conv(x, conv.kernel[...], conv.strides,
                                        bias=conv.bias[...]), conv(x))


def test_bfloat16_computes_in_the_given_dtype():
    x, kernel, bias = random((2, 8, 8, 6), 0), random((3, 3, 1, 6), 1), random((6,), 2)
    got = shifted_depthwise_conv(x, kernel, 2, bias=bias, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    want = grouped_depthwise_conv(x, kernel, 2, bias=bias)
    assert_close(got.astype(jnp.float32), want, rtol=2e-2)


def test_rejects_a_non_depthwise_kernel():
    with pytest.raises(ValueError, match="depthwise conv wants"):
        shifted_depthwise_conv(random((1, 4, 4, 3), 0), random((3, 3, 3, 3), 1))


def test_auto_picks_by_backend(monkeypatch):
    if jax.default_backend() == "cpu":
        assert depthwise.resolve("auto") == "shifted"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert depthwise.resolve("auto") == "shifted"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert depthwise.resolve("auto") == "grouped"
    assert depthwise.resolve("shifted") == "shifted"
    assert depthwise.resolve("grouped") == "grouped"


def test_override_forces_one_implementation():
    with depthwise.override("grouped"):
        assert depthwise.resolve("shifted") == "grouped"
        with depthwise.override(None):
            assert depthwise.resolve("shifted") == "shifted"
        assert depthwise.resolve("auto") == "grouped"
    assert depthwise.resolve("shifted") == "shifted"
    with pytest.raises(ConfigError, match="depthwise_impl must be one of"):
        with depthwise.override("winograd"):
            pass


def mobilenet(impl, **kw):
    return build_model("mobilenet_v2", 7, width=16, rngs=rngs(3), depthwise_impl=impl, **kw)


def shallow(impl, **kw):
    return mobilenet(impl, stage_depths=(1,) * 7, **kw)


def test_unknown_depthwise_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="depthwise_impl"):
        shallow("fast")


def test_model_runs_the_chosen_implementation(monkeypatch):
    calls = []
    shifted = depthwise.shifted_depthwise_conv
    monkeypatch.setattr(depthwise, "shifted_depthwise_conv",
                        lambda *a, **k: calls.append(1) or shifted(*a, **k))
    x = np.zeros((1, 32, 32, 3), np.uint8)
    nnx.eval_shape(lambda m: m(x), shallow("grouped"))
    assert not calls
    with depthwise.override("shifted"):
        nnx.eval_shape(lambda m: m(x), shallow("grouped"))
    assert len(calls) == 7  # one per inverted-residual block


def images_and_labels(size):
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    return images, jnp.array([1, 4])


def loss_and_grads(model, images, labels):
    graphdef, params, others = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, others)(images)
        return jnp.mean(cross_entropy(logits, labels)), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, value, {path: g.get_value() for path, g in nnx.to_flat_state(grads)}


def test_mobilenet_shifted_equals_grouped_parameters_and_logits():
    grouped, shifted = mobilenet("grouped"), mobilenet("shifted")
    flat_grouped, flat_shifted = flatten_state(grouped), flatten_state(shifted)
    assert flat_grouped.keys() == flat_shifted.keys()
    assert "stage2/0/depthwise/conv/kernel" in flat_shifted
    for name, value in flat_grouped.items():
        np.testing.assert_array_equal(flat_shifted[name], value)
    images, _ = images_and_labels(64)
    forward = nnx.jit(lambda model, x: model(x))
    assert_close(forward(shifted, images), forward(grouped, images))


def test_mobilenet_shifted_equals_grouped_loss_gradients():
    """Compared in float64 (72 px: odd and even sizes down the network). In float32 the
    ~1e-7 rounding differences can move an activation across ReLU6's clip at 0 or 6, which
    switches its gradient off or on: a legitimate difference of up to a few 1e-3 in a few
    deep layers. In float64 the two agree to ~1e-15."""
    images, labels = images_and_labels(72)
    with jax.enable_x64(True):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        logits_g, loss_g, grads_g = loss_and_grads(mobilenet("grouped", **f64), images, labels)
        logits_s, loss_s, grads_s = loss_and_grads(mobilenet("shifted", **f64), images, labels)
    assert_close(logits_s, logits_g)  # float32 either way (the head casts)
    assert_close(loss_s, loss_g)
    assert grads_s.keys() == grads_g.keys()
    for path, grad in grads_g.items():
        assert grad.dtype == np.float64
        assert_close(grads_s[path], grad, rtol=1e-10)


def test_mobilenet_bfloat16_compute_dtype_reaches_the_shifted_path():
    """``set_compute_dtype`` (mixed-precision training) sets ``conv.dtype``; the shifted
    path computes in it like the grouped conv does."""
    images, _ = images_and_labels(64)
    logits = {}
    for impl in ("grouped", "shifted"):
        model = shallow(impl, batch_norm=True)
        set_compute_dtype(model, jnp.bfloat16)
        features, logits[impl] = nnx.jit(
            lambda m, x: (m.forward(x, stop="stage5"), m(x)))(model, images)
        assert features.dtype == jnp.bfloat16
    assert_close(logits["shifted"], logits["grouped"], rtol=5e-2)
