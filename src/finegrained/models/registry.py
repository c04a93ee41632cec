"""The common model interface, and ``build_model`` over the table of architectures
(:mod:`finegrained.plan.archs`).

Every backbone is a ``StagedClassifier``: a chain of named stages (``stage_names``) run
one after another, with the input normalisation in front of the first and the classifier
(``head``: global average pool + ``nnx.Linear``) as the last. Naming the stages lets the
transfer regimes cut the network anywhere: cache the activations after stage ``k`` once,
then train only what comes after (``forward(cached, start=k)``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.plan.archs import architecture


@dataclasses.dataclass(frozen=True)
class InputRecipe:
    """How raw pixels (RGB, 0..255 scale, uint8 or float) become network inputs:
    ``(x - mean) / std`` per channel, both given on the 0..255 scale."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def apply(self, x, dtype=jnp.float32):
        """Normalise NHWC pixels ``x`` (uint8, or float already on the 0..255 scale)."""
        mean = np.asarray(self.mean, np.float32)
        inv_std = (1.0 / np.asarray(self.std, np.float64)).astype(np.float32)
        x = jnp.asarray(x).astype(jnp.float32)
        return ((x - mean) * inv_std).astype(dtype)


#: torchvision / timm ImageNet recipe: ``(x / 255 - mean) / std``.
TORCHVISION_RECIPE = InputRecipe(
    "torchvision", mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
    std=(0.229 * 255, 0.224 * 255, 0.225 * 255))

#: google ViT / Inception recipe: ``(x / 255 - 0.5) / 0.5``, pixels to [-1, 1].
INCEPTION_RECIPE = InputRecipe("inception", mean=(127.5,) * 3, std=(127.5,) * 3)

#: TFLite quantised MobileNetV2 recipe: ``(x - 128) * 0.0078125`` (not ``x / 127.5 - 1``).
TFLITE_RECIPE = InputRecipe("tflite_uint8", mean=(128.0,) * 3, std=(128.0,) * 3)


class StagedClassifier(nnx.Module):
    """Base class of the backbones. Subclasses set ``stage_names`` (the last one is
    ``'head'``), ``input_recipe``, ``num_features``, ``num_classes``, ``dtype``, the
    ``head`` Linear, and implement ``run_stage(name, x)`` for every stage but ``'head'``
    (``run_stage(name, x, *, key=None)`` where ``takes_key``)."""

    stage_names: tuple[str, ...]
    input_recipe: InputRecipe
    #: Whether ``run_stage`` takes a ``key``: randomness for layers that are stochastic in
    #: train mode (ViT's drop path). ``forward`` gives the others no key.
    takes_key: bool = False

    def run_stage(self, name: str, x):
        raise NotImplementedError

    def _stage_index(self, name: str, what: str) -> int:
        if name not in self.stage_names:
            raise ConfigError(f"{what}={name!r} is not a stage of {type(self).__name__}; "
                              f"stages are {list(self.stage_names)}")
        return self.stage_names.index(name)

    def forward(self, x, start: str | None = None, stop: str | None = None, *, key=None):
        """Run the stages after ``start`` up to and including ``stop``.

        ``start=None``: ``x`` is pixels (uint8 or float 0..255, NHWC) and is normalised
        first; otherwise ``x`` is the activation that stage ``start`` produced.
        ``stop=None`` (or ``'head'``): return float32 logits; otherwise the activation
        after stage ``stop`` (NHWC feature map; ViT: tokens).
        ``key``: a PRNG key for the stochastic layers of a model in train mode (drop
        path); stage ``i`` gets ``fold_in(key, i)``, so a forward split at a stage boundary
        draws what the whole forward would. ``None``, or a model without such layers
        (``takes_key`` false): deterministic.
        """
        first = 0 if start is None else self._stage_index(start, "start") + 1
        last = (len(self.stage_names) - 1 if stop is None
                else self._stage_index(stop, "stop"))
        if last < first:
            raise ConfigError(f"forward(start={start!r}, stop={stop!r}) runs no stage; "
                              f"stages are {list(self.stage_names)}")
        if start is None:
            x = self.input_recipe.apply(x, self.dtype)
        for index in range(first, last + 1):
            name = self.stage_names[index]
            if name == "head":
                x = self.classify(x)
            elif key is not None and self.takes_key:
                x = self.run_stage(name, x, key=jax.random.fold_in(key, index))
            else:
                x = self.run_stage(name, x)
        return x

    def pool(self, x):
        """The pooled vector of a stage's output (what the head, and a linear probe, read
        of it): the global average of a feature map; a ViT pools its tokens."""
        return jnp.mean(x, axis=(1, 2))

    def pooled_features(self, x, start: str | None = None):
        """The pooled vector the classifier sees (linear-probe features),
        ``(batch, num_features)``; ``start`` as in ``forward``."""
        last_body = self.stage_names[-2]
        if start != last_body:
            x = self.forward(x, start=start, stop=last_body)
        return self.pool(x)

    def classify(self, x):
        """The ``'head'`` stage: pooling (skipped when ``x`` is already pooled, 2-D) and the
        ``head`` Linear; float32 logits."""
        if x.ndim > 2:
            x = self.pool(x)
        return self.head(x).astype(jnp.float32)

    def __call__(self, x, *, key=None):
        return self.forward(x, key=key)


def build_model(arch: str, num_classes: int, *, width: int = 64,
                stage_depths: Sequence[int] | None = None, rngs: nnx.Rngs,
                dtype=jnp.float32, param_dtype=jnp.float32, **options) -> StagedClassifier:
    """A freshly initialised backbone, in eval mode (call ``model.train()`` to train).

    ``width``: ResNet base width (64 = torchvision); for MobileNetV2 the width multiplier
    is ``width / 64`` (64 = MobileNetV2 1.0, the pretrained layout). ``stage_depths``:
    blocks per stage (ResNet: 4 numbers; MobileNetV2: 7, one per row of the paper's
    bottleneck table). ``options`` go to the architecture's constructor (MobileNetV2:
    ``batch_norm=True`` for from-scratch training; ``depthwise_impl`` ``auto | shifted |
    grouped``, how the depthwise convs run, see ``depthwise``).
    """
    entry = architecture(arch)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    module_name, constructor = entry.constructor.split(":")
    module = module_name if "." in module_name else f"finegrained.models.{module_name}"
    build = getattr(importlib.import_module(module), constructor)
    return build(num_classes, width=width, stage_depths=stage_depths, rngs=rngs,
                 dtype=dtype, param_dtype=param_dtype, **options)
