"""The table of architectures: everything the pipeline knows about a backbone, in one entry.

An entry names the model's constructor (``finegrained.models.<module>:<function>``, imported
only by ``models.registry``), its stages and what a stage boundary is, which
``freeze_up_to`` values it takes, the input recipe of its weights, the constructor options
that change how it runs (not its parameters) or how its parameters are laid out (recorded
in every weights file), the weight layouts it converts from, and its default pooled feature
layers. Nothing else in the library names an architecture: adding a backbone is one model
module plus one entry here (``tests/plan/test_archs.py`` registers a test-only one and plans
every regime for it).

Freezing, for every architecture: ``freeze_up_to: stem`` freezes the stem;
``strideK`` freezes every stage whose output is at most 1/K of the input resolution (the
same resolution in ResNet and MobileNetV2; a ViT's every stage is at its patch stride, so
``stride16``/``stride32`` freeze a /16 or /14 ViT whole); ``blockK`` (ViTs) freezes the
stem and blocks 0..K, ``block-K`` counted from the top (``block-1``: every block). The last frozen stage is the forward cut point and the cached
boundary.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

from finegrained.errors import ConfigError

Stages = Callable[[Sequence[int] | None], dict[str, int]]
STRIDE_CHOICES = ("stride2", "stride4", "stride8", "stride16", "stride32")


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    #: ``module:function``, the module under ``finegrained.models`` (or a dotted module
    #: path): ``build(num_classes, *, width, stage_depths, rngs, dtype, param_dtype,
    #: **options)``.
    constructor: str
    #: ``stage_depths`` (or None) -> {body stage: output stride}, in order; the head follows.
    stages: Stages
    #: What a stage's output is: ``map`` (NHWC) or ``tokens`` (batch, tokens, width).
    boundary: str
    #: Whether ``freeze_up_to: blockK`` applies (stages named ``block0``, ``block1``, ...).
    block_freezing: bool
    #: How many numbers ``backbone.stage_depths`` has for it.
    depth_count: int
    #: The input normalisation of its published weights (``models.registry`` recipes).
    input_recipe: str
    #: Backbone config keys handed to the constructor that change how it runs, not its
    #: parameters (changing them needs no other weights).
    runtime_options: tuple[str, ...] = ()
    #: Constructor options that shape the parameters, recorded in every weights file:
    #: option -> (value from scratch, value of a file that does not record it).
    weight_options: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    #: Those of the weight options the config may choose (``backbone.<option>``; null: the
    #: value above).
    config_options: tuple[str, ...] = ()
    #: External weight layouts ``models.convert`` reads into it.
    weight_layouts: tuple[str, ...] = ()
    #: How many of the last body stages the features rule pools by default.
    default_pooled: int = 2
    #: The schema's presets for this family (``$defs/<presets>_presets``), which replace
    #: the regimes' presets below the config's own keys; None: the regimes' presets.
    presets: str | None = None

    def body_stages(self, stage_depths: Sequence[int] | None = None) -> list[str]:
        return list(self.stages(stage_depths))

    def blocks(self, stage_depths: Sequence[int] | None = None) -> list[str]:
        """The stages ``freeze_up_to: blockK`` names (none without block freezing)."""
        return [s for s in self.stages(stage_depths) if self.block_freezing
                and re.fullmatch(r"block\d+", s)]

    def freeze_choices(self, stage_depths: Sequence[int] | None = None) -> list[str]:
        blocks = self.blocks(stage_depths)
        return ["stem", *STRIDE_CHOICES, *blocks, *(f"block-{k}" for k in range(1, len(blocks) + 1))]

    def frozen_stages(self, freeze_up_to: str | None,
                      stage_depths: Sequence[int] | None = None) -> list[str]:
        """The stages ``freeze_up_to`` freezes, in order (see the module docstring)."""
        if freeze_up_to is None:
            return []
        strides = self.stages(stage_depths)
        stages = list(strides)
        if freeze_up_to not in self.freeze_choices(stage_depths):
            raise ConfigError(f"freeze_up_to {freeze_up_to!r} is not a choice of {self.name}: "
                              f"{self.freeze_choices(stage_depths)} or null")
        if freeze_up_to == "stem":
            return ["stem"]
        if freeze_up_to.startswith("block"):
            k = int(freeze_up_to[len("block"):])
            last = self.blocks(stage_depths)[k]        # block-1: the last one
            return stages[:stages.index(last) + 1]
        k = int(freeze_up_to[len("stride"):])
        frozen = [s for s in stages if strides[s] <= k]
        if not frozen:
            raise ConfigError(f"freeze_up_to {freeze_up_to!r}: no stage of {self.name} has an "
                              f"output stride of {k} or less (strides: {strides})")
        return frozen

    def default_feature_layers(self, stage_depths: Sequence[int] | None = None) -> list[str]:
        """The pooled outputs of the last ``default_pooled`` body stages."""
        return self.body_stages(stage_depths)[-self.default_pooled:]


def _fixed(strides: Mapping[str, int]) -> Stages:
    return lambda stage_depths=None: dict(strides)


_RESNET = _fixed({"stem": 4, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32})
_MOBILENET_V2 = _fixed({"stem": 2, "stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16,
                        "stage5": 32, "features": 32})


def _resnet(name: str) -> Architecture:
    return Architecture(name, f"resnet:{name}", _RESNET, boundary="map", block_freezing=False,
                        depth_count=4, input_recipe="torchvision",
                        weight_layouts=("torchvision",))


#: ViT sizes: blocks (``backbone.stage_depths: [L]`` overrides them).
VIT_DEPTHS = {"tiny": 12, "small": 12, "base": 12, "large": 24}


def _vit_stages(patch: int, depth: int) -> Stages:
    """Every stage of a ViT is at its patch stride: stem, the blocks, the final norm."""
    def stages(stage_depths=None):
        blocks = stage_depths[0] if stage_depths else depth
        return {"stem": patch, **{f"block{k}": patch for k in range(blocks)}, "norm": patch}
    return stages


def _vit(size: str, patch: int, registers: int = 0) -> Architecture:
    """google ViT conventions at patch 16 and 8 (AugReg / ImageNet-21k weights, DINO's /8:
    pixels to [-1, 1], class-token head); DINOv2's at patch 14 (ImageNet mean/std,
    LayerScale, class token + patch mean head), with ``registers`` register tokens
    ("reg4")."""
    name = f"vit_{size}_patch{patch}" + (f"_reg{registers}" if registers else "")
    dinov2 = patch == 14
    pool = "cls+mean" if dinov2 else "cls"
    layout = ("hf_dinov2_registers" if registers else "hf_dinov2") if dinov2 else "hf_vit"
    return Architecture(name, f"vit:{name}", _vit_stages(patch, VIT_DEPTHS[size]),
                        boundary="tokens", block_freezing=True, depth_count=1,
                        input_recipe="torchvision" if dinov2 else "inception",
                        runtime_options=("drop_path_rate",),
                        weight_options={"pool": (pool, pool)}, config_options=("pool",),
                        weight_layouts=(layout,), default_pooled=1, presets="vit")


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (
        _resnet("resnet18"), _resnet("resnet34"), _resnet("resnet50"),
        Architecture("mobilenet_v2", "mobilenet_v2:mobilenet_v2", _MOBILENET_V2,
                     boundary="map", block_freezing=False, depth_count=7,
                     input_recipe="tflite_uint8",
                     runtime_options=("depthwise_impl",),
                     # the published TF weights have batch norm folded into the convs;
                     # from scratch (or self-pretrained) it trains with batch norm
                     weight_options={"batch_norm": (True, False)},
                     weight_layouts=("tf_mobilenet_v2",)),
        *(_vit(size, patch) for patch in (16, 14) for size in VIT_DEPTHS),
        _vit("tiny", 8), _vit("small", 8),
        *(_vit(size, 14, registers=4) for size in ("small", "base", "large")),
    )}


def register(arch: Architecture) -> Architecture:
    """Add ``arch`` to the table (a plugin's or a test's architecture)."""
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def model_settings(backbone: Mapping) -> dict:
    """The model block of a job's settings, from the config's ``backbone``: the
    architecture, its width and stage depths, the weight options the config chose, and its
    runtime options (only this architecture's, so changing another's reruns no job)."""
    arch = architecture(backbone["arch"])
    return {"arch": arch.name, "width": backbone["width"],
            "stage_depths": backbone["stage_depths"],
            "options": {key: backbone[key] for key in arch.config_options
                        if backbone[key] is not None},
            "runtime": {key: backbone[key] for key in arch.runtime_options}}
