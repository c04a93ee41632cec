"""Depthwise convolution as a sum of shifted, per-channel-scaled slices, and the switch
that picks it or the grouped convolution by backend.

Why: XLA's CPU lowering of a grouped convolution with one group per channel
(``feature_group_count=C``) is slow. A k x k depthwise conv is only ``k*k`` multiply-adds
per output value: pad the input, take the ``k*k`` (strided) windows of it that each kernel
tap sees, scale each by that tap's per-channel weight and add them up. XLA fuses this into
one elementwise loop on the CPU; the input gradient is the same kind of loop, and the kernel
gradient is written out by hand (see ``_tap_sum_bwd``). Per MobileNetV2 layer that is
~3-13x faster forward and ~20-30x faster forward + backward than the grouped convolution;
the whole network infers ~4-7x and trains ~5x faster on a CPU
(``benchmarks/mobilenet_cpu.py``). On a GPU the grouped convolution has dedicated kernels
(cuDNN) and nothing here has been measured there, so ``"auto"`` keeps it.

The two forms compute the same function (same TF/``lax`` "SAME" padding, same kernel
layout), so the choice never changes parameters or weight files, only speed and float
rounding (the sums are associated differently; ~1e-6 relative in float32).

``impl``: ``"auto"`` (shifted on the CPU backend, grouped elsewhere), ``"shifted"`` or
``"grouped"``. ``override(impl)`` forces one for every model while it is active, for
benchmarks; it is read when a function is traced, so jit a fresh function inside it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from finegrained.errors import ConfigError

IMPLEMENTATIONS = ("auto", "shifted", "grouped")

_override: str | None = None


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation, else a ConfigError listing them."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"depthwise_impl must be one of {list(IMPLEMENTATIONS)}, "
                          f"got {impl!r}")
    return impl


def resolve(impl: str = "auto") -> str:
    """``"shifted"`` or ``"grouped"``: the override if one is active, else ``impl``, with
    ``"auto"`` decided by ``jax.default_backend()`` (shifted only on ``"cpu"``)."""
    impl = check_impl(_override if _override is not None else impl)
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "grouped"
    return impl


@contextlib.contextmanager
def override(impl: str | None) -> Iterator[None]:
    """Use ``impl`` for every depthwise conv traced inside the block (``None``: each model's
    own setting). Functions jitted before the block keep what they were traced with."""
    global _override
    previous, _override = _override, (None if impl is None else check_impl(impl))
    try:
        yield
    finally:
        _override = previous


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF / ``lax`` "SAME" padding of one spatial axis: the output has ``ceil(size /
    stride)`` positions, the total padding that needs is split with the odd one after
    (stride 2 on an even size: 0 before, 1 after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _windows(x, kernel_hw: tuple[int, int], strides: tuple[int, int]) -> list:
    """The ``kh * kw`` strided windows of the "SAME"-padded ``x`` that the kernel taps see,
    in the kernel's row-major order, each of the output's spatial shape."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    batch, height, width, channels = x.shape
    out_h, out_w = -(-height // sh), -(-width // sw)
    x = jnp.pad(x, ((0, 0), same_padding(height, kh, sh), same_padding(width, kw, sw),
                    (0, 0)))
    return [lax.slice(x, (0, i, j, 0),
                      (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, channels),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tap_sum(x, taps, strides):
    """``sum_t window_t(x) * taps[t]``: ``taps`` is ``(kh, kw, C)``."""
    y = None
    for window, tap in zip(_windows(x, taps.shape[:2], strides),
                           taps.reshape(-1, taps.shape[-1])):
        y = window * tap if y is None else y + window * tap
    return y


def _tap_sum_fwd(x, taps, strides):
    return _tap_sum(x, taps, strides), (x, taps)


def _tap_sum_bwd(strides, residuals, cotangent):
    """The input gradient is what autodiff makes of the forward (pads of the cotangent,
    fused into one loop). The kernel gradient is written out because autodiff's form, one
    ``sum(window * cotangent)`` per tap, makes XLA's CPU backend copy each padded window
    out before reducing it (~10x slower than the forward): one multi-output reduction
    over the width keeps the windows fused, then the small (batch, rows) partials are
    summed."""
    x, taps = residuals
    _, input_vjp = jax.vjp(lambda x: _tap_sum.fun(x, taps, strides), x)
    (grad_x,) = input_vjp(cotangent)
    products = [window * cotangent for window in _windows(x, taps.shape[:2], strides)]
    zero = jnp.zeros((), cotangent.dtype)
    partials = lax.reduce(products, [zero] * len(products),
                          lambda a, b: [u + v for u, v in zip(a, b)], (2,))
    grad_taps = jnp.stack([p.sum(axis=(0, 1)) for p in partials]).reshape(taps.shape)
    return grad_x, grad_taps


_tap_sum.defvjp(_tap_sum_fwd, _tap_sum_bwd)


def shifted_depthwise_conv(x, kernel, stride: int | tuple[int, int] = 1, *, bias=None,
                           dtype=None):
    """Depthwise conv of NHWC ``x`` with an HWIO ``kernel`` of shape ``(kh, kw, 1, C)``
    (``nnx.Conv(C, C, ..., feature_group_count=C)``'s kernel), "SAME" padding, plus
    ``bias`` ``(C,)``. ``x``, ``kernel`` and ``bias`` are cast to ``dtype`` (default: their
    promoted dtype) as ``nnx.Conv`` does; below float32 the taps are summed in float32
    (as a convolution accumulates) and the result is rounded to ``dtype`` once."""
    kh, kw, one, channels = kernel.shape
    if x.ndim != 4 or one != 1 or x.shape[-1] != channels:
        raise ValueError(f"depthwise conv wants NHWC input with {channels} channels and a "
                         f"(kh, kw, 1, C) kernel; got input {x.shape}, kernel {kernel.shape}")
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if dtype is None:
        dtype = jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
    acc = jnp.promote_types(dtype, jnp.float32)
    y = _tap_sum(x.astype(dtype).astype(acc), kernel[:, :, 0].astype(dtype).astype(acc),
                 strides).astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def pointwise_conv(x, kernel, *, bias=None, dtype=None):
    """A 1x1, stride-1, ungrouped conv (HWIO ``kernel`` ``(1, 1, Cin, Cout)``) as one matrix
    product over the channel axis. The same function as ``nnx.Conv``; on the CPU, XLA's
    backward pass of the 1x1 convolution is several times slower than that of the matmul,
    and after the depthwise convs the 1x1 convs are most of a MobileNetV2 train step."""
    if dtype is None:
        dtype = jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
    y = jnp.dot(x.astype(dtype), kernel[0, 0].astype(dtype))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def grouped_depthwise_conv(x, kernel, stride: int | tuple[int, int] = 1, *, bias=None,
                           dtype=None):
    """The same function as :func:`shifted_depthwise_conv` as one grouped convolution
    (what ``nnx.Conv(..., feature_group_count=C, padding="SAME")`` computes)."""
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if dtype is None:
        dtype = jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
    y = lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (sh, sw), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=kernel.shape[-1])
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def depthwise_conv(x, kernel, stride: int | tuple[int, int] = 1, *, bias=None, dtype=None,
                   impl: str = "auto"):
    """Depthwise conv by the implementation :func:`resolve` picks for ``impl``."""
    conv = shifted_depthwise_conv if resolve(impl) == "shifted" else grouped_depthwise_conv
    return conv(x, kernel, stride, bias=bias, dtype=dtype)
