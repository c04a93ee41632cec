"""Backbones (ResNet-18/34/50, MobileNetV2) in Flax NNX, their flat parameter names, and
converters from torchvision / TF layouts.

The model interface (``registry.StagedClassifier``), the same for every architecture:

``build_model(arch, num_classes, *, width=64, stage_depths=None, rngs, dtype=jnp.float32,
param_dtype=jnp.float32, **options)``
    ``arch`` in ``resnet18 | resnet34 | resnet50 | mobilenet_v2``. ResNet ``width`` is the
    base width (64 = torchvision; the CPU demo uses 16); for MobileNetV2 the width
    multiplier is ``width / 64``. Models are built in **eval mode**.

``model(x)`` -> float32 logits ``(batch, num_classes)``
    ``x`` is NHWC RGB pixels: uint8, or float on the 0..255 scale (what on-device
    augmentation produces). The model normalises them itself by ``model.input_recipe``:
    ResNet ``(x - 255*(0.485, 0.456, 0.406)) / (255*(0.229, 0.224, 0.225))`` (torchvision),
    MobileNetV2 ``(x - 128) * 0.0078125`` (the TFLite weights' recipe).

``model.stage_names``
    ResNet: ``('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')``.
    MobileNetV2: ``('stem', 'stage1', ..., 'stage5', 'features', 'head')``; its 17 blocks
    grouped by output resolution (stage1 /2: block 0; stage2 /4: 1-2; stage3 /8: 3-5;
    stage4 /16: 6-12; stage5 /32: 13-16); ``features`` is the 1x1 conv to 1280 channels.
    ``head`` is always global average pooling + the ``nnx.Linear`` ``model.head``.

``model.forward(x, start=None, stop=None)``
    Runs the stages after ``start`` (``None``: from pixels, normalising them) through
    ``stop`` (``None``: through ``head``, giving logits). ``forward(x, stop='stage3')``
    gives the activation at that boundary; ``forward(a, start='stage3')`` continues from it.

``model.pooled_features(x, start=None)``
    The pooled pre-classifier vector ``(batch, model.num_features)``;
    ``model.head(pooled_features(x))`` equals ``model(x)``.

Train / eval mode (BatchNorm): ``model.train()`` / ``model.eval()`` set
``use_running_average`` on every BatchNorm in place (flax 0.12 ``Module.train``/``eval``);
``nnx.view(model, use_running_average=False)`` gives a train-mode view sharing the same
arrays without mutating ``model``. Running statistics follow torch momentum 0.1.

Weights: ``params.flatten_state`` / ``params.assign_state`` (flat ``'a/b/c'`` names, see
``params``), ``convert.to_flat`` (torchvision/timm ResNet and TF MobileNetV2 layouts).

Submodules are imported on first use, so the numpy-only weight utilities stay cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_model": "registry",
    "InputRecipe": "registry",
    "StagedClassifier": "registry",
    "flatten_state": "params",
    "assign_state": "params",
    "to_flat": "convert",
    "detect_layout": "convert",
    "torchvision_resnet_to_flat": "convert",
    "tf_mobilenet_v2_to_flat": "convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
