"""Converters from external weight layouts to our flat names (see ``params``).

* torchvision / timm ResNet state dicts (``conv1.weight``, ``layer2.0.downsample.1.bias``,
  ``fc.weight``...): conv kernels OIHW -> HWIO, ``fc`` (out, in) -> ``head/kernel``
  (in, out), ``running_mean/var`` -> ``mean/var``, ``num_batches_tracked`` dropped.
* the TFLite-derived MobileNetV2 npz files (``MobilenetV2/Conv/kernel``,
  ``MobilenetV2/expanded_conv_3/depthwise/bias``, ``MobilenetV2/Logits/Conv2d_1c_1x1/kernel``
  or ``Logits/kernel``): already HWIO with BatchNorm folded into biases; only renamed
  (block ``expanded_conv_<i>`` -> ``<stage>/<index in stage>``).
* Hugging Face ViT / DINOv2 / DINOv2-with-registers state dicts (``hf_vit``,
  ``hf_dinov2``, ``hf_dinov2_registers``): see ``convert_vit``.

Only numpy is needed here. Every unrecognised name is reported at once (``WeightsError``),
never silently dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from finegrained.errors import WeightsError
from finegrained.models.convert_vit import HF_LAYOUTS, detect_hf_layout, hf_vit_to_flat, vit_config
from finegrained.plan.archs import architecture

LAYOUTS = ("ours", "torchvision", "tf_mobilenet_v2", *HF_LAYOUTS)

_TV_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_TV_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$")
_TF_BLOCK = re.compile(r"^MobilenetV2/expanded_conv(?:_(\d+))?/(expand|depthwise|project)/"
                       r"(kernel|bias)$")
_TF_SINGLE = {"MobilenetV2/Conv": "stem/conv", "MobilenetV2/Conv_1": "features/conv"}
_TF_LOGITS = ("MobilenetV2/Logits/Conv2d_1c_1x1/", "Logits/")


def _unknown(names, layout):
    return WeightsError(f"{len(names)} tensor name(s) not understood as {layout} layout: "
                        + ", ".join(sorted(names)))


def _tv_param(prefix: str, kind: str, field: str, value: np.ndarray):
    """(our name, array) for one torchvision conv/bn tensor, or None to drop it."""
    if kind.startswith("conv") or kind == "downsample.0":
        if field != "weight" or value.ndim != 4:
            raise KeyError(field)
        return f"{prefix}/kernel", np.transpose(value, (2, 3, 1, 0))
    if field == "num_batches_tracked":
        return None
    return f"{prefix}/{_TV_BN[field]}", value


def torchvision_resnet_to_flat(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat dict from a torchvision (or timm) ResNet state dict of numpy arrays."""
    flat, unknown = {}, []
    for name, value in state_dict.items():
        value = np.asarray(value)
        parts = name.split(".")
        try:
            if name == "fc.weight":
                flat["head/kernel"] = value.T
                continue
            if name == "fc.bias":
                flat["head/bias"] = value
                continue
            if len(parts) == 2 and parts[0] in ("conv1", "bn1"):
                kind = "conv" if parts[0] == "conv1" else "bn"
                item = _tv_param(f"stem/{kind}", kind, parts[1], value)
            else:
                match = _TV_BLOCK.match(name)
                if match is None:
                    raise KeyError(name)
                stage, block, kind, field = match.groups()
                local = {"downsample.0": "downsample/conv",
                         "downsample.1": "downsample/bn"}.get(kind, kind)
                item = _tv_param(f"stage{stage}/{block}/{local}", kind, field, value)
        except KeyError:
            unknown.append(name)
            continue
        if item is not None:
            flat[item[0]] = item[1]
    if unknown:
        raise _unknown(unknown, "torchvision ResNet")
    return flat


def tf_mobilenet_v2_to_flat(npz: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat dict (``batch_norm=False`` MobileNetV2 1.0, default depths) from the
    TFLite-derived MobileNetV2 npz tensors."""
    from finegrained.models.mobilenet_v2 import block_layout

    positions = [(stage, index) for *_, stage, index in block_layout()]
    flat, unknown = {}, []
    for name in npz.keys():
        value = np.asarray(npz[name])
        layer, _, field = name.rpartition("/")
        block = _TF_BLOCK.match(name)
        if layer in _TF_SINGLE and field in ("kernel", "bias"):
            flat[f"{_TF_SINGLE[layer]}/{field}"] = value
        elif block is not None and int(block[1] or 0) < len(positions):
            stage, index = positions[int(block[1] or 0)]
            flat[f"{stage}/{index}/{block[2]}/conv/{block[3]}"] = value
        elif any(name == p + f for p in _TF_LOGITS for f in ("kernel", "bias")):
            # a 1x1 conv (1, 1, in, out) in the graph, a Linear (in, out) here
            shape = (-1, value.shape[-1]) if field == "kernel" else (-1,)
            flat[f"head/{field}"] = value.reshape(shape)
        else:
            unknown.append(name)
    if unknown:
        raise _unknown(unknown, "TF MobileNetV2")
    return flat


def detect_layout(flat_names) -> str:
    """One of ``LAYOUTS`` (``'ours'``, ``'torchvision'``, ``'tf_mobilenet_v2'``, ``'hf_vit'``,
    ``'hf_dinov2'``, ``'hf_dinov2_registers'``), judged from tensor names."""
    names = set(flat_names)
    if any(n.startswith("MobilenetV2/") for n in names):
        return "tf_mobilenet_v2"
    hf_layout = detect_hf_layout(names)
    if hf_layout is not None:
        return hf_layout
    if {"conv1.weight", "fc.weight"} & names or any(n.startswith("layer1.") for n in names):
        return "torchvision"
    if "head/kernel" in names or any(n.startswith("stem/") for n in names):
        return "ours"
    sample = ", ".join(sorted(names)[:5])
    raise WeightsError(f"cannot tell the layout of {len(names)} tensors (first names: "
                       f"{sample}); known layouts: {', '.join(LAYOUTS)}")


#: External layout -> its converter to our flat names.
CONVERTERS = {"torchvision": torchvision_resnet_to_flat, "tf_mobilenet_v2": tf_mobilenet_v2_to_flat,
              **{layout: hf_vit_to_flat for layout in HF_LAYOUTS}}


#: External layout -> what a model must be to take its weights (one line per difference),
#: where the layout implies more than the tensor shapes show (a ViT's eps, heads, ...).
FIT_CHECKS = {layout: lambda tensors, model: vit_config(tensors).mismatches(model)
              for layout in HF_LAYOUTS}


def fit_problems(tensors: Mapping[str, np.ndarray], model) -> list[str]:
    """Where ``model`` differs from what ``tensors`` (in their own layout) imply."""
    check = FIT_CHECKS.get(detect_layout(tensors.keys()))
    return check(tensors, model) if check else []


def to_flat(tensors: Mapping[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """Tensors in any known layout -> our flat names for ``arch`` (which must read that
    layout: ``Architecture.weight_layouts``)."""
    layout = detect_layout(tensors.keys())
    if layout == "ours":
        return {name: np.asarray(value) for name, value in tensors.items()}
    reads = architecture(arch).weight_layouts
    if layout not in reads:
        raise WeightsError(f"weights in {layout} layout cannot be loaded into {arch} (it reads "
                           f"{', '.join(reads) or 'only its own layout'})")
    return CONVERTERS[layout](tensors)
