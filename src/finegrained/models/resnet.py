"""ResNet-18/34/50 in Flax NNX, laid out like torchvision so its weights load one to one.

Numerics follow torchvision: explicit symmetric padding (7x7/2 stem pad 3, 3x3/2 max pool
pad 1, 3x3 convs pad 1), no conv bias, BatchNorm eps 1e-5 with running averages updated
as ``new = 0.9 * old + 0.1 * batch`` (torch momentum 0.1 = flax momentum 0.9), the
bottleneck's stride on its 3x3 conv ("v1.5"), and a 1x1 strided conv + BN shortcut where
the shape changes. Layout is NHWC; kernels are HWIO.

Stages: ``stem`` (conv, BN, ReLU, max pool; /4), ``stage1``..``stage4`` (/4, /8, /16,
/32) and ``head`` (average pool + Linear).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.models.registry import TORCHVISION_RECIPE, StagedClassifier

BN_MOMENTUM = 0.9  # flax convention; equals torch's momentum=0.1
BN_EPSILON = 1e-5
# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin, cout, kernel, stride, pad, *, rngs, dtype, param_dtype):
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride,
                    padding=((pad, pad), (pad, pad)), use_bias=False,
                    kernel_init=CONV_INIT, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _bn(channels, *, rngs, dtype, param_dtype):
    return nnx.BatchNorm(channels, use_running_average=True, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ConvBN(nnx.Module):
    """Convolution followed by BatchNorm (the stem and the shortcut)."""

    def __init__(self, cin, cout, kernel, stride, pad, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv = _conv(cin, cout, kernel, stride, pad, **kw)
        self.bn = _bn(cout, **kw)

    def __call__(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 convs (ResNet-18/34); torchvision ``BasicBlock``."""

    expansion = 1

    def __init__(self, cin, planes, stride, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = _conv(cin, planes, 3, stride, 1, **kw)
        self.bn1 = _bn(planes, **kw)
        self.conv2 = _conv(planes, planes, 3, 1, 1, **kw)
        self.bn2 = _bn(planes, **kw)
        self.downsample = (ConvBN(cin, planes, 1, stride, 0, **kw)
                           if stride != 1 or cin != planes else None)

    def __call__(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4 (ResNet-50); torchvision ``Bottleneck``."""

    expansion = 4

    def __init__(self, cin, planes, stride, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1, 1, 0, **kw)
        self.bn1 = _bn(planes, **kw)
        self.conv2 = _conv(planes, planes, 3, stride, 1, **kw)
        self.bn2 = _bn(planes, **kw)
        self.conv3 = _conv(planes, cout, 1, 1, 0, **kw)
        self.bn3 = _bn(cout, **kw)
        self.downsample = (ConvBN(cin, cout, 1, stride, 0, **kw)
                           if stride != 1 or cin != cout else None)

    def __call__(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + shortcut)


class ResNet(StagedClassifier):
    """ResNet with torchvision's layout; ``width`` is the stem/stage1 width (64 standard)."""

    def __init__(self, num_classes: int, *, block: type, stage_depths: Sequence[int],
                 width: int = 64, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, arch: str = "resnet"):
        if len(stage_depths) != 4 or min(stage_depths) < 1:
            raise ConfigError(f"{arch}: stage_depths must be 4 positive counts, "
                              f"got {list(stage_depths)}")
        if width < 1:
            raise ConfigError(f"{arch}: width must be positive, got {width}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.arch = arch
        self.dtype = dtype
        self.input_recipe = TORCHVISION_RECIPE
        self.stage_names = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
        self.stem = ConvBN(3, width, 7, 2, 3, **kw)
        cin = width
        for index, depth in enumerate(stage_depths):
            planes = width * 2 ** index
            blocks = []
            for b in range(depth):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(block(cin, planes, stride, **kw))
                cin = planes * block.expansion
            setattr(self, f"stage{index + 1}", nnx.List(blocks))
        self.num_features = cin
        self.num_classes = num_classes
        self.head = nnx.Linear(cin, num_classes, **kw)

    def run_stage(self, name, x):
        if name == "stem":
            x = nnx.relu(self.stem(x))
            return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in getattr(self, name):
            x = block(x)
        return x


def _resnet(arch, block, default_depths):
    def build(num_classes: int, *, width: int = 64, stage_depths=None, rngs: nnx.Rngs,
              dtype=jnp.float32, param_dtype=jnp.float32) -> ResNet:
        return ResNet(num_classes, block=block, width=width, rngs=rngs, dtype=dtype,
                      stage_depths=tuple(stage_depths or default_depths),
                      param_dtype=param_dtype, arch=arch)
    build.__name__ = arch
    build.__doc__ = f"{arch}: {block.__name__} x {default_depths} (torchvision layout)."
    return build


resnet18 = _resnet("resnet18", BasicBlock, (2, 2, 2, 2))
resnet34 = _resnet("resnet34", BasicBlock, (3, 4, 6, 3))
resnet50 = _resnet("resnet50", Bottleneck, (3, 4, 6, 3))
