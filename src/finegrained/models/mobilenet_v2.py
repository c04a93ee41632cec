"""MobileNetV2 in Flax NNX, laid out like the TFLite/TF-slim ``MobilenetV2`` graph.

As described by ``shared/weights/mobilenet_v2_1.0_224_*.json``: TensorFlow "SAME" padding
(``lax``'s "SAME" is the same rule: for stride 2 on an even size, 0 before and 1 after),
ReLU6 after every conv except each block's linear ``project``, depthwise 3x3 convs (one
filter per channel), a residual add where a block keeps shape, global average pooling (the
graph's 7x7 VALID pool at 224 px) and a Linear classifier.

The depthwise convs are stored as grouped ``nnx.Conv`` layers (one group per channel; the
parameter names and shapes of the weight files) but run by ``depthwise_impl`` (see
``depthwise``): on the CPU as shifted sums, which makes the network ~5x faster there.

``batch_norm=False`` (default) is the layout of the pretrained weights: BatchNorm is
folded into each conv's bias, so convs have a bias and there is no BatchNorm.
``batch_norm=True`` puts a BatchNorm (TF's eps 1e-3) after each bias-free conv, for
training from scratch.

Stages group the 17 inverted-residual blocks by output resolution (for a 224 input):
``stem`` (first 3x3/2 conv, 112 px), ``stage1`` (block 0, 112), ``stage2`` (blocks 1-2,
56), ``stage3`` (blocks 3-5, 28), ``stage4`` (blocks 6-12, 14), ``stage5`` (blocks 13-16,
7), ``features`` (the 1x1 conv to 1280 channels), ``head`` (pool + Linear).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.models import depthwise
from finegrained.models.registry import TFLITE_RECIPE, StagedClassifier

#: The paper's bottleneck table: (expansion t, output channels c, blocks n, stride s).
INVERTED_RESIDUAL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3


def make_divisible(value: float, divisor: int = 8) -> int:
    """Channel rounding of the reference implementation (never below 90% of ``value``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def block_layout(depths: Sequence[int] | None = None) -> list[tuple[int, int, int, str, int]]:
    """Per block, in order: ``(expansion, out_channels, stride, stage, index_in_stage)``
    at width multiplier 1; the stage is named by output resolution (``stage1`` = /2)."""
    depths = [n for _, _, n, _ in INVERTED_RESIDUAL_SETTINGS] if depths is None else depths
    if len(depths) != len(INVERTED_RESIDUAL_SETTINGS) or min(depths) < 1:
        raise ConfigError(f"mobilenet_v2: stage_depths must be "
                          f"{len(INVERTED_RESIDUAL_SETTINGS)} positive counts, "
                          f"got {list(depths)}")
    layout, reduction, counts = [], 1, {}
    for (t, c, _, s), n in zip(INVERTED_RESIDUAL_SETTINGS, depths):
        for i in range(n):
            stride = s if i == 0 else 1
            reduction += stride == 2
            stage = f"stage{reduction}"
            layout.append((t, c, stride, stage, counts.get(stage, 0)))
            counts[stage] = counts.get(stage, 0) + 1
    return layout


class ConvUnit(nnx.Module):
    """Conv (+ BatchNorm when ``batch_norm``) (+ ReLU6 when ``relu6``). Depthwise units
    (``groups == cin == cout``) and 1x1 units keep their ``conv`` as the parameter holder;
    where ``depthwise_impl`` resolves to the CPU form (``"shifted"``), a depthwise unit runs
    as shifted sums and a 1x1 unit as a matmul (see ``depthwise``)."""

    def __init__(self, cin, cout, kernel, stride=1, *, groups=1, relu6=True,
                 batch_norm=False, depthwise_impl="auto", rngs, dtype, param_dtype):
        self.relu6 = relu6
        self.depthwise_impl = depthwise_impl
        if groups > 1 and groups == cin == cout:
            self.kind = "depthwise"
        elif kernel == 1 and stride == 1 and groups == 1:
            self.kind = "pointwise"     # the CPU form is a matmul (same parameters)
        else:
            self.kind = None
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding="SAME",
                             feature_group_count=groups, use_bias=not batch_norm,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = (nnx.BatchNorm(cout, use_running_average=True, momentum=BN_MOMENTUM,
                                 epsilon=BN_EPSILON, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs) if batch_norm else None)

    def __call__(self, x):
        conv = self.conv
        cpu_form = (self.kind is not None
                    and depthwise.resolve(self.depthwise_impl) == "shifted")
        bias = None if conv.bias is None else conv.bias[...]
        if cpu_form and self.kind == "depthwise":
            x = depthwise.shifted_depthwise_conv(x, conv.kernel[...], conv.strides,
                                                 bias=bias, dtype=conv.dtype)
        elif cpu_form:
            x = depthwise.pointwise_conv(x, conv.kernel[...], bias=bias, dtype=conv.dtype)
        else:
            x = conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return jnp.clip(x, 0, 6) if self.relu6 else x


class InvertedResidual(nnx.Module):
    """``expand`` 1x1 (absent when t = 1), ``depthwise`` 3x3, linear ``project`` 1x1, and
    the residual add when stride is 1 and the channel count is kept."""

    def __init__(self, cin, cout, expansion, stride, *, depthwise_impl="auto", **kw):
        hidden = cin * expansion
        self.expand = ConvUnit(cin, hidden, 1, **kw) if expansion != 1 else None
        self.depthwise = ConvUnit(hidden, hidden, 3, stride, groups=hidden,
                                  depthwise_impl=depthwise_impl, **kw)
        self.project = ConvUnit(hidden, cout, 1, relu6=False, **kw)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class MobileNetV2(StagedClassifier):
    """MobileNetV2; ``width_multiplier`` 1.0 with default depths is the pretrained layout.
    ``depthwise_impl``: ``auto | shifted | grouped``, how the depthwise convs run (see
    ``depthwise``; the parameters are the same either way)."""

    def __init__(self, num_classes: int, *, width_multiplier: float = 1.0,
                 stage_depths: Sequence[int] | None = None, batch_norm: bool = False,
                 depthwise_impl: str = "auto", rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if width_multiplier <= 0:
            raise ConfigError(f"mobilenet_v2: width multiplier must be positive, "
                              f"got {width_multiplier}")
        depthwise.check_impl(depthwise_impl)
        kw = dict(batch_norm=batch_norm, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        layout = block_layout(stage_depths)
        self.arch = "mobilenet_v2"
        self.dtype = dtype
        self.input_recipe = TFLITE_RECIPE
        stages = sorted({stage for *_, stage, _ in layout}, key=lambda s: int(s[5:]))
        self.stage_names = ("stem", *stages, "features", "head")
        cin = make_divisible(STEM_CHANNELS * width_multiplier)
        self.stem = ConvUnit(3, cin, 3, 2, **kw)
        blocks = {stage: [] for stage in stages}
        for t, c, stride, stage, _ in layout:
            cout = make_divisible(c * width_multiplier)
            blocks[stage].append(InvertedResidual(cin, cout, t, stride,
                                                  depthwise_impl=depthwise_impl, **kw))
            cin = cout
        for stage, members in blocks.items():
            setattr(self, stage, nnx.List(members))
        self.num_features = make_divisible(FEATURE_CHANNELS * max(1.0, width_multiplier))
        self.features = ConvUnit(cin, self.num_features, 1, **kw)
        self.num_classes = num_classes
        self.head = nnx.Linear(self.num_features, num_classes, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)

    def run_stage(self, name, x):
        if name in ("stem", "features"):
            return getattr(self, name)(x)
        for block in getattr(self, name):
            x = block(x)
        return x


def mobilenet_v2(num_classes: int, *, width: int = 64, stage_depths=None, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, batch_norm: bool = False,
                 depthwise_impl: str = "auto") -> MobileNetV2:
    """MobileNetV2 with width multiplier ``width / 64`` (64 -> 1.0, the pretrained size)."""
    return MobileNetV2(num_classes, width_multiplier=width / 64, stage_depths=stage_depths,
                       batch_norm=batch_norm, depthwise_impl=depthwise_impl, rngs=rngs,
                       dtype=dtype, param_dtype=param_dtype)
