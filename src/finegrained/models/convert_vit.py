"""Hugging Face ViT / DINOv2 weights to our flat names (see ``vit``), the model settings a
state dict implies, and where the checkpoints are downloaded from.

Three layouts, told apart by tensor names (``detect_hf_layout``):

* ``hf_vit``: ``google/vit-*`` (``ViTModel``, ``ViTForImageClassification``: ``vit.``
  prefix, ``classifier.*``); blocks have ``layernorm_before`` / ``layernorm_after`` and
  the MLP as ``intermediate.dense`` / ``output.dense``.
* ``hf_dinov2``: ``facebook/dinov2-*`` (``Dinov2Model``; ``Dinov2ForImageClassification``
  adds a ``dinov2.`` prefix and ``classifier.*`` on class token + patch mean); blocks have
  ``norm1`` / ``norm2``, ``mlp.fc1`` / ``mlp.fc2`` and ``layer_scale{1,2}.lambda1``.
* ``hf_dinov2_registers``: ``facebook/dinov2-with-registers-*``
  (``Dinov2WithRegistersModel``; its ``ForImageClassification`` prefixes
  ``dinov2_with_registers.``): DINOv2 plus ``embeddings.register_tokens``.

Each is read in the names of the files on the Hub (``encoder.layer.<k>.attention.attention
.query``...) and in the names ``transformers`` 5 gives the same modules in memory, its
``state_dict()`` (``attention.q_proj``, ``attention.o_proj``, ``mlp.fc1``; ViT's blocks
as ``layers.<k>``); the tests check both against ``transformers``.

Conversion: torch Linear weights (out, in) -> kernels (in, out); query, key and value
side by side into one ``attn/qkv`` (in, 3 * out); the patch conv OIHW -> HWIO; leading
singleton axes of the class token, registers and position embeddings dropped. Two tensors
are dropped on purpose: ``embeddings.mask_token`` (DINOv2's masked-image pretraining
only) and ``pooler.dense.*`` (the in21k ViTModel's dense + tanh on the class token, which
the fine-tuned ``ViTForImageClassification`` does not use and our head replaces). Every
other name that is not understood is reported at once (``WeightsError``); so is SwiGLU
(``mlp.weights_in``, DINOv2-giant), which is not built here.

Not covered: timm's ``vit_*.augreg*`` layout (``blocks.<k>.attn.qkv``, ``patch_embed.proj``,
eps 1e-6). timm cannot be installed beside this torch, so there is no reference to verify
such a converter against; it is left out rather than shipped untested.

Only numpy is needed here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import numpy as np

from finegrained.errors import WeightsError

HF_LAYOUTS = ("hf_vit", "hf_dinov2", "hf_dinov2_registers")

#: Settings fixed by the family, not by any tensor shape: LayerNorm eps (the checkpoints'
#: configs), whether transformers resamples position embeddings with antialiasing, the
#: input recipe (``registry``) and the family's usual head pooling (a stored classifier's
#: input size overrides it).
FAMILY_SETTINGS = {
    "hf_vit": dict(layer_norm_eps=1e-12, pos_antialias=False, input_recipe="inception",
                   pool="cls"),
    "hf_dinov2": dict(layer_norm_eps=1e-6, pos_antialias=False, input_recipe="torchvision",
                      pool="cls+mean"),
    "hf_dinov2_registers": dict(layer_norm_eps=1e-6, pos_antialias=True,
                                input_recipe="torchvision", pool="cls+mean"),
}


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A Hub checkpoint: its file, layout, the architecture it fits (``backbone.arch``, an
    entry of ``plan.archs``) and its stored classifier's classes (None: a backbone only)."""

    repo: str
    layout: str
    arch: str
    num_classes: int | None

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/model.safetensors"


#: Hub repository -> checkpoint. Nothing here downloads; the workflow fetches ``url``.
#: The in21k ViT is a ``ViTModel`` with a pooler (dropped, see above), no classifier.
HF_CHECKPOINTS: dict[str, HFCheckpoint] = {c.repo: c for c in (
    HFCheckpoint("facebook/dinov2-small", "hf_dinov2", "vit_small_patch14", None),
    HFCheckpoint("facebook/dinov2-base", "hf_dinov2", "vit_base_patch14", None),
    HFCheckpoint("facebook/dinov2-large", "hf_dinov2", "vit_large_patch14", None),
    HFCheckpoint("facebook/dinov2-with-registers-small", "hf_dinov2_registers",
                 "vit_small_patch14_reg4", None),
    HFCheckpoint("facebook/dinov2-with-registers-base", "hf_dinov2_registers",
                 "vit_base_patch14_reg4", None),
    HFCheckpoint("facebook/dinov2-with-registers-large", "hf_dinov2_registers",
                 "vit_large_patch14_reg4", None),
    HFCheckpoint("google/vit-base-patch16-224", "hf_vit", "vit_base_patch16", 1000),
    HFCheckpoint("google/vit-base-patch16-224-in21k", "hf_vit", "vit_base_patch16", None),
)}

_PREFIXES = ("dinov2.", "dinov2_with_registers.", "vit.")
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
# block sub-module (hub name or transformers 5 name) -> ours; q/k/v are fused afterwards
_BLOCK_PARTS = {
    "norm1": "norm1", "layernorm_before": "norm1",
    "norm2": "norm2", "layernorm_after": "norm2",
    "attention.attention.query": "q", "attention.q_proj": "q",
    "attention.attention.key": "k", "attention.k_proj": "k",
    "attention.attention.value": "v", "attention.v_proj": "v",
    "attention.output.dense": "attn/proj", "attention.o_proj": "attn/proj",
    "mlp.fc1": "mlp/fc1", "intermediate.dense": "mlp/fc1",
    "mlp.fc2": "mlp/fc2", "output.dense": "mlp/fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_NORM_FIELDS = {"weight": "scale", "bias": "bias"}
_DROPPED = ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias")


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def detect_hf_layout(names) -> str | None:
    """``'hf_vit'``, ``'hf_dinov2'``, ``'hf_dinov2_registers'`` or None (none of them)."""
    names = {_strip_prefix(n) for n in names}
    if "embeddings.patch_embeddings.projection.weight" not in names:
        return None
    if "embeddings.register_tokens" in names:
        return "hf_dinov2_registers"
    if any(".layernorm_before." in n or n.startswith("layers.") for n in names):
        return "hf_vit"
    return "hf_dinov2"


def _block_param(part: str, field: str, value: np.ndarray) -> tuple[str, str, np.ndarray]:
    """(our module in the block, our field, array) for one block tensor; KeyError if the
    name is not understood."""
    module = _BLOCK_PARTS[part]
    if module in ("norm1", "norm2"):
        return module, _NORM_FIELDS[field], value
    if module in ("ls1", "ls2"):
        if field != "lambda1":
            raise KeyError(field)
        return module, "scale", value
    if field == "weight":
        return module, "kernel", value.T
    if field == "bias":
        return module, "bias", value
    raise KeyError(field)


def _fuse_qkv(parts: dict[tuple[str, str], dict[str, np.ndarray]], flat: dict,
              unknown: list) -> None:
    """Query, key and value of each block side by side into ``attn/qkv`` (in, 3 * out)."""
    for (index, field), found in sorted(parts.items()):
        if set(found) != {"q", "k", "v"}:
            unknown.append(f"block {index}: {field} of {'/'.join(sorted(found))} only, "
                           f"without the rest of query/key/value")
            continue
        flat[f"block{index}/attn/qkv/{field}"] = np.concatenate(
            [found["q"], found["k"], found["v"]], axis=-1)


_SINGLE = {  # whole-model tensor -> (our name, transform or None)
    "embeddings.cls_token": ("stem/cls_token", lambda v: v.reshape(-1, v.shape[-1])),
    "embeddings.register_tokens": ("stem/registers", lambda v: v.reshape(-1, v.shape[-1])),
    "embeddings.position_embeddings": ("stem/pos_embed", lambda v: v.reshape(-1, v.shape[-1])),
    "embeddings.patch_embeddings.projection.weight": (
        "stem/patch/kernel", lambda v: np.transpose(v, (2, 3, 1, 0))),
    "embeddings.patch_embeddings.projection.bias": ("stem/patch/bias", None),
    "layernorm.weight": ("norm/scale", None),
    "layernorm.bias": ("norm/bias", None),
    "classifier.weight": ("head/kernel", np.transpose),
    "classifier.bias": ("head/bias", None),
}


def hf_vit_to_flat(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat dict from a Hugging Face ViT / DINOv2 / DINOv2-with-registers state dict of
    numpy arrays (any of the names in the module doc)."""
    flat, unknown, qkv = {}, [], {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        short = _strip_prefix(name)
        if short in _DROPPED:
            continue
        if short in _SINGLE:
            ours, transform = _SINGLE[short]
            flat[ours] = value if transform is None else transform(value)
            continue
        match = _LAYER.match(short)
        try:
            if match is None:
                raise KeyError(name)
            index, part, field = match.groups()
            module, ours, array = _block_param(part, field, value)
        except KeyError:
            unknown.append(name)
            continue
        if module in ("q", "k", "v"):
            qkv.setdefault((index, ours), {})[module] = array
        else:
            flat[f"block{index}/{module}/{ours}"] = array
    _fuse_qkv(qkv, flat, unknown)
    if unknown:
        raise WeightsError(f"{len(unknown)} tensor name(s) not understood as a Hugging Face "
                           f"ViT/DINOv2 layout: " + ", ".join(sorted(unknown)))
    return flat


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The settings a ViT state dict implies. Shapes give the structure; the family
    (``layout``) gives eps, antialiasing and input recipe (None where unknown: our own
    layout). ``num_classes``: the stored classifier's (None without one); ``pool``: what
    the stored classifier reads (``cls`` or ``cls+mean``, by its input size), else the
    family's usual one (None for our layout without a head)."""

    layout: str
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float
    registers: int
    layerscale: bool
    stored_grid: int
    qkv_bias: bool
    layer_norm_eps: float | None
    pos_antialias: bool | None
    input_recipe: str | None
    num_classes: int | None
    pool: str | None

    #: the fields that are ``VisionTransformer`` keywords of the same name
    MODEL_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "registers",
                    "layerscale", "stored_grid", "qkv_bias", "layer_norm_eps",
                    "pos_antialias")

    def model_options(self) -> dict:
        """``VisionTransformer`` keywords (those known) that rebuild this structure."""
        return {f: getattr(self, f) for f in self.MODEL_FIELDS if getattr(self, f) is not None}

    def mismatches(self, model) -> list[str]:
        """Where ``model`` (a ``VisionTransformer``) differs from these weights, one line per
        setting; empty when it fits (the input recipe is compared by name)."""
        wanted = dict(self.model_options())
        if self.input_recipe is not None:
            wanted["input_recipe"] = self.input_recipe
        problems = []
        for field, value in wanted.items():
            have = getattr(model, field, None)
            if field == "input_recipe":
                have = getattr(have, "name", have)
            if have != value:
                problems.append(f"{field}: model {have!r}, weights imply {value!r}")
        return problems


def _shape(tensors, name) -> tuple[int, ...]:
    return tuple(np.shape(tensors[name]))


def vit_config(tensors: Mapping[str, np.ndarray], *, head_dim: int = 64) -> ViTConfig:
    """The ``ViTConfig`` of a state dict in a Hugging Face layout or ours.

    The number of heads is not in any tensor shape: it is ``width // head_dim``, and every
    google ViT and DINOv2 size (Ti/S/B/L/g) uses 64-dimensional heads.
    """
    layout = detect_hf_layout(tensors.keys())
    if layout is not None:
        flat = hf_vit_to_flat(tensors)
        family = dict(FAMILY_SETTINGS[layout])
    elif any(name.startswith("stem/") for name in tensors):        # our own flat names
        layout = "ours"
        flat, family = dict(tensors), dict(layer_norm_eps=None, pos_antialias=None,
                                           input_recipe=None, pool=None)
    else:
        raise WeightsError("these weights are neither a Hugging Face ViT/DINOv2 layout nor "
                           "our own flat names: not a ViT")
    required = ("stem/patch/kernel", "stem/pos_embed", "block0/mlp/fc1/kernel")
    missing = [name for name in required if name not in flat]
    if missing:
        raise WeightsError(f"not a ViT state dict: no {', '.join(missing)}")
    patch, _, _, width = _shape(flat, "stem/patch/kernel")
    positions = _shape(flat, "stem/pos_embed")[0] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise WeightsError(f"{positions} patch position embeddings are not a square grid")
    blocks = {int(m[1]) for n in flat if (m := re.match(r"block(\d+)/", n))}
    if blocks != set(range(len(blocks))):
        raise WeightsError(f"blocks are not numbered 0..L-1: {sorted(blocks)}")
    if width % head_dim:
        raise WeightsError(f"width {width} is not a multiple of head_dim {head_dim}")
    head = flat.get("head/kernel")
    num_classes = None
    if head is not None:
        num_classes = head.shape[1]
        family["pool"] = {width: "cls", 2 * width: "cls+mean"}.get(head.shape[0])
        if family["pool"] is None:
            raise WeightsError(f"classifier input {head.shape[0]} is neither the width "
                               f"{width} nor twice it")
    return ViTConfig(
        layout=layout, patch_size=patch, width=width, depth=len(blocks),
        num_heads=width // head_dim,
        mlp_ratio=_shape(flat, "block0/mlp/fc1/kernel")[1] / width,
        registers=_shape(flat, "stem/registers")[0] if "stem/registers" in flat else 0,
        layerscale="block0/ls1/scale" in flat, stored_grid=grid,
        qkv_bias="block0/attn/qkv/bias" in flat, num_classes=num_classes, **family)
