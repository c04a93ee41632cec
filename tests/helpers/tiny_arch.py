"""A test-only backbone: the one model module a new architecture needs (its table entry is
in tests/plan/test_archs.py). Two conv stages, /2 and /4, and the common head."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from finegrained.models.registry import TORCHVISION_RECIPE, StagedClassifier


class TinyConvNet(StagedClassifier):
    stage_names = ("stem", "stage1", "head")
    input_recipe = TORCHVISION_RECIPE

    def __init__(self, num_classes: int, *, width: int, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.arch, self.dtype, self.num_classes = "tiny_test", dtype, num_classes
        self.stem = nnx.Conv(3, width, (3, 3), strides=2, **kw)
        self.stage1 = nnx.Conv(width, 2 * width, (3, 3), strides=2, **kw)
        self.num_features = 2 * width
        self.head = nnx.Linear(self.num_features, num_classes, **kw)

    def run_stage(self, name, x):
        return nnx.relu(getattr(self, name)(x))


def tiny_test(num_classes: int, *, width: int = 64, stage_depths=None, rngs: nnx.Rngs,
              dtype=jnp.float32, param_dtype=jnp.float32) -> TinyConvNet:
    return TinyConvNet(num_classes, width=width // 8, rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype)
