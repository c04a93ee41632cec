"""Vision Transformers (google ViT, DINOv2, DINOv2 with registers) in Flax NNX, laid out
so the Hugging Face checkpoints load one to one (``convert_vit``).

Numerics follow ``transformers``' ``ViTModel`` / ``Dinov2Model`` /
``Dinov2WithRegistersModel``: a patch embedding (a conv with kernel = stride = patch
size, VALID, so a partial patch at the border is dropped), a class token, optional
register tokens, learned position embeddings for the class token and the patch grid (the
registers get none), pre-norm blocks (LayerNorm, multi-head self-attention, LayerNorm,
MLP with exact GELU), LayerScale on both residual branches where the checkpoint has it
(DINOv2), and a final LayerNorm. Token order: class token, registers, patches (row by
row). LayerNorm eps: 1e-12 in google ViT's config, 1e-6 in DINOv2's.

Position embeddings stay at the checkpoint's grid (``stored_grid`` x ``stored_grid``) as
the parameter; an image with another patch grid resamples them in the forward pass with
torch's bicubic interpolation written as two constant matrices (``bicubic``), so weight
files keep the checkpoint's shape, gradients reach the stored embedding, and any input
size works. ``pos_antialias`` picks torch's antialiased kernel, which
``Dinov2WithRegistersModel`` uses (``Dinov2Model`` and ``ViTModel`` do not). This is
``transformers`` 5's resampling (a target ``size=``); the original DINOv2 code passes a
``scale_factor`` with a 0.1 offset instead, which moves the sample points slightly.

Attention runs through ``jax.nn.dot_product_attention``. ``attention_impl='auto'`` asks
for cuDNN's fused kernel where it applies (a GPU backend, bfloat16/float16 activations,
head size a multiple of 8 up to 128) and XLA's otherwise; ``'xla'`` forces XLA. (The
cuDNN path has not run here yet: ``test_cudnn_attention_matches_xla`` checks it on a GPU.)

Stochastic depth (drop path): each block drops each of its two residual branches, per
sample, with a probability rising linearly over depth from 0 (``block0``) to
``drop_path_rate`` (the last block), and scales the kept ones by ``1 / keep``. Its
randomness is an argument, not model state: ``model.forward(x, key=k)``
(``StagedClassifier.forward`` gives stage ``i`` the key ``fold_in(k, i)``; each block
splits its own for its two branches). That keeps the train step pure (``train_step(state,
batch, rng)`` derives ``k`` from its ``rng``; no RNG variables in the model's state, the
weight files or the checkpoints), and leaves the other architectures, which take no key
(``takes_key``), untouched. Drop path acts only in train mode (``model.train()``, or
``nnx.view(model, deterministic=False)``: it is an ``nnx.Dropout`` broadcast over tokens
and channels) and only when a key is given; eval mode, and any call without a key, is
deterministic.

Stages: ``stem`` (pixels -> tokens ``(B, T, D)``, T = 1 + registers + patches),
``block0`` .. ``block{L-1}`` (tokens -> tokens), ``norm`` (the final LayerNorm over all
tokens) and ``head`` (pooling + Linear). Pooling (``pool``): ``'cls'`` the class token,
``'mean'`` the mean of the patch tokens (class token and registers excluded),
``'cls+mean'`` both concatenated, as ``Dinov2ForImageClassification`` feeds its
classifier; ``num_features`` is D or 2D.

Parameter names (see ``params``): ``stem/patch/{kernel,bias}`` (kernel HWIO),
``stem/cls_token`` (1, D), ``stem/registers`` (R, D), ``stem/pos_embed`` (1 + G*G, D);
``block{k}/norm1/{scale,bias}``, ``block{k}/attn/qkv/{kernel,bias}`` (D, 3D: query, key,
value side by side, heads inside each), ``block{k}/attn/proj/{kernel,bias}``,
``block{k}/ls1/scale``, ``block{k}/norm2/...``, ``block{k}/mlp/fc1/...``,
``block{k}/mlp/fc2/...``, ``block{k}/ls2/scale``; ``norm/{scale,bias}``;
``head/{kernel,bias}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.models import bicubic
from finegrained.models.registry import (INCEPTION_RECIPE, TORCHVISION_RECIPE, InputRecipe,
                                         StagedClassifier)

POOLS = ("cls", "mean", "cls+mean")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# transformers' initialisation (initializer_range 0.02); DINOv2's LayerScale starts at 1e-5.
WEIGHT_INIT = nnx.initializers.truncated_normal(stddev=0.02)
LAYERSCALE_INIT = 1e-5


def _linear(cin, cout, *, use_bias=True, rngs, dtype, param_dtype):
    return nnx.Linear(cin, cout, use_bias=use_bias, kernel_init=WEIGHT_INIT, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)


def _layer_norm(width, eps, *, rngs, dtype, param_dtype):
    # two-pass variance, as torch computes it: the residual stream can have a large mean
    return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


class Embedding(nnx.Module):
    """The ``stem``: patch embedding, class token, registers and position embeddings."""

    def __init__(self, width, patch_size, registers, stored_grid, *, pos_antialias, rngs,
                 dtype, param_dtype):
        self.dtype = dtype
        self.stored_grid = stored_grid
        self.pos_antialias = pos_antialias
        self.patch = nnx.Conv(3, width, (patch_size, patch_size), strides=patch_size,
                              padding="VALID", kernel_init=WEIGHT_INIT, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.cls_token = nnx.Param(WEIGHT_INIT(rngs.params(), (1, width), param_dtype))
        self.registers = (nnx.Param(WEIGHT_INIT(rngs.params(), (registers, width), param_dtype))
                          if registers else None)
        self.pos_embed = nnx.Param(
            WEIGHT_INIT(rngs.params(), (1 + stored_grid ** 2, width), param_dtype))

    def position_embeddings(self, grid: tuple[int, int]):
        """Class token + patch position embeddings ``(1 + h * w, D)`` for a patch grid
        ``(h, w)``: the stored ones, bicubically resampled when the grid differs."""
        stored = self.pos_embed[...]
        if grid == (self.stored_grid, self.stored_grid):
            return stored
        rows, cols = (bicubic.resize_matrix(self.stored_grid, n, antialias=self.pos_antialias)
                      for n in grid)
        patch = stored[1:].reshape(self.stored_grid, self.stored_grid, -1)
        patch = jnp.einsum("yi,xj,ijd->yxd", rows, cols, patch.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([stored[:1], patch.reshape(grid[0] * grid[1], -1)
                                .astype(stored.dtype)])

    def __call__(self, x):
        patches = self.patch(x)
        batch, height, width, channels = patches.shape
        pos = self.position_embeddings((height, width)).astype(self.dtype)
        cls = self.cls_token[...].astype(self.dtype) + pos[:1]
        tokens = [jnp.broadcast_to(cls, (batch, 1, channels))]
        if self.registers is not None:
            registers = self.registers[...].astype(self.dtype)
            tokens.append(jnp.broadcast_to(registers, (batch, *registers.shape)))
        tokens.append(patches.reshape(batch, height * width, channels) + pos[1:])
        return jnp.concatenate(tokens, axis=1)


def attention_implementation(impl: str, dtype, head_dim: int) -> str | None:
    """What ``jax.nn.dot_product_attention`` is asked for: ``'cudnn'`` or ``None`` (XLA)."""
    if impl == "cudnn":
        return "cudnn"
    fused = (impl == "auto" and jax.default_backend() in ("gpu", "cuda")
             and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
             and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if fused else None


class SelfAttention(nnx.Module):
    """Multi-head self-attention: one ``qkv`` projection, ``dot_product_attention``,
    the output projection ``proj``."""

    def __init__(self, width, num_heads, *, qkv_bias, attention_impl, rngs, dtype,
                 param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.qkv = _linear(width, 3 * width, use_bias=qkv_bias, **kw)
        self.proj = _linear(width, width, **kw)

    def __call__(self, x):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y = jax.nn.dot_product_attention(
            query, key, value,
            implementation=attention_implementation(self.attention_impl, x.dtype, head_dim))
        return self.proj(y.reshape(batch, tokens, width))


class Mlp(nnx.Module):
    """``fc2(gelu(fc1(x)))`` with the exact (erf) GELU, as the checkpoints were trained."""

    def __init__(self, width, hidden, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = _linear(width, hidden, **kw)
        self.fc2 = _linear(hidden, width, **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LayerScale(nnx.Module):
    """A learned per-channel scale of a residual branch (DINOv2)."""

    def __init__(self, width, *, param_dtype):
        self.scale = nnx.Param(jnp.full((width,), LAYERSCALE_INIT, param_dtype))

    def __call__(self, x):
        return x * self.scale[...].astype(x.dtype)


class EncoderBlock(nnx.Module):
    """Pre-norm block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``, each
    branch dropped per sample in train mode (drop path) when a key is given."""

    def __init__(self, width, num_heads, mlp_width, *, layerscale, drop_path_rate,
                 layer_norm_eps, qkv_bias, attention_impl, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = _layer_norm(width, layer_norm_eps, **kw)
        self.attn = SelfAttention(width, num_heads, qkv_bias=qkv_bias,
                                  attention_impl=attention_impl, **kw)
        self.ls1 = LayerScale(width, param_dtype=param_dtype) if layerscale else None
        self.norm2 = _layer_norm(width, layer_norm_eps, **kw)
        self.mlp = Mlp(width, mlp_width, **kw)
        self.ls2 = LayerScale(width, param_dtype=param_dtype) if layerscale else None
        # one keep/drop draw per sample: the mask broadcasts over tokens and channels
        self.drop_path = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2),
                                     deterministic=True)

    def _residual(self, y, scale, key):
        if scale is not None:
            y = scale(y)
        return y if key is None else self.drop_path(y, rngs=key)

    def __call__(self, x, *, key=None):
        attn_key, mlp_key = (None, None) if key is None else jax.random.split(key)
        x = x + self._residual(self.attn(self.norm1(x)), self.ls1, attn_key)
        return x + self._residual(self.mlp(self.norm2(x)), self.ls2, mlp_key)


class VisionTransformer(StagedClassifier):
    """A ViT; ``width`` D, ``depth`` L blocks of ``num_heads`` heads, MLP hidden size
    ``round(width * mlp_ratio)``, ``registers`` extra tokens, position embeddings stored
    for a ``stored_grid`` x ``stored_grid`` patch grid (see the module doc)."""

    takes_key = True

    def __init__(self, num_classes: int, *, patch_size: int, width: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, registers: int = 0,
                 layerscale: bool = False, pool: str = "cls", stored_grid: int,
                 pos_antialias: bool = False, layer_norm_eps: float = 1e-6,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 attention_impl: str = "auto",
                 input_recipe: InputRecipe = TORCHVISION_RECIPE, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, arch: str = "vit"):
        problems = []
        if min(patch_size, width, depth, num_heads, stored_grid) < 1:
            problems.append("patch_size, width, depth, num_heads and stored_grid must be "
                            "positive")
        elif width % num_heads:
            problems.append(f"width {width} is not a multiple of num_heads {num_heads}")
        if registers < 0 or mlp_ratio <= 0:
            problems.append("registers must be >= 0 and mlp_ratio positive")
        if pool not in POOLS:
            problems.append(f"pool must be one of {list(POOLS)}, got {pool!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            problems.append(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl must be one of {list(ATTENTION_IMPLS)}, "
                            f"got {attention_impl!r}")
        if problems:
            raise ConfigError(f"{arch}: " + "; ".join(problems))
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.arch = arch
        self.dtype = dtype
        self.input_recipe = input_recipe
        self.patch_size, self.width, self.depth = patch_size, width, depth
        self.num_heads, self.mlp_ratio, self.registers = num_heads, mlp_ratio, registers
        self.layerscale, self.stored_grid, self.pool_mode = layerscale, stored_grid, pool
        self.pos_antialias, self.layer_norm_eps = pos_antialias, layer_norm_eps
        self.qkv_bias = qkv_bias
        self.stage_names = ("stem", *(f"block{k}" for k in range(depth)), "norm", "head")
        self.stem = Embedding(width, patch_size, registers, stored_grid,
                              pos_antialias=pos_antialias, **kw)
        for k, rate in enumerate(np.linspace(0.0, drop_path_rate, depth)):
            setattr(self, f"block{k}", EncoderBlock(
                width, num_heads, round(width * mlp_ratio), layerscale=layerscale,
                drop_path_rate=float(rate), layer_norm_eps=layer_norm_eps,
                qkv_bias=qkv_bias, attention_impl=attention_impl, **kw))
        self.norm = _layer_norm(width, layer_norm_eps, **kw)
        self.num_features = 2 * width if pool == "cls+mean" else width
        self.num_classes = num_classes
        self.head = nnx.Linear(self.num_features, num_classes, **kw)

    def run_stage(self, name, x, *, key=None):
        if name == "stem":
            return self.stem(x)
        if name == "norm":
            return self.norm(x)
        return getattr(self, name)(x, key=key)

    def pool(self, tokens):
        """The classifier's input ``(B, num_features)`` from tokens (after ``norm``: the
        head's; after a block: what a probe of that block reads): ``pool``'s choice."""
        cls = tokens[:, 0]
        if self.pool_mode == "cls":
            return cls
        mean = jnp.mean(tokens[:, 1 + self.registers:], axis=1)
        return mean if self.pool_mode == "mean" else jnp.concatenate([cls, mean], axis=-1)


RECIPES = {recipe.name: recipe for recipe in (TORCHVISION_RECIPE, INCEPTION_RECIPE)}


def vit_from_config(config, num_classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                    param_dtype=jnp.float32, **options) -> VisionTransformer:
    """The ``VisionTransformer`` that the weights described by ``config`` (a
    ``convert_vit.ViTConfig``) fit, with its input recipe and pooling; ``options`` add or
    override keywords (``pool``, ``drop_path_rate``, ``arch``, ...)."""
    settings = dict(config.model_options(), pool=config.pool or "cls", arch="vit")
    if config.input_recipe is not None:
        settings["input_recipe"] = RECIPES[config.input_recipe]
    settings.update(options)
    return VisionTransformer(num_classes, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             **settings)


#: The two families' conventions. google ViT (``google/vit-*``, patch 16; DINO's
#: ``facebook/dino-vits8`` at patch 8 has the same layout): 224 px pretraining (a grid of
#: 224 / patch), LayerNorm eps 1e-12, pixels scaled to [-1, 1], class-token head. DINOv2
#: (``facebook/dinov2-*``, patch 14): 518 px (grid 37), LayerScale, eps 1e-6, ImageNet
#: mean/std, class token + patch mean head.
GOOGLE_VIT = dict(layerscale=False, layer_norm_eps=1e-12, pool="cls",
                  input_recipe=INCEPTION_RECIPE)
DINOV2 = dict(layerscale=True, stored_grid=37, layer_norm_eps=1e-6, pool="cls+mean",
              input_recipe=TORCHVISION_RECIPE)
#: width, depth, heads (64-dimensional heads throughout).
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
         "large": (1024, 24, 16)}


def scaled_width(width: int, num_heads: int, multiplier: int) -> int:
    """The embedding width at ``multiplier / 64`` of the standard ``width`` (64: the standard
    size, as ``backbone.width`` scales MobileNetV2), rounded to whole heads."""
    return max(1, round(width * multiplier / 64 / num_heads)) * num_heads


def _vit(size: str, patch_size: int, registers: int = 0):
    arch = f"vit_{size}_patch{patch_size}" + (f"_reg{registers}" if registers else "")
    width, depth, heads = SIZES[size]
    family = DINOV2 if patch_size == 14 else dict(GOOGLE_VIT, stored_grid=224 // patch_size)

    def build(num_classes: int, *, width: int = 64, stage_depths=None,
              registers: int = registers, rngs: nnx.Rngs, dtype=jnp.float32,
              param_dtype=jnp.float32, **options) -> VisionTransformer:
        settings = dict(family, patch_size=patch_size, num_heads=heads, registers=registers,
                        width=scaled_width(SIZES[size][0], heads, width),
                        depth=stage_depths[0] if stage_depths else SIZES[size][1],
                        pos_antialias=bool(registers), arch=arch)
        settings.update(options)
        return VisionTransformer(num_classes, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype, **settings)
    build.__name__ = arch
    build.__doc__ = (f"{arch}: D={width}, {depth} blocks, {heads} heads, patch {patch_size}, "
                     f"{'DINOv2' if patch_size == 14 else 'google ViT'} defaults"
                     f"{f', {registers} registers' if registers else ''}. ``width`` scales D by "
                     f"width/64 (whole heads), ``stage_depths`` ``[L]`` sets the depth "
                     f"(``backbone.width``/``stage_depths``); ``registers=4`` for DINOv2 with "
                     f"registers (antialiased position resampling, as transformers does); "
                     f"``options`` override any ``VisionTransformer`` keyword.")
    return build


vit_tiny_patch8 = _vit("tiny", 8)
vit_small_patch8 = _vit("small", 8)
vit_tiny_patch16 = _vit("tiny", 16)
vit_small_patch16 = _vit("small", 16)
vit_base_patch16 = _vit("base", 16)
vit_large_patch16 = _vit("large", 16)
vit_tiny_patch14 = _vit("tiny", 14)
vit_small_patch14 = _vit("small", 14)
vit_base_patch14 = _vit("base", 14)
vit_large_patch14 = _vit("large", 14)
vit_small_patch14_reg4 = _vit("small", 14, 4)
vit_base_patch14_reg4 = _vit("base", 14, 4)
vit_large_patch14_reg4 = _vit("large", 14, 4)
