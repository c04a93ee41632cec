"""Our ViT loads Hugging Face ViT / DINOv2 / DINOv2-with-registers state dicts and computes
what ``transformers`` computes: tokens, class token and logits, at the checkpoint's image
size and at others (position embeddings resampled up, down and to non-square grids).

Reference models are tiny and randomly initialised, with every tensor non-trivial (wide
Linear weights so attention is peaked, random LayerScale, tokens and norms), so a slip in
layout, token order or interpolation shows. Both the names ``transformers`` 5 uses in
memory and the names of the files on the Hub (its saved, "original" format) are checked."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402
from transformers.core_model_loading import revert_weight_conversion  # noqa: E402

from finegrained.models import assign_state, detect_layout, to_flat, vit  # noqa: E402
from finegrained.models.convert_vit import (HF_CHECKPOINTS, hf_vit_to_flat,  # noqa: E402
                                            vit_config)
from finegrained.models.vit import VisionTransformer, vit_from_config  # noqa: E402

ATOL = 1e-4
NUM_CLASSES = 5

# name -> (config class, classification model, its backbone attribute, config keywords)
REFERENCES = {
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", "dinov2",
               dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    patch_size=14, image_size=42)),
    "dinov2_registers": ("Dinov2WithRegistersConfig",
                         "Dinov2WithRegistersForImageClassification",
                         "dinov2_with_registers",
                         dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                              patch_size=14, image_size=56, num_register_tokens=4)),
    "vit": ("ViTConfig", "ViTForImageClassification", "vit",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=96, patch_size=16, image_size=48)),
}
LAYOUTS = {"dinov2": "hf_dinov2", "dinov2_registers": "hf_dinov2_registers", "vit": "hf_vit"}
# (height, width) per reference: the checkpoint's size, larger, smaller, non-square
IMAGE_SIZES = {
    "dinov2": [(42, 42), (56, 56), (28, 28), (28, 56)],
    "dinov2_registers": [(56, 56), (84, 84), (28, 28), (42, 70)],
    "vit": [(48, 48), (64, 64), (32, 32), (32, 64)],
}


def randomised_reference(name: str, seed: int = 0):
    config_class, model_class, _, kwargs = REFERENCES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(num_labels=NUM_CLASSES,
                                                 attn_implementation="eager", **kwargs)
    net = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for module_name, param in net.named_parameters():
            if module_name.endswith(("cls_token", "position_embeddings", "register_tokens",
                                     "mask_token")):
                param.normal_(0.0, 1.0)
            elif module_name.endswith("lambda1"):
                param.uniform_(-1.0, 1.0)
        for module in net.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, 1.5 / fan_in ** 0.5)
                module.bias.normal_(0.0, 0.2)
    return net.eval()


def numpy_state(state_dict) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy() for name, tensor in state_dict.items()}


def our_model(state: dict[str, np.ndarray], head_dim: int) -> VisionTransformer:
    config = vit_config(state, head_dim=head_dim)
    model = nnx.eval_shape(lambda: vit_from_config(config, config.num_classes,
                                                   rngs=nnx.Rngs(0)))
    # any table entry that reads the state's layout converts it
    reader = {"hf_vit": "vit_base_patch16", "hf_dinov2": "vit_base_patch14",
              "hf_dinov2_registers": "vit_base_patch14_reg4"}[detect_layout(state)]
    assign_state(model, to_flat(state, reader))
    assert config.mismatches(model) == []
    return model


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def reference(request):
    name = request.param
    net = randomised_reference(name)
    state = numpy_state(net.state_dict())
    kwargs = REFERENCES[name][3]
    model = our_model(state, kwargs["hidden_size"] // kwargs["num_attention_heads"])
    return name, net, state, model


def test_layout_config_and_hub_names(reference):
    name, net, state, model = reference
    kwargs = REFERENCES[name][3]
    assert detect_layout(state) == LAYOUTS[name]
    config = vit_config(state, head_dim=kwargs["hidden_size"] // kwargs["num_attention_heads"])
    assert (config.width, config.depth, config.num_heads, config.patch_size) == (
        kwargs["hidden_size"], kwargs["num_hidden_layers"], kwargs["num_attention_heads"],
        kwargs["patch_size"])
    assert config.stored_grid == kwargs["image_size"] // kwargs["patch_size"]
    assert config.registers == kwargs.get("num_register_tokens", 0)
    assert config.layerscale == (name != "vit")
    assert config.pool == ("cls" if name == "vit" else "cls+mean")
    assert config.num_classes == NUM_CLASSES

    # the names of the files on the Hub give the same tensors
    hub = numpy_state(revert_weight_conversion(net, net.state_dict()))
    assert set(hub) != set(state)
    assert any(".attention.attention.query." in n for n in hub)
    assert detect_layout(hub) == LAYOUTS[name]
    ours, from_hub = hf_vit_to_flat(state), hf_vit_to_flat(hub)
    assert set(ours) == set(from_hub)
    for key in ours:
        np.testing.assert_array_equal(ours[key], from_hub[key])


@pytest.mark.parametrize("size_index", range(4))
def test_same_tokens_and_logits(reference, size_index):
    name, net, _, model = reference
    height, width = IMAGE_SIZES[name][size_index]
    pixels = np.random.default_rng(size_index).integers(0, 256, (2, height, width, 3),
                                                       dtype=np.uint8)
    tokens = np.asarray(model.forward(pixels, stop="norm"))
    logits = np.asarray(model(pixels))
    normalised = np.asarray(model.input_recipe.apply(pixels))  # the same network input
    torch_input = torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())
    backbone = getattr(net, REFERENCES[name][2])
    extra = {"interpolate_pos_encoding": True} if name == "vit" else {}
    with torch.no_grad():
        out = backbone(torch_input, **extra)
        their_logits = net(torch_input, **extra).logits.numpy()
    their_tokens = out.last_hidden_state.numpy()
    grid = (height // REFERENCES[name][3]["patch_size"]) * (
        width // REFERENCES[name][3]["patch_size"])
    assert tokens.shape == their_tokens.shape == (2, 1 + model.registers + grid, model.width)
    # DINOv2's pooler output is the normalised class token; ViT's model has no pooler here
    their_cls = (their_tokens[:, 0] if out.pooler_output is None
                 else out.pooler_output.numpy())
    differences = {
        "tokens": np.abs(tokens - their_tokens).max(),
        "class token": np.abs(tokens[:, 0] - their_cls).max(),
        "logits": np.abs(logits - their_logits).max(),
    }
    print(f"{name} {height}x{width}: max |difference| "
          + ", ".join(f"{k} {v:.2g}" for k, v in differences.items())
          + f" (max |logit| {np.abs(their_logits).max():.3g})")
    assert max(differences.values()) < ATOL


# the Hub checkpoints' architectures (their config.json), built on torch's meta device
FULL_SIZE = {
    "facebook/dinov2-small": ("Dinov2Config", "Dinov2Model", dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
        patch_size=14)),
    "facebook/dinov2-with-registers-base": ("Dinov2WithRegistersConfig",
                                            "Dinov2WithRegistersModel", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518,
        patch_size=14, num_register_tokens=4)),
    "google/vit-base-patch16-224": ("ViTConfig", "ViTForImageClassification",
                                    dict(num_labels=1000)),
    "google/vit-base-patch16-224-in21k": ("ViTConfig", "ViTModel", {}),
}


@pytest.mark.parametrize("repo", sorted(FULL_SIZE))
def test_hub_checkpoints_fit_their_constructors(repo):
    """Full-size Hub names and shapes (no weights: zero-stride arrays) convert into exactly
    the tensors of the model that ``HF_CHECKPOINTS`` says to build."""
    config_class, model_class, kwargs = FULL_SIZE[repo]
    with torch.device("meta"):
        net = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    hub = revert_weight_conversion(net, net.state_dict())
    state = {name: np.broadcast_to(np.float32(0), tuple(t.shape)) for name, t in hub.items()}
    checkpoint = HF_CHECKPOINTS[repo]
    assert detect_layout(state) == checkpoint.layout
    config = vit_config(state)
    assert config.num_classes == checkpoint.num_classes
    model = nnx.eval_shape(lambda: getattr(vit, checkpoint.arch)(
        config.num_classes or 10, rngs=nnx.Rngs(0)))
    assert config.mismatches(model) == []
    flat = hf_vit_to_flat(state)
    ours = {"/".join(map(str, path)): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if checkpoint.num_classes is None:
        ours = {n: s for n, s in ours.items() if not n.startswith("head/")}
    assert {n: tuple(a.shape) for n, a in flat.items()} == ours
