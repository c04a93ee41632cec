"""The ViT on its own: the stage contract, pooling, drop path, input dtypes, bfloat16,
position-embedding resampling and the standard sizes' parameter counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.models import assign_state, flatten_state
from finegrained.models import vit
from finegrained.models.vit import VisionTransformer
from finegrained.train.steps import set_compute_dtype

TINY = dict(patch_size=14, width=32, depth=3, num_heads=2, stored_grid=3)


def shapes(model) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape, for concrete and abstract (``nnx.eval_shape``) models alike."""
    return {"/".join(map(str, path)): tuple(variable.get_value().shape)
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def random_vit(num_classes=4, *, seed=0, **options) -> VisionTransformer:
    """A tiny ViT with random numpy values in every tensor, built abstractly (as weight
    loading does; eager initialisation compiles one program per shape)."""
    settings = dict(TINY, registers=2, layerscale=True, pool="cls+mean")
    settings.update(options)
    model = nnx.eval_shape(lambda: VisionTransformer(num_classes, rngs=nnx.Rngs(0),
                                                     **settings))
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in shapes(model).items():
        if name.endswith("/kernel"):
            flat[name] = rng.normal(0.0, 1.5 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name.endswith("/scale"):
            flat[name] = rng.uniform(0.5, 1.5, shape)
        else:   # biases, tokens, position embeddings
            flat[name] = rng.normal(0.0, 0.5, shape)
    assign_state(model, flat)
    return model


def pixels(n=2, height=42, width=42, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return random_vit()


def test_stages_and_parameter_names(model):
    assert model.stage_names == ("stem", "block0", "block1", "block2", "norm", "head")
    names = set(flatten_state(model))
    for name in ("stem/patch/kernel", "stem/patch/bias", "stem/cls_token", "stem/registers",
                 "stem/pos_embed", "block2/norm1/scale", "block2/attn/qkv/kernel",
                 "block2/attn/qkv/bias", "block2/attn/proj/kernel", "block2/ls1/scale",
                 "block2/norm2/bias", "block2/mlp/fc1/kernel", "block2/mlp/fc2/bias",
                 "block2/ls2/scale", "norm/scale", "norm/bias", "head/kernel", "head/bias"):
        assert name in names, name
    state = flatten_state(model)
    assert state["stem/pos_embed"].shape == (1 + 3 * 3, 32)
    assert state["stem/registers"].shape == (2, 32)
    assert state["block0/attn/qkv/kernel"].shape == (32, 96)
    plain = nnx.eval_shape(lambda: VisionTransformer(3, rngs=nnx.Rngs(0), **TINY))
    assert not any(n.startswith("stem/registers") or "/ls" in n for n in shapes(plain))


def test_split_forward_equals_whole(model):
    x = pixels()
    logits = np.asarray(model(x))
    assert logits.shape == (2, 4) and logits.dtype == np.float32
    tokens = model.forward(x, stop="stem")
    assert tokens.shape == (2, 1 + 2 + 9, 32)
    for cut in model.stage_names[:-1]:
        cached = model.forward(x, stop=cut)
        np.testing.assert_allclose(np.asarray(model.forward(cached, start=cut)), logits,
                                   rtol=1e-5, atol=1e-5)
    features = model.pooled_features(x)
    np.testing.assert_allclose(np.asarray(model.head(features)), logits, rtol=1e-5,
                               atol=1e-5)
    normed = model.forward(x, stop="norm")
    np.testing.assert_allclose(np.asarray(model.pooled_features(normed, start="norm")),
                               np.asarray(features), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(model.pooled_features(model.forward(x, stop="block1"), start="block1")),
        np.asarray(features), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", vit.POOLS)
def test_pooling_modes(pool):
    model = random_vit(pool=pool)
    assert model.num_features == (64 if pool == "cls+mean" else 32)
    x = pixels(height=28, width=42)   # a 2 x 3 grid: 1 + 2 registers + 6 tokens
    tokens = np.asarray(model.forward(x, stop="norm"))
    cls, patch_mean = tokens[:, 0], tokens[:, 3:].mean(axis=1)   # registers excluded
    expected = {"cls": cls, "mean": patch_mean,
                "cls+mean": np.concatenate([cls, patch_mean], axis=-1)}[pool]
    features = np.asarray(model.pooled_features(x))
    assert features.shape == (2, model.num_features)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.head(features)), np.asarray(model(x)),
                               rtol=1e-5, atol=1e-5)


def test_uint8_and_float_pixels_give_the_same_logits(model):
    x = pixels()
    np.testing.assert_array_equal(np.asarray(model(x)),
                                  np.asarray(model(x.astype(np.float32))))


def test_position_embeddings_resampled_for_other_sizes(model):
    stored = flatten_state(model)["stem/pos_embed"]
    np.testing.assert_array_equal(np.asarray(model.stem.position_embeddings((3, 3))), stored)
    for grid in [(2, 2), (4, 5), (1, 3)]:
        pos = np.asarray(model.stem.position_embeddings(grid))
        assert pos.shape == (1 + grid[0] * grid[1], 32)
        np.testing.assert_array_equal(pos[0], stored[0])   # the class token's, kept apart
    assert model(pixels(height=70, width=56)).shape == (2, 4)

    # gradients reach every stored patch position through the resampling
    graphdef, params, rest = nnx.split(model.stem, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest).position_embeddings((4, 5)) ** 2)
    grad = np.asarray(jax.grad(loss)(params)["pos_embed"].get_value())
    assert grad.shape == stored.shape
    assert np.all(np.abs(grad).sum(axis=1) > 0)


def test_drop_path_rates_rise_linearly():
    model = random_vit(depth=5, drop_path_rate=0.2)
    rates = [getattr(model, f"block{k}").drop_path.rate for k in range(5)]
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])


def test_drop_path_is_off_in_eval_mode_and_without_a_key():
    model = random_vit(drop_path_rate=0.5)
    x, key = pixels(), jax.random.key(0)
    reference = np.asarray(model(x))
    np.testing.assert_array_equal(np.asarray(model(x, key=key)), reference)   # eval mode
    model.train()
    np.testing.assert_array_equal(np.asarray(model(x)), reference)            # no key
    assert not np.allclose(np.asarray(model(x, key=key)), reference)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x, key=key)), reference)

    untouched = random_vit(drop_path_rate=0.0)
    untouched.train()
    np.testing.assert_array_equal(np.asarray(untouched(x, key=key)),
                                  np.asarray(random_vit(drop_path_rate=0.0)(x)))
    view = nnx.view(model, deterministic=False)   # a train-mode view, model unchanged
    assert not np.allclose(np.asarray(view(x, key=key)), reference)
    np.testing.assert_array_equal(np.asarray(model(x, key=key)), reference)


def test_drop_path_drops_whole_branches_per_sample():
    model = random_vit(depth=2, drop_path_rate=0.5)   # block1 drops at rate 0.5
    block = model.block1
    tokens = model.forward(pixels(n=32), stop="block0")
    attn = block.ls1(block.attn(block.norm1(tokens)))
    model.train()
    out = np.asarray(model.run_stage("block1", tokens, key=jax.random.key(3)))
    combos = []   # the four outcomes per sample: attention branch and MLP branch kept or not
    for keep_attn in (0.0, 2.0):
        middle = tokens + keep_attn * attn
        mlp = block.ls2(block.mlp(block.norm2(middle)))
        combos += [np.asarray(middle + keep_mlp * mlp) for keep_mlp in (0.0, 2.0)]
    outcome = [[np.allclose(out[b], c[b], rtol=1e-5, atol=1e-5) for c in combos]
               for b in range(len(out))]
    assert all(sum(matches) == 1 for matches in outcome)
    counts = np.sum(outcome, axis=0)
    assert np.all(counts > 0), counts   # 32 samples at rate 0.5: every outcome occurs


def test_split_forward_draws_what_the_whole_draws():
    model = random_vit(drop_path_rate=0.5)
    model.train()
    x, key = pixels(), jax.random.key(7)
    whole = np.asarray(model(x, key=key))
    cached = model.forward(x, stop="block1", key=key)
    np.testing.assert_allclose(np.asarray(model.forward(cached, start="block1", key=key)),
                               whole, rtol=1e-5, atol=1e-5)


def test_key_reaches_the_model_inside_a_jitted_pure_function():
    model = random_vit(drop_path_rate=0.5)
    graphdef, state = nnx.split(model)

    @jax.jit
    def train_logits(state, x, key):
        module = nnx.merge(graphdef, state)
        module.train()
        return module(x, key=key)
    x = pixels()
    first = np.asarray(train_logits(state, x, jax.random.key(1)))
    np.testing.assert_array_equal(first, np.asarray(train_logits(state, x, jax.random.key(1))))
    assert not np.allclose(first, np.asarray(train_logits(state, x, jax.random.key(2))))


def test_bfloat16_compute():
    x = pixels()
    reference = np.asarray(random_vit()(x))
    model = random_vit(dtype=jnp.bfloat16)
    logits = np.asarray(model(x))
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
    assert model.forward(x, stop="block1").dtype == jnp.bfloat16
    assert all(v.dtype == np.float32 for v in flatten_state(model).values())
    np.testing.assert_allclose(logits, reference, atol=0.15 * np.abs(reference).max())
    converted = random_vit()   # the train step's way: compute dtype set afterwards
    set_compute_dtype(converted, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(converted(x)), logits)


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"), reason="needs a GPU")
def test_cudnn_attention_matches_xla():
    x = pixels(n=4, height=224, width=224)
    fused = random_vit(dtype=jnp.bfloat16, stored_grid=16, attention_impl="auto")
    plain = random_vit(dtype=jnp.bfloat16, stored_grid=16, attention_impl="xla")
    assert vit.attention_implementation("auto", jnp.bfloat16, 16) == "cudnn"
    np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(plain(x)), atol=0.05)


@pytest.mark.parametrize("constructor,num_classes,backbone_params", [
    # transformers' ViTForImageClassification / Dinov2Model (mask token excluded) counts
    ("vit_base_patch16", 1000, 86_567_656 - (768 + 1) * 1000),
    ("vit_small_patch14", 0, 22_056_192),
    ("vit_large_patch14", 0, 304_367_616),
])
def test_standard_sizes_have_the_reference_parameter_counts(constructor, num_classes,
                                                            backbone_params):
    for registers in (0, 4) if constructor.endswith("14") else (0,):
        model = nnx.eval_shape(lambda: getattr(vit, constructor)(
            max(num_classes, 1), registers=registers, rngs=nnx.Rngs(0)))
        counts = {n: int(np.prod(shape)) for n, shape in shapes(model).items()}
        backbone = sum(v for n, v in counts.items() if not n.startswith("head/"))
        assert backbone == backbone_params + registers * model.width
        assert model.pos_antialias == bool(registers)
    assert model.input_recipe.name == ("inception" if constructor.endswith("16")
                                       else "torchvision")


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="pool"):
        VisionTransformer(2, pool="max", rngs=nnx.Rngs(0), **TINY)
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        VisionTransformer(2, rngs=nnx.Rngs(0), **dict(TINY, num_heads=3))
    with pytest.raises(ConfigError, match="drop_path_rate"):
        VisionTransformer(2, drop_path_rate=1.0, rngs=nnx.Rngs(0), **TINY)
    with pytest.raises(ConfigError, match="stop='blocks3'"):
        random_vit().forward(pixels(), stop="blocks3")


def test_constructor_options_override_the_size_and_family():
    model = nnx.eval_shape(lambda: vit.vit_small_patch14(
        3, registers=4, depth=2, pool="mean", stored_grid=16, pos_antialias=False,
        rngs=nnx.Rngs(0)))
    assert model.stage_names == ("stem", "block0", "block1", "norm", "head")
    assert (model.arch, model.width, model.num_heads, model.registers, model.pool_mode,
            model.stored_grid, model.pos_antialias, model.layerscale) == (
        "vit_small_patch14", 384, 6, 4, "mean", 16, False, True)
