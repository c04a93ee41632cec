"""From config to job settings: presets, overrides, freeze points, parameter groups, variants,
and every TrainSettings field named and defaulted by the schema alone."""

from __future__ import annotations

import dataclasses
import json

import pytest

from finegrained.errors import ConfigError
from finegrained.plan import archs, jobs, paths, regimes, variants
from finegrained.plan.schema import load_config, load_schema
from finegrained.train.local_sgd import SYNC, Parallel
from finegrained.train.precision import FLOAT32, Precision
from finegrained.train.settings import TrainSettings, default_settings
from finegrained.train.steps import StepOptions


def _config(**overrides):
    return load_config(overrides=overrides)


def test_every_regime_resolves_to_complete_train_configs():
    config = _config()
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    for name in config["regimes"]:
        settings = regimes.job_settings(config, name)
        json.dumps(settings)     # a JSON the job reads
        for phase in settings["phases"]:
            if phase["kind"] == "sgd":
                # every field is set from config: nothing is left to the dataclass defaults
                assert set(phase["train_settings"]) == fields, name
                TrainSettings.from_dict(phase["train_settings"])
    assert set(regimes.pretrain_settings(config)["train_settings"]) == fields


def test_the_schema_is_the_only_home_of_a_default():
    """TrainSettings' fields are the schema's recipe and run keys under their own names
    (``lr`` is ``lr`` end to end), none has a default of its own, and default_settings gives
    the schema's values; the variant keys are the seed, the system and the sweep's keys."""
    schema = load_schema()
    recipe = schema["$defs"]["recipe"]["properties"]
    run = schema["$defs"]["run"]["properties"]
    fields = dataclasses.fields(TrainSettings)
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in (*fields, *dataclasses.fields(StepOptions)))
    assert {f.name for f in fields} == (set(recipe) | set(run) | {"start", "cut", "select_by"}) - {
        "keep_checkpoints"}
    settings = default_settings()
    for key, prop in [*recipe.items(), *run.items()]:
        if key not in ("augment", "keep_checkpoints", "param_groups", "precision", "parallel"):
            assert getattr(settings, key) == prop["default"], key
    # the precision's defaults are the schema's, and FLOAT32 (the step's "off") is them
    assert settings.precision == FLOAT32 == Precision(**{
        k: p["default"] for k, p in run["precision"]["properties"].items()})
    assert settings.parallel == SYNC == Parallel(**{
        k: p["default"] for k, p in run["parallel"]["properties"].items()})
    augment = schema["$defs"]["augment"]["properties"]
    for key, prop in augment.items():
        value = getattr(settings.augment, key)
        assert (list(value) if isinstance(value, tuple) else value) == prop["default"], key
    assert variants.VARIANT_KEYS == ("seed", "system", *schema["properties"]["sweep"][
        "additionalProperties"]["properties"])
    # the regime names: one list, the schema's, for `regimes:`, its default and `sweep:`
    names = schema["properties"]["regimes"]
    assert regimes.REGIMES == tuple(names["items"]["enum"]) == tuple(names["default"]) == \
        tuple(schema["properties"]["sweep"]["propertyNames"]["enum"]) == \
        tuple(schema["properties"]["regime_settings"]["properties"])


def test_a_partial_override_keeps_the_rest_of_the_preset():
    config = _config(regime_settings={"scratch": {"epochs": 3}})
    scratch = config["regime_settings"]["scratch"]
    assert scratch["epochs"] == 3 and scratch["init"] == "random" and scratch["lr"] == 0.1
    probe = config["regime_settings"]["linear_probe"]
    assert probe["solver"] == "lbfgs" and probe["augment"]["flip"] == 0.0


def _backbone(arch):
    return {"arch": arch, "stage_depths": None}


def test_freeze_up_to_means_the_same_resolution_in_every_architecture():
    assert regimes.frozen_stages(_backbone("resnet50"), "stride16") == [
        "stem", "stage1", "stage2", "stage3"]
    assert regimes.frozen_stages(_backbone("mobilenet_v2"), "stride16") == [
        "stem", "stage1", "stage2", "stage3", "stage4"]
    for arch in ("resnet18", "mobilenet_v2"):
        strides = archs.architecture(arch).stages(None)
        for k in (4, 8, 16, 32):
            cut = regimes.cut_stage(_backbone(arch), f"stride{k}")
            assert strides[cut] == k, (arch, k, cut)
    assert regimes.cut_stage(_backbone("resnet50"), "stride32") == "stage4"
    assert regimes.cut_stage(_backbone("mobilenet_v2"), "stride32") == "features"
    with pytest.raises(ConfigError, match="no stage of resnet18"):
        regimes.frozen_stages(_backbone("resnet18"), "stride2")


def test_the_cut_point_is_also_the_freeze_regex_and_the_cache_layer():
    config = _config(backbone={"arch": "resnet18"})
    partial = regimes.job_settings(config, "partial_finetune")["phases"][0]
    assert partial["input"] == {"kind": "cache", "layer": "stage3:map", "start": "stage3",
                                "cut": None}
    assert partial["train_settings"]["param_groups"] == [["(stem|stage1|stage2|stage3)/.*", 0.0]]
    # with augmentation the frozen part runs online, cut off from the gradient
    augmented = _config(backbone={"arch": "resnet18"},
                        regime_settings={"partial_finetune": {"augment": {"flip": 0.5}}})
    phase = regimes.job_settings(augmented, "partial_finetune")["phases"][0]
    assert phase["input"] == {"kind": "pixels", "start": None, "cut": "stage3"}
    assert regimes.cached_layers(config, "partial_finetune") == ["stage3:map"]
    assert regimes.cached_layers(augmented, "partial_finetune") == []
    assert paths.cache_index("train", "stage3:map") == "train/stage3.map/index.json"
    assert paths.cache_index("val", "stage4") == "val/index.json"
    # the pooled cache is the same whichever regimes are listed
    assert jobs.features(config, "train")["layers"] == ["stage3", "stage4"]
    assert jobs.features(_config(backbone={"arch": "resnet18"},
                                            regimes=["linear_probe"]), "train") \
        == jobs.features(config, "train")
    assert jobs.features(config, "val", "stage3:map")["layers"] == ["stage3:map"]


def test_full_finetune_has_three_tiers():
    config = _config(regime_settings={"full_finetune": {"freeze_stem": True,
                                                        "backbone_lr_mult": 0.01}})
    groups = regimes.job_settings(config, "full_finetune")["phases"][0]["train_settings"][
        "param_groups"]
    assert groups == [["(stem)/.*", 0.0], ["head/.*", 1.0], [".*", 0.01]]


def test_two_stage_starts_from_the_probe_then_trains_everything_in_tiers():
    """The default two-stage recipe is LP-FT: the probe job's head (same replicate seed, its
    config hash named so a changed probe changes this job), then every layer at the seeds'
    tiers (new head at lr, pretrained at lr x 0.1)."""
    config = _config()
    head, main = regimes.job_settings(config, "two_stage")["phases"]
    assert head == {"name": "head", "kind": "probe_head",
                    "input": {"kind": "probe", "start": None, "cut": None},
                    "probe": {"regime": "linear_probe", "variant": "",
                              "config_hash": regimes.job_settings(config, "linear_probe")[
                                  "config_hash"]}}
    assert main["train_settings"]["lr"] == 0.01
    assert main["train_settings"]["param_groups"] == [["head/.*", 1.0], [".*", 0.1]]
    assert regimes.job_settings(config, "two_stage", "+seed=2+lr=0.003")["phases"][0][
        "probe"]["variant"] == "+seed=2"
    probe_changed = _config(regime_settings={"linear_probe": {"l2_grid": [0.1]}})
    assert (regimes.job_settings(probe_changed, "two_stage")["config_hash"]
            != regimes.job_settings(config, "two_stage")["config_hash"])


def test_two_stage_from_sgd_keeps_the_head_only_sgd_phase():
    """head_from: sgd resolves to the head-only SGD phase (head_lr, head_patience,
    head_epochs, the whole backbone frozen) and then the regime's own phase, with fresh
    streams, as before LP-FT existed."""
    config = _config(regime_settings={"two_stage": {"head_from": "sgd", "lr": 0.001,
                                                    "backbone_lr_mult": 1.0}})
    head, main = regimes.job_settings(config, "two_stage")["phases"]
    assert head["name"] == "head" and main["name"] == "main" and head["kind"] == "sgd"
    assert head["train_settings"]["lr"] == 0.1 and head["train_settings"]["patience"] == 2
    assert head["train_settings"]["epochs"] == 10
    assert head["train_settings"]["param_groups"] == [
        ["(stem|stage1|stage2|stage3|stage4)/.*", 0.0]]
    assert main["train_settings"]["param_groups"] == []       # all layers at lr
    assert main["train_settings"]["lr"] == 0.001
    assert head["train_settings"]["seed"] != main["train_settings"]["seed"]


def test_recipes_that_cannot_hold_are_refused():
    with pytest.raises(ConfigError, match="l2_sp pulls the weights toward the pretrained"):
        regimes.job_settings(_config(regime_settings={"scratch": {"regularizer": "l2_sp"}}),
                             "scratch")
    with pytest.raises(ConfigError, match="pretrain: regularizer l2_sp"):
        regimes.pretrain_settings(_config(pretrain={"regularizer": "l2_sp"}))
    with pytest.raises(ConfigError, match="head_from linear_probe needs a pretrained regime"):
        regimes.job_settings(_config(regime_settings={"scratch": {"head_from": "linear_probe"}}),
                             "scratch")
    with pytest.raises(ConfigError, match="freeze_up_to: stride32"):
        regimes.job_settings(_config(regime_settings={"linear_probe": {
            "solver": "sgd", "freeze_up_to": "stride16"}}), "two_stage")
    l2sp = regimes.job_settings(_config(regime_settings={"full_finetune": {
        "regularizer": "l2_sp", "l2_sp_alpha": 0.5}}), "full_finetune")
    assert l2sp["phases"][0]["train_settings"]["regularizer"] == "l2_sp"
    assert l2sp["phases"][0]["train_settings"]["l2_sp_alpha"] == 0.5


def test_select_by_reaches_every_choice():
    config = _config(protocol={"select_by": "val_loss"})
    for name in config["regimes"]:
        settings = regimes.job_settings(config, name)
        assert settings["select_by"] == "val_loss"
        for phase in settings["phases"]:
            if phase["kind"] == "sgd":
                assert phase["train_settings"]["select_by"] == "val_loss"
            if phase["kind"] == "lbfgs":
                assert phase["select_by"] == "val_loss"
    assert regimes.pretrain_settings(config)["train_settings"]["select_by"] == "val_loss"


def test_probe_is_lbfgs_on_the_last_stage_pooled():
    phase = regimes.job_settings(_config(), "linear_probe")["phases"][0]
    assert phase["kind"] == "lbfgs" and phase["input"]["layer"] == "stage4"
    bad = _config(regime_settings={"linear_probe": {"augment": {"flip": 0.5}}})
    with pytest.raises(ConfigError, match="lbfgs needs"):
        regimes.job_settings(bad, "linear_probe")


def test_variants_override_one_job():
    config = _config()
    base = regimes.job_settings(config, "full_finetune")
    v = regimes.job_settings(config, "full_finetune", "+seed=2+lr=0.003")
    assert v["seed"] == 2 and v["phases"][0]["train_settings"]["lr"] == 0.003
    assert v["config_hash"] != base["config_hash"]
    assert variants.parse_variant("") == {}
    with pytest.raises(ConfigError, match="not one of"):
        variants.parse_variant("+arch=resnet50")
    with pytest.raises(ConfigError, match="form"):
        variants.parse_variant("seed=1")


def test_settings_hash_is_stable_and_sensitive():
    config = _config()
    a = regimes.job_settings(config, "scratch")
    assert a["config_hash"] == regimes.job_settings(_config(), "scratch")["config_hash"]
    changed = _config(train={"image_size": 192})
    assert regimes.job_settings(changed, "scratch")["config_hash"] != a["config_hash"]



def test_a_vit_takes_the_vit_presets_under_the_configs_own_keys():
    """For a vit_* backbone each regime's preset becomes the schema's ViT preset (AdamW,
    layer-wise decay, MAE's partial fine-tuning), and a key the config sets still wins."""
    config = _config(backbone={"arch": "vit_base_patch16"},
                     regime_settings={"full_finetune": {"lr": 0.001}})
    full = config["regime_settings"]["full_finetune"]
    assert (full["optimizer"], full["lr"], full["layer_decay"], full["weight_decay"]) == (
        "adamw", 0.001, 0.65, 0.05)
    assert full["epochs"] == 30                          # the regime's own preset below
    assert config["regime_settings"]["partial_finetune"]["freeze_up_to"] == "block-5"
    assert config["regime_settings"]["linear_probe"]["solver"] == "lbfgs"
    cnn = _config()["regime_settings"]["full_finetune"]
    assert cnn["optimizer"] == "momentum" and cnn["layer_decay"] is None


def test_layer_decay_gives_each_trained_stage_its_rate_from_the_top():
    config = _config(backbone={"arch": "vit_small_patch14", "stage_depths": [3]},
                     regime_settings={"partial_finetune": {"freeze_up_to": "block-2",
                                                           "layer_decay": 0.5}})
    full = regimes.job_settings(config, "full_finetune")["phases"][0]["train_settings"]
    assert full["param_groups"] == [["stem/.*", 0.65 ** 4], ["block0/.*", 0.65 ** 3],
                                    ["block1/.*", 0.65 ** 2], ["block2/.*", 0.65],
                                    ["norm/.*", 1.0]]
    partial = regimes.job_settings(config, "partial_finetune")["phases"][0]
    assert partial["train_settings"]["param_groups"] == [
        ["(stem|block0|block1)/.*", 0.0], ["block2/.*", 0.5], ["norm/.*", 1.0]]
    assert partial["input"]["layer"] == "block1:map"     # the tokens after the frozen part


def test_relative_blocks_count_from_the_top_and_are_refused_past_the_depth():
    vit = archs.architecture("vit_tiny_patch16")
    assert vit.frozen_stages("block-1", [4]) == ["stem", "block0", "block1", "block2", "block3"]
    assert vit.frozen_stages("block-4", [4]) == ["stem", "block0"]
    assert vit.frozen_stages("block1") == ["stem", "block0", "block1"]
    assert vit.frozen_stages("stride16") == vit.body_stages()        # the whole backbone
    with pytest.raises(ConfigError, match="'block-5' is not a choice of vit_tiny_patch16"):
        _config(backbone={"arch": "vit_tiny_patch16", "stage_depths": [4]},
                regime_settings={"partial_finetune": {"freeze_up_to": "block-5"}})
    with pytest.raises(ConfigError, match="'block1' is not a choice of resnet50"):
        _config(regime_settings={"partial_finetune": {"freeze_up_to": "block1"}})
