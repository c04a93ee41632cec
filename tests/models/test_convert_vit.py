"""The Hugging Face ViT / DINOv2 converters on synthetic state dicts (no torch needed):
layout detection, renaming and reshaping, deliberate drops, every unknown name reported,
the settings a state dict implies, and the checkpoint table."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from finegrained.errors import WeightsError
from finegrained.models import detect_layout, to_flat, vit
from finegrained.plan.archs import architecture
from finegrained.models.convert_vit import (HF_CHECKPOINTS, HF_LAYOUTS, hf_vit_to_flat,
                                            vit_config)
from finegrained.models.vit import VisionTransformer, vit_from_config
from finegrained.models.weights import load_pretrained

WIDTH, DEPTH, MLP, PATCH, GRID, CLASSES = 8, 2, 24, 14, 3, 3


def hub_state(layout: str, *, registers: int = 4, classifier: bool = True, prefix: str = "",
              seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors named and shaped as the Hub files of ``layout``."""
    rng = np.random.default_rng(seed)
    dinov2 = layout != "hf_vit"
    shapes = {
        "embeddings.cls_token": (1, 1, WIDTH),
        "embeddings.position_embeddings": (1, 1 + GRID * GRID, WIDTH),
        "embeddings.patch_embeddings.projection.weight": (WIDTH, 3, PATCH, PATCH),
        "embeddings.patch_embeddings.projection.bias": (WIDTH,),
        "layernorm.weight": (WIDTH,), "layernorm.bias": (WIDTH,),
    }
    if dinov2:
        shapes["embeddings.mask_token"] = (1, WIDTH)
    if layout == "hf_dinov2_registers":
        shapes["embeddings.register_tokens"] = (1, registers, WIDTH)
    blocks = {f"attention.{part}": (WIDTH, WIDTH) for part in (
        "attention.query", "attention.key", "attention.value", "output.dense")}
    if dinov2:
        blocks.update({"norm1": None, "norm2": None, "mlp.fc1": (MLP, WIDTH),
                       "mlp.fc2": (WIDTH, MLP)})
    else:
        blocks.update({"layernorm_before": None, "layernorm_after": None,
                       "intermediate.dense": (MLP, WIDTH), "output.dense": (WIDTH, MLP)})
    for k in range(DEPTH):
        for part, weight in blocks.items():
            base = f"encoder.layer.{k}.{part}"
            shapes[f"{base}.weight"] = weight or (WIDTH,)
            shapes[f"{base}.bias"] = (weight or (WIDTH,))[:1]
        if dinov2:
            shapes[f"encoder.layer.{k}.layer_scale1.lambda1"] = (WIDTH,)
            shapes[f"encoder.layer.{k}.layer_scale2.lambda1"] = (WIDTH,)
    state = {prefix + name: rng.normal(size=shape).astype(np.float32)
             for name, shape in shapes.items()}
    if classifier:
        state["classifier.weight"] = rng.normal(
            size=(CLASSES, 2 * WIDTH if dinov2 else WIDTH)).astype(np.float32)
        state["classifier.bias"] = rng.normal(size=(CLASSES,)).astype(np.float32)
    return state


#: the backbone's attribute in each ``*ForImageClassification``
CLASSIFIER_PREFIXES = {"hf_vit": "vit.", "hf_dinov2": "dinov2.",
                       "hf_dinov2_registers": "dinov2_with_registers."}


@pytest.mark.parametrize("layout", HF_LAYOUTS)
@pytest.mark.parametrize("prefixed", [False, True])
def test_detect_and_convert(layout, prefixed):
    prefix = CLASSIFIER_PREFIXES[layout] if prefixed else ""
    state = hub_state(layout, prefix=prefix)
    assert detect_layout(state) == layout
    flat = hf_vit_to_flat(state)
    assert ("stem/registers" in flat) == (layout == "hf_dinov2_registers")
    assert flat["stem/cls_token"].shape == (1, WIDTH)
    assert flat["stem/pos_embed"].shape == (1 + GRID * GRID, WIDTH)
    np.testing.assert_array_equal(
        flat["stem/patch/kernel"],
        state[prefix + "embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))
    q, k, v = (state[f"{prefix}encoder.layer.1.attention.attention.{p}.weight"]
               for p in ("query", "key", "value"))
    np.testing.assert_array_equal(flat["block1/attn/qkv/kernel"],
                                  np.concatenate([q.T, k.T, v.T], axis=1))
    np.testing.assert_array_equal(flat["head/kernel"], state["classifier.weight"].T)
    assert ("block0/ls2/scale" in flat) == (layout != "hf_vit")
    assert not any("mask" in name for name in flat)
    # exactly the tensors a model of this structure has
    config = vit_config(state, head_dim=4)
    model = nnx.eval_shape(lambda: vit_from_config(config, CLASSES, rngs=nnx.Rngs(0)))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(flat) == names
    assert config.mismatches(model) == []


def test_settings_implied_by_a_state_dict():
    config = vit_config(hub_state("hf_dinov2_registers"), head_dim=4)
    assert (config.layout, config.patch_size, config.width, config.depth, config.num_heads,
            config.mlp_ratio, config.registers, config.layerscale, config.stored_grid) == (
        "hf_dinov2_registers", PATCH, WIDTH, DEPTH, 2, MLP / WIDTH, 4, True, GRID)
    assert (config.layer_norm_eps, config.pos_antialias, config.input_recipe) == (
        1e-6, True, "torchvision")
    assert (config.num_classes, config.pool) == (CLASSES, "cls+mean")

    google = vit_config(hub_state("hf_vit", classifier=False), head_dim=4)
    assert (google.layerscale, google.registers, google.layer_norm_eps, google.pos_antialias,
            google.input_recipe, google.num_classes, google.pool) == (
        False, 0, 1e-12, False, "inception", None, "cls")
    backbone = vit_config(hub_state("hf_dinov2", classifier=False), head_dim=4)
    assert (backbone.num_classes, backbone.pool) == (None, "cls+mean")

    ours = vit_config(hf_vit_to_flat(hub_state("hf_dinov2")), head_dim=4)
    assert ours.layout == "ours" and ours.layer_norm_eps is None and ours.pool == "cls+mean"
    assert ours.model_options() == {k: v for k, v in vit_config(
        hub_state("hf_dinov2"), head_dim=4).model_options().items()
        if k not in ("layer_norm_eps", "pos_antialias")}


def test_mismatches_name_each_setting():
    config = vit_config(hub_state("hf_dinov2"), head_dim=4)
    model = nnx.eval_shape(lambda: VisionTransformer(
        CLASSES, rngs=nnx.Rngs(0), **dict(config.model_options(), depth=3, registers=4)))
    problems = config.mismatches(model)
    assert any(p.startswith("depth: model 3") for p in problems)
    assert any(p.startswith("registers: model 4") for p in problems)
    assert len(problems) == 2


def test_dropped_on_purpose_and_unknown_reported_together():
    state = hub_state("hf_vit", prefix="")
    state["pooler.dense.weight"] = np.zeros((WIDTH, WIDTH), np.float32)   # in21k's pooler
    state["pooler.dense.bias"] = np.zeros((WIDTH,), np.float32)
    assert not any(n.startswith("pooler") for n in hf_vit_to_flat(state))

    state["encoder.layer.0.mlp.weights_in.weight"] = np.zeros((4, WIDTH))   # SwiGLU (giant)
    state["encoder.layer.1.attention.attention.rel_pos.weight"] = np.zeros((2,))
    state["something.else"] = np.zeros((1,))
    state["encoder.layer.0.layer_scale1.weight"] = np.zeros((WIDTH,))
    with pytest.raises(WeightsError) as error:
        hf_vit_to_flat(state)
    message = str(error.value)
    assert message.startswith("4 tensor name(s) not understood")
    for name in ("weights_in", "rel_pos", "something.else", "layer_scale1.weight"):
        assert name in message


def test_incomplete_query_key_value_is_reported():
    state = hub_state("hf_dinov2")
    del state["encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(WeightsError, match="block 1: kernel of q/v only"):
        hf_vit_to_flat(state)


def test_not_a_square_grid_and_wrong_target():
    state = hub_state("hf_dinov2")
    state["embeddings.position_embeddings"] = np.zeros((1, 1 + 6, WIDTH), np.float32)
    with pytest.raises(WeightsError, match="not a square grid"):
        vit_config(state, head_dim=4)
    with pytest.raises(WeightsError, match="cannot be loaded into resnet18"):
        to_flat(hub_state("hf_vit"), "resnet18")


def test_other_layouts_still_detected():
    assert detect_layout(["conv1.weight", "fc.weight", "layer1.0.conv1.weight"]) == (
        "torchvision")
    assert detect_layout(["stem/patch/kernel", "head/kernel"]) == "ours"
    assert detect_layout(["MobilenetV2/Conv/kernel"]) == "tf_mobilenet_v2"


def test_load_pretrained_replaces_the_head():
    state = hub_state("hf_dinov2_registers")
    config = vit_config(state, head_dim=4)
    # 'rbg' keys: threefry compiles one program per shape, slow for an eager init on a CPU
    model = vit_from_config(config, 7, pool="cls",
                            rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    report = load_pretrained(model, state, arch="vit_small_patch14_reg4")
    assert report["replaced_head"] and report["kept_from_init"] == ["head/bias", "head/kernel"]
    np.testing.assert_array_equal(np.asarray(model.stem.registers[...]),
                                  state["embeddings.register_tokens"][0])


def test_checkpoint_table():
    assert {c.layout for c in HF_CHECKPOINTS.values()} == set(HF_LAYOUTS)
    for repo, checkpoint in HF_CHECKPOINTS.items():
        assert checkpoint.url == f"https://huggingface.co/{repo}/resolve/main/model.safetensors"
        assert callable(getattr(vit, checkpoint.arch))
        assert checkpoint.layout in architecture(checkpoint.arch).weight_layouts
        assert checkpoint.arch.endswith("_reg4") == (checkpoint.layout == "hf_dinov2_registers")
    assert "google/vit-base-patch16-224-in21k" in HF_CHECKPOINTS
    assert "facebook/dinov2-with-registers-small" in HF_CHECKPOINTS
