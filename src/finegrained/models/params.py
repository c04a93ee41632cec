"""A model's state as one flat ``{name: numpy array}`` dict, and back.

Names are the NNX attribute paths joined by ``/``; list positions are numbers. They cover
trainable parameters (``nnx.Param``) and BatchNorm running statistics (``nnx.BatchStat``),
nothing else (no RNG state)::

    stem/conv/kernel               (7, 7, 3, 64)   conv kernels are HWIO
    stem/bn/scale  stem/bn/bias  stem/bn/mean  stem/bn/var
    stage1/0/conv1/kernel          block 0 of stage1 (ResNet)
    stage2/0/downsample/conv/kernel   stage2/0/downsample/bn/mean
    stage2/1/expand/conv/kernel  stage2/1/depthwise/conv/bias  stage2/1/project/conv/bias
                                   (MobileNetV2; ``.../bn/*`` when built with batch_norm)
    features/conv/kernel           MobileNetV2's 1x1 conv to 1280 channels
    stem/patch/kernel  stem/cls_token  stem/registers  stem/pos_embed     ViT (see ``vit``)
    block3/attn/qkv/kernel  block3/ls1/scale  block3/mlp/fc1/bias  norm/scale
    head/kernel  (in, out)   head/bias  (out,)     always, for every architecture

Arrays come back in the model's ``param_dtype``; ``assign_state`` casts to it. When every
tensor is loaded anyway, the random initialisation can be skipped: ``assign_state`` also
fills an abstract model, ``nnx.eval_shape(lambda: build_model(...))``.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from finegrained.errors import WeightsError

STATE_FILTER = (nnx.Param, nnx.BatchStat)


def _flat_variables(model: nnx.Module):
    state = nnx.state(model, STATE_FILTER)
    return state, [("/".join(str(p) for p in path), variable)
                   for path, variable in nnx.to_flat_state(state)]


def flatten_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter and batch statistic of ``model`` by flat name (see module doc)."""
    _, variables = _flat_variables(model)
    return {name: np.asarray(variable.get_value()) for name, variable in variables}


def assign_state(model: nnx.Module, flat: Mapping[str, np.ndarray]) -> None:
    """Set ``model``'s parameters and batch statistics from ``flat`` (in place), the exact
    inverse of ``flatten_state``. Every name must be present with its exact shape and no
    other name may appear; otherwise a ``WeightsError`` lists every problem at once and
    the model is left unchanged."""
    state, variables = _flat_variables(model)
    expected = dict(variables)
    problems = []
    for name, variable in variables:
        if name not in flat:
            problems.append(f"missing: {name} {tuple(variable.get_value().shape)}")
        elif tuple(np.shape(flat[name])) != tuple(variable.get_value().shape):
            problems.append(f"wrong shape: {name} given {tuple(np.shape(flat[name]))}, "
                            f"model has {tuple(variable.get_value().shape)}")
    for name in flat:
        if name not in expected:
            problems.append(f"unexpected: {name} {tuple(np.shape(flat[name]))}")
    if problems:
        raise WeightsError(f"{len(problems)} tensor(s) do not fit "
                           f"{type(model).__name__}:\n  " + "\n  ".join(problems))
    for name, variable in variables:
        variable.set_value(jnp.asarray(flat[name], dtype=variable.get_value().dtype))
    nnx.update(model, state)
