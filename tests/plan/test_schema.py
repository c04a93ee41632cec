"""The config loader's checks of the values themselves: finite numbers, views no larger than
the stored crops, configs of a sane size, and errors of a sane length."""

from __future__ import annotations

import math

import pytest
import yaml

from finegrained.errors import ConfigError
from finegrained.plan.schema import MAX_CONFIG_VALUES, validate_config


@pytest.mark.parametrize("config, key", [
    ({"regime_settings": {"linear_probe": {"l2_grid": [math.nan, math.inf]}}},
     "regime_settings.linear_probe.l2_grid.0"),
    ({"dataset": {"val_fraction": math.nan}}, "dataset.val_fraction"),
    ({"evaluation": {"multi_scale_fractions": [0.5, math.nan]}},
     "evaluation.multi_scale_fractions.1"),
    ({"train": {"lr": -math.inf}}, "train.lr"),
    ({"sweep": {"full_finetune": {"lr": [0.01, math.inf]}}}, "sweep.full_finetune.lr.1"),
    ({"systems": {"a": {"precision": {"params": "bfloat16"}, "x": math.nan}}}, "systems.a.x"),
    ({"resources": {"train": {"gpu_memory_fraction": "nan"}}},        # text from --config
     "resources.train.gpu_memory_fraction"),
])
def test_every_number_is_finite_named_by_its_key_path(config, key):
    with pytest.raises(ConfigError, match=f"^{key}: .* is not a finite number"):
        validate_config(config)


def test_a_view_larger_than_the_stored_crops_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match=r"train.image_size 300 is larger than crop.size 40: "
                                          r"every view would be the stored crop upsampled 7.5x"):
        validate_config({"train": {"image_size": 300}, "crop": {"size": 40}})
    with pytest.raises(ConfigError, match="pretrain.image_size 64 is larger than crop.size 48"):
        validate_config({"train": {"image_size": 48}, "crop": {"size": 48},
                         "backbone": {"weights": "pretrain"},
                         "pretrain": {"image_size": 64, "dataset": {"root": "other"}}})
    # the source's view matters only when the backbone is pretrained here
    validate_config({"train": {"image_size": 48}, "crop": {"size": 48}})
    assert validate_config({"train": {"image_size": 300}, "crop": {"size": 40,
                            "allow_upsampling": True}})["train"]["image_size"] == 300


def test_an_alias_bomb_is_refused_at_once_and_a_huge_value_quoted_short():
    levels = [f"&{name} [{', '.join([f'*{below}' if below else '1'] * 9)}]"
              for below, name in zip([None, *"abcdefg"], "abcdefgh")]
    bomb = yaml.safe_load("seeds:\n" + "".join(f"  - {level}\n" for level in levels))
    with pytest.raises(ConfigError, match=f"^seeds: holds more than {MAX_CONFIG_VALUES:,} "):
        validate_config(bomb)
    # under the bound but wrong: the schema's message quotes the value, cut short
    with pytest.raises(ConfigError) as caught:
        validate_config({"seeds": "x" * 1_000_000})
    assert "seeds:" in str(caught.value) and len(str(caught.value)) < 2_000
    assert "more characters]" in str(caught.value)
