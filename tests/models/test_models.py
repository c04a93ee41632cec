"""The model interface: shapes, stage boundaries, pooled features, flat state round trip,
input dtypes, train/eval BatchNorm behaviour, and the weight-layout converters."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from finegrained.errors import ConfigError, WeightsError
from finegrained.models import (assign_state, build_model, detect_layout, flatten_state,
                                tf_mobilenet_v2_to_flat, to_flat, torchvision_resnet_to_flat)
from finegrained.models.mobilenet_v2 import block_layout
from finegrained.plan.archs import ARCHITECTURES, architecture


def rngs(seed=0):
    # 'rbg' keys: threefry's per-shape compilation makes eager init slow on CPU
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def tiny(arch, seed=0, num_classes=5):
    if arch == "mobilenet_v2":
        return build_model(arch, num_classes, width=16, stage_depths=(1,) * 7,
                           rngs=rngs(seed))
    return build_model(arch, num_classes, width=8, stage_depths=(1, 1, 1, 1), rngs=rngs(seed))


def pixels(n=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def abstract(arch, num_classes, **kw):
    return nnx.eval_shape(lambda: build_model(arch, num_classes, rngs=nnx.Rngs(0), **kw))


def param_count(model):
    return sum(int(np.prod(v.get_value().shape))
               for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("arch,params,stage_shapes", [
    ("resnet18", 11_689_512, {"stem": (56, 56, 64), "stage1": (56, 56, 64),
                              "stage2": (28, 28, 128), "stage4": (7, 7, 512)}),
    ("resnet34", 21_797_672, {"stage3": (14, 14, 256), "stage4": (7, 7, 512)}),
    ("resnet50", 25_557_032, {"stage1": (56, 56, 256), "stage4": (7, 7, 2048)}),
    ("mobilenet_v2", None, {"stem": (112, 112, 32), "stage1": (112, 112, 16),
                            "stage2": (56, 56, 24), "stage3": (28, 28, 32),
                            "stage4": (14, 14, 96), "stage5": (7, 7, 320),
                            "features": (7, 7, 1280)}),
])
def test_full_size_shapes(arch, params, stage_shapes):
    num_classes = 1000
    model = abstract(arch, num_classes)
    if params is not None:  # torchvision's parameter counts (BatchNorm stats excluded)
        assert param_count(model) == params
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
    assert nnx.eval_shape(lambda m, x: m(x), model, x).shape == (2, num_classes)
    for stage, shape in stage_shapes.items():
        out = nnx.eval_shape(lambda m, x: m.forward(x, stop=stage), model, x)
        assert out.shape == (2, *shape), stage
    pooled = nnx.eval_shape(lambda m, x: m.pooled_features(x), model, x)
    assert pooled.shape == (2, model.num_features)
    assert model.head.kernel.get_value().shape == (model.num_features, num_classes)


def test_mobilenet_stage_grouping():
    model = abstract("mobilenet_v2", 10)
    assert model.stage_names == ("stem", "stage1", "stage2", "stage3", "stage4", "stage5",
                                 "features", "head")
    assert [len(getattr(model, f"stage{i}")) for i in range(1, 6)] == [1, 2, 3, 7, 4]
    assert model.input_recipe.mean == (128.0,) * 3


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_stage_boundaries_compose(arch):
    model = tiny(arch)
    x = pixels()
    logits = np.asarray(model(x))
    for stage in model.stage_names[:-1]:
        boundary = model.forward(x, stop=stage)
        resumed = np.asarray(model.forward(boundary, start=stage))
        np.testing.assert_allclose(resumed, logits, rtol=1e-5, atol=1e-5, err_msg=stage)
    middle = model.forward(model.forward(x, stop="stage1"), start="stage1", stop="stage3")
    np.testing.assert_allclose(middle, model.forward(x, stop="stage3"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.forward(x, stop="head"), logits, rtol=1e-6, atol=1e-6)

    pooled = model.pooled_features(x)
    assert pooled.shape == (2, model.num_features)
    np.testing.assert_allclose(model.head(pooled), logits, rtol=1e-5, atol=1e-5)
    last_body = model.stage_names[-2]
    np.testing.assert_allclose(
        model.pooled_features(model.forward(x, stop=last_body), start=last_body), pooled,
        rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="not a stage"):
        model.forward(x, stop="stage9")
    with pytest.raises(ConfigError, match="runs no stage"):
        model.forward(boundary, start="stage3", stop="stage2")


def test_uint8_and_float_pixels_agree():
    model = tiny("resnet18")
    x = pixels()
    np.testing.assert_allclose(model(x), model(x.astype(np.float32)), rtol=0, atol=1e-6)
    assert model(x).dtype == jnp.float32


def test_flatten_assign_round_trip():
    source, target = tiny("resnet18", seed=1), tiny("resnet18", seed=2)
    flat = flatten_state(source)
    assert {"stem/conv/kernel", "stem/bn/scale", "stem/bn/mean", "stem/bn/var",
            "stage1/0/conv1/kernel", "stage1/0/bn1/bias", "stage2/0/downsample/conv/kernel",
            "stage2/0/downsample/bn/mean", "head/kernel", "head/bias"} <= set(flat)
    assert flat["head/kernel"].shape == (64, 5) and flat["head/bias"].shape == (5,)
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    x = pixels()
    assert not np.allclose(source(x), target(x))
    assign_state(target, flat)
    np.testing.assert_array_equal(source(x), target(x))
    again = flatten_state(target)
    assert again.keys() == flat.keys()
    for name in flat:
        np.testing.assert_array_equal(again[name], flat[name])


def test_assign_state_reports_every_problem():
    model = tiny("resnet18")
    before = flatten_state(model)
    flat = dict(before)
    del flat["stage1/0/bn1/mean"]
    del flat["head/bias"]
    flat["head/kernel"] = np.zeros((64, 7), np.float32)
    flat["stem/conv/weight"] = np.zeros((3,), np.float32)
    with pytest.raises(WeightsError) as error:
        assign_state(model, flat)
    message = str(error.value)
    assert message.startswith("4 tensor(s) do not fit")
    assert "missing: stage1/0/bn1/mean (8,)" in message
    assert "missing: head/bias (5,)" in message
    assert "wrong shape: head/kernel given (64, 7), model has (64, 5)" in message
    assert "unexpected: stem/conv/weight (3,)" in message
    for name, value in flatten_state(model).items():  # nothing was assigned
        np.testing.assert_array_equal(value, before[name])


def test_train_mode_updates_batch_stats_with_torch_momentum():
    model = tiny("resnet18")
    x = pixels(n=4)
    eval_logits = np.asarray(model(x))
    stats = flatten_state(model)
    assert model.stem.bn.use_running_average  # built in eval mode

    model.train()
    assert not model.stem.bn.use_running_average
    model(x)
    updated = flatten_state(model)
    batch = model.stem.conv(model.input_recipe.apply(x))
    expected_mean = 0.9 * stats["stem/bn/mean"] + 0.1 * np.asarray(batch.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(updated["stem/bn/mean"], expected_mean, rtol=1e-5, atol=1e-5)
    assert not np.allclose(updated["stage4/0/bn2/var"], stats["stage4/0/bn2/var"])
    np.testing.assert_array_equal(updated["stem/conv/kernel"], stats["stem/conv/kernel"])

    model.eval()
    assign_state(model, stats)
    np.testing.assert_array_equal(model(x), eval_logits)
    # eval mode: a sample's logits do not depend on the rest of the batch
    np.testing.assert_allclose(model(x[:1])[0], eval_logits[0], rtol=1e-5, atol=1e-5)

    view = nnx.view(model, use_running_average=False)  # train view, model untouched
    assert not view.stem.bn.use_running_average and model.stem.bn.use_running_average


def test_mobilenet_batch_norm_variant():
    model = build_model("mobilenet_v2", 3, width=16, stage_depths=(1,) * 7, rngs=rngs(),
                        batch_norm=True)
    flat = flatten_state(model)
    assert "stage2/0/expand/bn/mean" in flat and "stage2/0/expand/conv/bias" not in flat
    folded = flatten_state(tiny("mobilenet_v2", num_classes=3))
    assert "stem/conv/bias" in folded and not any("/bn/" in name for name in folded)
    assert model(pixels()).shape == (2, 3)


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_model("vgg16", 10, rngs=nnx.Rngs(0))


# --- converters -------------------------------------------------------------------------

def torchvision_names(flat):
    """Our flat resnet names -> torchvision names (the inverse the converter implements)."""
    out = {}
    for name, value in flat.items():
        parts = name.split("/")
        field = {"kernel": "weight", "scale": "weight", "bias": "bias",
                 "mean": "running_mean", "var": "running_var"}[parts[-1]]
        if parts[0] == "head":
            out[f"fc.{parts[-1] if parts[-1] == 'bias' else 'weight'}"] = (
                value.T if value.ndim == 2 else value)
            continue
        if parts[0] == "stem":
            module = "conv1" if parts[1] == "conv" else "bn1"
        else:
            local = ".".join(parts[2:-1]).replace("downsample.conv", "downsample.0")
            local = local.replace("downsample.bn", "downsample.1")
            module = f"layer{parts[0][5:]}.{parts[1]}.{local}"
        out[f"{module}.{field}"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        if field == "running_var":
            out[f"{module}.num_batches_tracked"] = np.array(0)
    return out


def test_torchvision_converter_round_trip_and_errors():
    model = abstract("resnet50", 4, width=8, stage_depths=(1, 1, 1, 1))
    rng = np.random.default_rng(0)
    flat = {"/".join(map(str, path)): rng.normal(size=v.get_value().shape).astype(np.float32)
            for path, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}
    state_dict = torchvision_names(flat)
    assert "layer1.0.downsample.0.weight" in state_dict  # bottleneck widens in stage1
    assert detect_layout(state_dict) == "torchvision"
    converted = torchvision_resnet_to_flat(state_dict)
    assert converted.keys() == flat.keys()
    for name in flat:
        np.testing.assert_array_equal(converted[name], flat[name])
    with pytest.raises(WeightsError, match=re.escape("layer1.0.se.fc.weight")) as error:
        torchvision_resnet_to_flat({**state_dict, "layer1.0.se.fc.weight": np.zeros(1),
                                    "aux.bias": np.zeros(1)})
    assert "aux.bias" in str(error.value)
    with pytest.raises(WeightsError, match="cannot be loaded into mobilenet_v2"):
        to_flat(state_dict, "mobilenet_v2")


def test_tf_mobilenet_converter_names():
    model = abstract("mobilenet_v2", 1001)
    ours = {"/".join(map(str, p)): v.get_value().shape
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tf = {"MobilenetV2/Conv/kernel": ours["stem/conv/kernel"],
          "MobilenetV2/Conv_1/bias": ours["features/conv/bias"],
          "MobilenetV2/Logits/Conv2d_1c_1x1/kernel": (1, 1, 1280, 1001)}
    for i, (t, _, _, stage, index) in enumerate(block_layout()):
        block = "MobilenetV2/expanded_conv" + (f"_{i}" if i else "")
        for part in ("expand", "depthwise", "project") if t != 1 else ("depthwise", "project"):
            tf[f"{block}/{part}/kernel"] = ours[f"{stage}/{index}/{part}/conv/kernel"]
    converted = tf_mobilenet_v2_to_flat({k: np.zeros(s, np.float32) for k, s in tf.items()})
    assert converted["stage4/6/project/conv/kernel"].shape == (1, 1, 576, 96)  # block 12
    assert converted["stage5/0/depthwise/conv/kernel"].shape == (3, 3, 1, 576)  # block 13
    assert converted["head/kernel"].shape == (1280, 1001)
    for name, value in converted.items():
        assert value.shape == ours[name], name
    assert detect_layout(tf) == "tf_mobilenet_v2"
    with pytest.raises(WeightsError, match="MobilenetV2/expanded_conv_17/project/kernel"):
        tf_mobilenet_v2_to_flat({"MobilenetV2/expanded_conv_17/project/kernel": np.zeros(1)})
    with pytest.raises(WeightsError, match="cannot tell the layout"):
        detect_layout(["foo", "bar"])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_table_entry_builds_the_stages_and_recipe_it_lists(name):
    """The table of architectures (plan, no JAX) and the models agree on every entry."""
    entry = architecture(name)
    model = nnx.eval_shape(lambda: build_model(name, 3, rngs=nnx.Rngs(0)))
    assert model.stage_names == (*entry.body_stages(), "head")
    assert model.input_recipe.name == entry.input_recipe
