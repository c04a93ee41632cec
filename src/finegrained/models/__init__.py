"""Backbones (ResNet-18/34/50, MobileNetV2, ViT / DINOv2) in Flax NNX, their flat
parameter names, and converters from torchvision / TF / Hugging Face layouts.

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
    MobileNetV2 ``(x - 128) * 0.0078125`` (the TFLite weights' recipe); ViT by family:
    DINOv2 (patch 14) torchvision's, google ViT (patch 16) ``(x - 127.5) / 127.5``.

``model.stage_names``
    ResNet: ``('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')``.
    MobileNetV2: ``('stem', 'stage1', ..., 'stage5', 'features', 'head')``; its 17 blocks
    grouped by output resolution (stage1 /2: block 0; stage2 /4: 1-2; stage3 /8: 3-5;
    stage4 /16: 6-12; stage5 /32: 13-16); ``features`` is the 1x1 conv to 1280 channels.
    ViT (``vit``): ``('stem', 'block0', ..., 'block{L-1}', 'norm', 'head')``; ``stem``
    gives tokens ``(B, 1 + registers + patches, D)``, each block and ``norm`` maps tokens
    to tokens, and its ``head`` pools them (``pool``: ``cls | mean | cls+mean``).
    ``head`` is otherwise global average pooling + the ``nnx.Linear`` ``model.head``.

``model.forward(x, start=None, stop=None, *, key=None)``
    Runs the stages after ``start`` (``None``: from pixels, normalising them) through
    ``stop`` (``None``: through ``head``, giving logits). ``forward(x, stop='stage3')``
    gives the activation at that boundary; ``forward(a, start='stage3')`` continues from it.
    ``key``: randomness for layers that are stochastic in train mode (ViT's drop path;
    stage ``i`` gets ``fold_in(key, i)``); models without any (``takes_key`` false)
    ignore it, and without a key every model is deterministic. ``model(x, key=key)`` too.

``model.pooled_features(x, start=None)``
    The pooled pre-classifier vector ``(batch, model.num_features)``;
    ``model.head(pooled_features(x))`` equals ``model(x)``.

Train / eval mode (BatchNorm): ``model.train()`` / ``model.eval()`` set
``use_running_average`` on every BatchNorm in place (flax 0.12 ``Module.train``/``eval``);
``nnx.view(model, use_running_average=False)`` gives a train-mode view sharing the same
arrays without mutating ``model``. Running statistics follow torch momentum 0.1. The ViT
has no BatchNorm: ``train()`` / ``eval()`` switch its drop path (``nnx.Dropout``'s
``deterministic``; ``nnx.view(model, deterministic=False)`` for a view).

Weights: ``params.flatten_state`` / ``params.assign_state`` (flat ``'a/b/c'`` names, see
``params``), ``convert.to_flat`` (torchvision/timm ResNet, TF MobileNetV2 and, for arch
names starting with ``vit``, Hugging Face ViT / DINOv2 layouts: ``convert_vit``, whose
``vit_config`` tells the structure a state dict implies and ``HF_CHECKPOINTS`` where the
checkpoints are downloaded from).

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
    "hf_vit_to_flat": "convert_vit",
    "vit_config": "convert_vit",
    "HF_CHECKPOINTS": "convert_vit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
