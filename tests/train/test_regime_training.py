"""The transfer-regime machinery on a tiny real ResNet: frozen stages stay bit-identical,
the feature cache equals the online frozen part, the L-BFGS probe, resume after SIGTERM
mid-epoch is bit-identical, a non-finite loss stops the run, and 1 vs 4 devices agree."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax.numpy as jnp
import jax
import numpy as np
import pytest
from flax import nnx

from finegrained.models import build_model, flatten_state
from finegrained.plan import regimes
from finegrained.train.augment import Augmentation, center_crop
from finegrained.train.checkpoint import Checkpointer
from finegrained.train.features import FeatureReader, extract_features
from finegrained.train.loop import NonFinite, Preempted, TIMING_FIELDS, fit
from finegrained.train.precision import FLOAT32, Precision
from finegrained.train.settings import default_settings
from finegrained.train.probe import fit_probe
from helpers.training import coloured_squares, crop_and_flip, write_split

NAMES = ["Red Bird", "Green Bird", "Blue Bird", "Yellow Bird"]
OFF = Augmentation.none()
BASE = default_settings(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0, image_size=32,
                        eval_crop_fraction=0.875, compute_dtype="float32", num_devices=1,
                        log_every_steps=0, weight_decay=1e-4, augment=OFF)


def tiny_resnet(seed: int = 0):
    return build_model("resnet18", 4, width=8, stage_depths=[1, 1, 1, 1], rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train = write_split(root, "train", *coloured_squares(64, size=36, seed=0), NAMES)
    val = write_split(root, "val", *coloured_squares(24, size=36, seed=1), NAMES)
    return train, val


def _groups(freeze_up_to, arch="resnet18", stage_depths=None):
    return regimes.param_groups({"arch": arch, "stage_depths": stage_depths}, {
        "param_groups": [], "freeze_up_to": freeze_up_to, "freeze_stem": False,
        "backbone_lr_mult": 1.0, "layer_decay": None})


def _reader(path):
    from finegrained.data.shards import ShardReader
    return ShardReader(path)


def test_frozen_stages_and_their_batch_norm_stay_bit_identical(splits):
    model = tiny_resnet()
    before = flatten_state(model)
    settings = dataclasses.replace(BASE, epochs=1, augment=crop_and_flip(flip=0.5, brightness=0.2),
                                   param_groups=tuple(map(tuple, _groups("stride8"))), cut="stage2")
    fit(model, _reader(splits[0]), _reader(splits[1]), settings, log_fn=None)
    after = flatten_state(model)
    frozen = [k for k in before if k.split("/")[0] in ("stem", "stage1", "stage2")]
    trained = [k for k in before if k.split("/")[0] in ("stage3", "stage4", "head")]
    assert any(k.endswith("mean") for k in frozen) and any(k.endswith("var") for k in frozen)
    for key in frozen:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    changed = [k for k in trained if not np.array_equal(before[k], after[k])]
    assert set(changed) == set(trained)


def test_cached_partial_finetune_equals_the_online_frozen_part(splits, tmp_path):
    train, val = splits
    for split, index in (("train", train), ("val", val)):
        extract_features(tiny_resnet(), index, tmp_path / split, layers=["stage2:map"],
                         image_size=32, eval_crop_fraction=0.875, dtype="float32")
    groups = tuple(map(tuple, _groups("stride8")))
    cached, online = tiny_resnet(), tiny_resnet()
    a = fit(cached, FeatureReader(tmp_path / "train" / "index.json", "stage2:map"),
            FeatureReader(tmp_path / "val" / "index.json", "stage2:map"),
            dataclasses.replace(BASE, param_groups=groups, start="stage2"), log_fn=None)
    b = fit(online, _reader(train), _reader(val),
            dataclasses.replace(BASE, param_groups=groups, cut="stage2"), log_fn=None)
    for ra, rb in zip(a.history, b.history):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-4)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], abs=1e-4)
        assert ra["val_top1"] == rb["val_top1"]
    fa, fb = flatten_state(cached), flatten_state(online)
    for key in fa:
        np.testing.assert_allclose(fa[key], fb[key], atol=1e-4, err_msg=key)


def test_a_vit_trains_on_cached_tokens_as_on_its_online_frozen_blocks(splits, tmp_path):
    """The boundary of a ViT is its tokens after block k: cached once, the upper blocks
    train on them exactly as with the lower blocks run inside each step, drop path and all
    (its masks are drawn per stage, so both draw the same)."""
    def tiny_vit():
        return build_model("vit_tiny_patch16", 4, width=8, stage_depths=[2], rngs=nnx.Rngs(0),
                           drop_path_rate=0.3)
    for split, index in (("train", splits[0]), ("val", splits[1])):
        extract_features(tiny_vit(), index, tmp_path / split, layers=["block0:map"],
                         image_size=32, eval_crop_fraction=0.875, dtype="float32")
    groups = tuple(map(tuple, _groups("block0", "vit_tiny_patch16", [2])))
    assert groups == (("(stem|block0)/.*", 0.0),)
    cached, online = tiny_vit(), tiny_vit()
    a = fit(cached, FeatureReader(tmp_path / "train" / "index.json", "block0:map"),
            FeatureReader(tmp_path / "val" / "index.json", "block0:map"),
            dataclasses.replace(BASE, param_groups=groups, start="block0", optimizer="adamw",
                                lr=1e-3), log_fn=None)
    b = fit(online, _reader(splits[0]), _reader(splits[1]),
            dataclasses.replace(BASE, param_groups=groups, cut="block0", optimizer="adamw",
                                lr=1e-3), log_fn=None)
    assert FeatureReader(tmp_path / "train" / "index.json", "block0:map").gather(
        np.arange(2)).shape == (2, 1 + 4, 24)                      # class token + 2 x 2 patches
    for ra, rb in zip(a.history, b.history):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-4)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], abs=1e-4)
    fa, fb = flatten_state(cached), flatten_state(online)
    frozen = [k for k in fa if k.startswith(("stem/", "block0/"))]
    assert frozen and all(np.array_equal(fa[k], flatten_state(tiny_vit())[k]) for k in frozen)
    for key in fa:
        np.testing.assert_allclose(fa[key], fb[key], atol=1e-4, err_msg=key)


def test_cached_probe_equals_the_on_the_fly_probe(splits, tmp_path):
    train, val = splits
    model = tiny_resnet(3)
    idx = {}
    for split, index in (("train", train), ("val", val)):
        idx[split] = extract_features(model, index, tmp_path / split, layers=["stage4"],
                                      image_size=32, eval_crop_fraction=0.875, dtype="float16")
    def on_the_fly(index):
        images, labels = _reader(index).load_all()
        x = center_crop(jnp.asarray(images), 32, 0.875)
        return np.asarray(model.pooled_features(x)), labels
    (tx, ty), (vx, vy) = on_the_fly(train), on_the_fly(val)
    ctx, cty = FeatureReader(tmp_path / "train" / "index.json", "stage4").load_all()
    cvx, cvy = FeatureReader(tmp_path / "val" / "index.json", "stage4").load_all()
    np.testing.assert_array_equal(cty, ty)
    np.testing.assert_allclose(np.asarray(ctx, np.float32), tx, rtol=2e-3, atol=2e-3)
    grid = [1e-4, 1e-2]
    p_cache = fit_probe(ctx, cty, cvx, cvy, 4, l2_grid=grid, max_iter=200)
    p_live = fit_probe(tx, ty, vx, vy, 4, l2_grid=grid, max_iter=200)
    assert p_cache["l2"] == p_live["l2"]
    assert p_cache["best"]["val_top1"] == pytest.approx(p_live["best"]["val_top1"], abs=1 / 24)
    logits_c = tx @ p_cache["kernel"] + p_cache["bias"]
    logits_l = tx @ p_live["kernel"] + p_live["bias"]
    assert np.mean(logits_c.argmax(-1) == logits_l.argmax(-1)) > 0.95
    assert p_live["best"]["train_top1"] > 0.5      # chance 0.25


def test_lbfgs_probe_solves_a_separable_problem():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 3
    y = rng.integers(0, 5, 400)
    x = centres[y] + rng.normal(size=(400, 16))
    probe = fit_probe(x[:300], y[:300], x[300:], y[300:], 5, l2_grid=[1e-4, 1.0, 100.0])
    assert probe["best"]["val_top1"] > 0.95
    assert probe["l2"] != 100.0          # a crushing penalty loses on validation
    logits = x[300:] @ probe["kernel"] + probe["bias"]
    assert np.mean(logits.argmax(-1) == y[300:]) == pytest.approx(probe["best"]["val_top1"])


def test_lbfgs_probe_refuses_to_fit_or_write_a_non_finite_head():
    """As SGD training does: NaN features (a damaged cache read unchecked) or a head that
    comes out non-finite stop the probe instead of giving a NaN head at chance accuracy."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 3, 40)
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(NonFinite, match="1 of the training features are NaN or infinite"):
        fit_probe(bad, y, x, y, 3, l2_grid=[0.01])
    with pytest.raises(NonFinite, match="1 of the validation features"):
        fit_probe(x, y, bad, y, 3, l2_grid=[0.01])
    with pytest.raises(NonFinite, match="the head fitted at l2 inf is not finite"):
        fit_probe(x, y, x, y, 3, l2_grid=[float("inf")])


def _comparable(history):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in history]


@pytest.mark.slow(seconds=45)
@pytest.mark.parametrize("precision", [FLOAT32, Precision("bfloat16", "stochastic", "bfloat16")],
                         ids=["float32", "bfloat16-stochastic"])
def test_sigterm_mid_epoch_checkpoints_and_the_rerun_is_bit_identical(splits, tmp_path, precision):
    """Also with bfloat16 storage: the checkpoint keeps the bfloat16 state and the rounding
    noise of a resumed step is the uninterrupted run's (its stream folds in the step)."""
    train, val = splits
    settings = dataclasses.replace(BASE, epochs=2, checkpoint_every_steps=3, log_every_steps=1,
                                   augment=crop_and_flip(flip=0.5, brightness=0.2,
                                                         crop_area=(0.5, 1)),
                                   precision=precision)
    straight = tiny_resnet()
    ref = fit(straight, _reader(train), _reader(val), settings, log_fn=None,
              checkpoint_dir=tmp_path / "a")

    def terminate_at_step_5(line):
        if " step 5/" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = tiny_resnet()
    with pytest.raises(Preempted, match="SIGTERM at epoch 2, step 6"):
        fit(interrupted, _reader(train), _reader(val), settings, log_fn=terminate_at_step_5,
            checkpoint_dir=tmp_path / "b")
    assert Checkpointer(tmp_path / "b").latest_step() == 6      # mid-epoch 2 (4 steps/epoch)
    resumed_model = tiny_resnet()
    lines = []
    resumed = fit(resumed_model, _reader(train), _reader(val), settings, log_fn=lines.append,
                  checkpoint_dir=tmp_path / "b")
    assert "resumed from checkpoint at step 6" in lines[0]
    assert _comparable(resumed.history) == _comparable(ref.history)
    a, b = flatten_state(straight), flatten_state(resumed_model)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in ref.best_weights:
        np.testing.assert_array_equal(ref.best_weights[key], resumed.best_weights[key])


def _finite_checkpoints(directory):
    """Every checkpoint under ``directory``: (step, all its arrays finite, its losses)."""
    ckpt = Checkpointer(directory)
    out = []
    for step in ckpt.manager.all_steps():
        arrays = jax.tree_util.tree_leaves(ckpt.restore_saved(step))
        finite = all(np.all(np.isfinite(a)) for a in arrays if np.issubdtype(a.dtype, np.inexact))
        out.append((step, finite, [loss for loss, _ in ckpt.restore_meta(step)["epoch_metrics"]]))
    return out


def test_a_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(splits, tmp_path):
    train, val = splits
    settings = dataclasses.replace(BASE, lr=1e12, checkpoint_every_steps=1, epochs=3)
    with pytest.raises(NonFinite, match=r"probe/x: non-finite .* at epoch 1, step \d"):
        fit(tiny_resnet(), _reader(train), _reader(val), settings, log_fn=None,
            checkpoint_dir=tmp_path / "ck", label="probe/x")
    saved = _finite_checkpoints(tmp_path / "ck")
    assert saved and saved[-1][0] >= 1                 # the last good checkpoint stays
    assert all(finite and all(np.isfinite(losses)) for _, finite, losses in saved), saved


def test_an_update_that_overflows_is_caught_before_its_checkpoint(splits, tmp_path, monkeypatch):
    """The loss is read before each step's update, so an update that overflows shows in the
    parameters first: here step 2 returns a finite loss and NaN parameters. Its checkpoint
    used to hold them (and the SLURM retry resumed from it); the run now stops before."""
    from finegrained.train import loop

    make = loop.make_train_step

    def make_poisoned(*args, **kwargs):
        step = make(*args, **kwargs)

        def poisoned(state, batch, rng):
            new_state, metrics = step(state, batch, rng)
            if int(new_state.step) == 2:
                new_state = new_state.replace(params=jax.tree_util.tree_map(
                    lambda x: x * np.nan, new_state.params))
            return new_state, metrics
        return poisoned

    monkeypatch.setattr(loop, "make_train_step", make_poisoned)
    train, val = splits
    settings = dataclasses.replace(BASE, checkpoint_every_steps=1, epochs=2)
    with pytest.raises(NonFinite, match=r"full: non-finite parameters after epoch 1, step 2 .*"
                                        r"the last good checkpoint, step 1, is kept"):
        fit(tiny_resnet(), _reader(train), _reader(val), settings, log_fn=None,
            checkpoint_dir=tmp_path / "ck", label="full")
    saved = _finite_checkpoints(tmp_path / "ck")
    assert [step for step, _, _ in saved] == [1] and saved[0][1]
