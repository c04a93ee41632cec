"""Training foundation: learning on a tiny synthetic problem, evaluation coverage, frozen
groups, per-group learning rates, determinism, mixed precision (bf16 used and close to fp32;
fp16 refused), and pretraining end to end."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.train.augment import Augmentation, center_crop
from finegrained.train.loop import TIMING_FIELDS, fit
from finegrained.train.settings import default_settings
from finegrained.train.validation import validate
from finegrained.train.optim import build_optimizer, make_schedule
from finegrained.train.steps import make_eval_metrics_step, make_eval_step, make_train_step
from helpers.training import (TinyNet, coloured_squares, crop_and_flip, optimizer,
                              pretrain_inputs, pretrain_settings_json, step_options,
                              train_state)

SMALL = default_settings(epochs=3, batch_size=32, lr=0.05, schedule="cosine", warmup_epochs=0,
                         weight_decay=1e-4, image_size=20, eval_crop_fraction=1.0,
                         augment=crop_and_flip(crop_area=(0.6, 1.0)), seed=0, num_devices=1,
                         compute_dtype="float32", log_every_steps=0)


def test_learns_a_tiny_problem():
    train = coloured_squares(320, seed=0)
    val = coloured_squares(100, seed=1)
    model = TinyNet(4, rngs=nnx.Rngs(0))
    history = fit(model, train, val, SMALL, log_fn=None).history
    assert len(history) == 3
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], history
    assert history[-1]["train_top1"] > history[0]["train_top1"]
    assert history[-1]["val_top1"] > 0.6, history        # chance is 0.25
    assert history[-1]["val_count"] == 100
    # the trained state went back into the model: its eval-mode predictions on the same
    # centre crops give the last epoch's validation top-1
    images, labels = val
    logits = model(center_crop(jnp.asarray(images), 20, 1.0))
    top1 = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    assert top1 == pytest.approx(history[-1]["val_top1"], abs=1e-6)
    fresh = TinyNet(4, rngs=nnx.Rngs(0))
    assert not np.array_equal(np.asarray(fresh.head.kernel[...]), np.asarray(model.head.kernel[...]))


def test_eval_counts_every_example_once():
    images, labels = coloured_squares(37, seed=3)
    model = TinyNet(4, rngs=nnx.Rngs(1))
    options = step_options(image_size=20, eval_crop_fraction=1.0)
    state = train_state(model, lr=0.1)
    eval_step = make_eval_step(options)
    result = validate(state, (images, labels), make_eval_metrics_step(options),
                      batch_size=8)   # 4 full + 5 of 8
    assert result["count"] == 37
    full = np.asarray(eval_step(state, {"image": images, "label": labels}))
    assert result["top1"] == pytest.approx(np.mean(full.argmax(-1) == labels))
    logp = full - full.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    assert result["loss"] == pytest.approx(-logp[np.arange(37), labels].mean(), rel=1e-4)


def _steps(state, options, n, seed=0):
    step = make_train_step(options)
    images, labels = coloured_squares(16 * n, seed=seed)
    for i in range(n):
        batch = {"image": images[16 * i:16 * (i + 1)], "label": labels[16 * i:16 * (i + 1)]}
        state, metrics = step(state, batch, jax.random.key(i))
    return state, metrics


def test_frozen_group_is_bit_identical_and_has_no_optimizer_state():
    model = TinyNet(4, rngs=nnx.Rngs(2))
    groups = ((r"stem/.*", 0.0), (r"stage1/.*", None))
    state = train_state(model, lr=0.5, weight_decay=0.1, param_groups=groups)
    frozen_before = jax.tree_util.tree_map(np.array, state.frozen)
    trained_before = jax.tree_util.tree_map(np.array, state.params)
    assert set(nnx.to_pure_dict(state.frozen)) == {"stem", "stage1"}
    assert "stem" not in nnx.to_pure_dict(state.params)
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    assert n_opt <= n_trainable + 4   # momentum for trainable leaves only (+ counters)
    state, _ = _steps(state, step_options(image_size=20), 3)
    for a, b in zip(jax.tree_util.tree_leaves(frozen_before),
                    jax.tree_util.tree_leaves(state.frozen)):
        assert np.array_equal(a, np.asarray(b)) and a.tobytes() == np.asarray(b).tobytes()
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree_util.tree_leaves(trained_before), jax.tree_util.tree_leaves(state.params))]
    assert all(moved)
    # stem_bn's own parameters train, so its statistics update in train mode
    assert not np.allclose(np.asarray(state.stats["stem_bn"]["mean"][...]), 0.0)


def test_batch_norm_of_a_frozen_group_keeps_its_running_statistics():
    model = TinyNet(4, rngs=nnx.Rngs(2))
    groups = ((r"stem(_bn)?/.*", 0.0),)
    state = train_state(model, lr=0.5, param_groups=groups)
    state, _ = _steps(state, step_options(image_size=20), 3)
    frozen_bn = state.stats["stem_bn"]
    np.testing.assert_array_equal(np.asarray(frozen_bn["mean"][...]), 0.0)
    np.testing.assert_array_equal(np.asarray(frozen_bn["var"][...]), 1.0)
    assert not np.allclose(np.asarray(state.stats["stage1_bn"]["mean"][...]), 0.0)


def test_lr_multiplier_scales_the_first_sgd_step():
    params = {"head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
              "stem": {"kernel": jnp.ones((3, 3))}}
    tx = build_optimizer(params, schedule=make_schedule(0.1, "constant", 10),
                         settings=optimizer(optimizer="sgd", momentum=0.0),
                         param_groups=[(r"stem/.*", 0.1)])
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    head_move = float(jnp.abs(new["head"]["kernel"] - params["head"]["kernel"]).mean())
    stem_move = float(jnp.abs(new["stem"]["kernel"] - params["stem"]["kernel"]).mean())
    assert head_move == pytest.approx(0.1)
    assert stem_move / head_move == pytest.approx(0.1, rel=1e-5)
    # Through the train step: the first momentum step is -lr * mult * grad, and the first
    # gradient is the same from the same init, so the stem moves exactly 0.1x as far.
    options = step_options(image_size=20, augment=Augmentation.none())
    moves = []
    for groups in ((), ((r"stem/.*", 0.1),)):
        state = train_state(TinyNet(4, rngs=nnx.Rngs(3)), lr=0.1,
                                   schedule="constant", weight_decay=0.0, param_groups=groups)
        new_state, _ = _steps(state, options, 1)
        before, after = nnx.to_pure_dict(state.params), nnx.to_pure_dict(new_state.params)
        moves.append({k: np.asarray(after[k]["kernel"]) - np.asarray(before[k]["kernel"])
                      for k in ("stem", "head")})
    # (two compiled programs: float rounding differs slightly, hence the tolerance)
    scale = np.abs(moves[0]["stem"]).max()
    np.testing.assert_allclose(moves[1]["stem"], 0.1 * moves[0]["stem"], atol=1e-3 * 0.1 * scale)
    np.testing.assert_allclose(moves[1]["head"], moves[0]["head"], rtol=1e-3,
                               atol=1e-3 * np.abs(moves[0]["head"]).max())
    assert np.abs(moves[0]["stem"]).max() > 0


def test_unmatched_group_regex_is_an_error():
    with pytest.raises(ConfigError, match="match no parameter"):
        train_state(TinyNet(4, rngs=nnx.Rngs(0)), lr=0.1,
                           param_groups=[(r"backbone/.*", 0)])


def test_same_seed_same_parameters():
    """Two runs with one seed end bit-identical, and they did train: every parameter and
    statistic moved away from the shared initial values."""
    initial = nnx.to_pure_dict(nnx.state(TinyNet(4, rngs=nnx.Rngs(5))))

    def run():
        model = TinyNet(4, rngs=nnx.Rngs(5))
        fit(model, coloured_squares(64, seed=4), None,
            dataclasses.replace(SMALL, epochs=1, batch_size=16,
                                augment=crop_and_flip(brightness=0.2, scale_jitter=0.2)),
            log_fn=None)
        return nnx.to_pure_dict(nnx.state(model))
    a, b = run(), run()
    for x, y, start in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                           jax.tree_util.tree_leaves(initial)):
        np.testing.assert_array_equal(x, y)
        if np.issubdtype(np.asarray(start).dtype, np.floating):
            assert not np.array_equal(x, start), "fit left a parameter unchanged"


def test_bfloat16_compute_is_used_and_close_to_float32(random_model):
    """bf16 changes the numbers (so compute_dtype is not ignored), but only by bf16
    rounding; parameters and running statistics stay float32 through a bf16 train step."""
    model = random_model("resnet18", 4, width=8, stage_depths=[1, 1, 1, 1], seed=6)
    state = train_state(model, lr=0.05, schedule="constant")
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 4, 8).astype(np.int32)}
    f32, bf16 = (step_options(image_size=32, augment=Augmentation.none(), compute_dtype=d)
                 for d in ("float32", "bfloat16"))
    ref = np.asarray(make_eval_step(f32)(state, batch))
    low = make_eval_step(bf16)(state, batch)
    assert low.dtype == jnp.float32
    # bf16 keeps 8 significant bits (~4e-3 per rounding); through the ten layers of this
    # random network that grows to a few percent of the largest logit. fp32 alone, in a
    # differently fused program, would differ by ~1e-6 at most.
    err = np.abs(np.asarray(low) - ref).max() / np.abs(ref).max()
    assert 1e-3 < err < 0.1, err

    new = {}
    for options in (f32, bf16):
        new[options.compute_dtype], metrics = make_train_step(options)(state, batch,
                                                                       jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))
    for leaf in jax.tree_util.tree_leaves((new["bfloat16"].params, new["bfloat16"].stats)):
        assert leaf.dtype == jnp.float32
    before = jax.tree_util.tree_leaves(state.params)
    step32, step16 = (np.concatenate([(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
        jax.tree_util.tree_leaves(new[d].params), before)]) for d in ("float32", "bfloat16"))
    # Random labels on noise: the batch gradient is a small residual of cancelling
    # per-example gradients, so bf16 rounding moves it by ~20%; its direction stays.
    assert np.linalg.norm(step16 - step32) > 1e-3 * np.linalg.norm(step32)
    cosine = step16 @ step32 / (np.linalg.norm(step16) * np.linalg.norm(step32))
    assert cosine > 0.9, cosine


@pytest.mark.parametrize("make", [make_train_step, make_eval_step])
def test_float16_is_refused(make):
    with pytest.raises(ConfigError, match="use 'bfloat16'"):
        make(step_options(compute_dtype="float16"))
    with pytest.raises(ConfigError, match="compute_dtype must be one of"):
        make(step_options(compute_dtype="float64"))


@pytest.fixture(scope="module")
def pretrain_script():
    from helpers.scripts import load_script
    return load_script("pretrain")


@pytest.mark.slow
def test_pretrain_writes_weights_and_metrics(tmp_path, pretrain_script):
    from finegrained.models import build_model, flatten_state
    from finegrained.models.weights import read_metadata, read_tensors
    names = ["Red Bird", "Green Bird", "Blue Bird", "Yellow Bird"]
    out_w, out_m = tmp_path / "pre" / "weights.safetensors", tmp_path / "pre" / "metrics.json"
    rc = pretrain_script.main([
        "--settings", pretrain_settings_json(), *pretrain_inputs(tmp_path, names),
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--out-weights", str(out_w), "--out-metrics", str(out_m)])
    assert rc == 0
    metrics = json.loads(out_m.read_text())
    assert metrics["num_classes"] == 4 and len(metrics["history"]) == 1
    assert metrics["history"][0]["val_count"] == 10
    assert metrics["train_images_per_second"] > 0 and metrics["wall_seconds"] > 0
    assert not (tmp_path / "ckpt").exists()      # removed after success
    meta = read_metadata(out_w)
    assert meta["arch"] == "resnet18" and meta["source"] == "pretrain"
    assert json.loads(meta["class_names"]) == names and meta["width"] == "4"
    tensors = read_tensors(out_w)
    fresh = build_model("resnet18", 4, width=4, stage_depths=[1, 1, 1, 1], rngs=nnx.Rngs(0))
    expected = flatten_state(fresh)
    assert set(tensors) == set(expected)
    assert all(tensors[k].shape == expected[k].shape for k in expected)


@pytest.mark.slow
def test_pretrain_sets_aside_checkpoints_made_with_other_settings(tmp_path, pretrain_script,
                                                                  monkeypatch, capsys):
    """A pretrain job that failed after training at lr 0.05 leaves its checkpoints; rerun at
    lr 0.01 it trains afresh (the history of a run that never saw them) and says why."""
    from finegrained.train import pretrain
    inputs = pretrain_inputs(tmp_path, ["Red Bird", "Green Bird", "Blue Bird", "Yellow Bird"])
    ckpt = tmp_path / "ckpt"

    def run(lr, checkpoints, name):
        out = tmp_path / name
        rc = pretrain_script.main(["--settings", pretrain_settings_json(lr=lr, epochs=2), *inputs,
                                   "--checkpoint-dir", str(checkpoints),
                                   "--out-weights", str(out / "w.safetensors"),
                                   "--out-metrics", str(out / "m.json")])
        return rc, out / "m.json"

    def crash(*args, **kwargs):
        raise OSError("disk full")
    with monkeypatch.context() as patch:             # trained at lr 0.05, then failed
        patch.setattr(pretrain, "save_weights", crash)
        with pytest.raises(OSError, match="disk full"):
            run(0.05, ckpt, "old")
    assert ckpt.is_dir()
    capsys.readouterr()
    rc, metrics = run(0.01, ckpt, "new")
    assert rc == 0
    log = capsys.readouterr()
    assert "set aside" in log.out + log.err and "lr 0.05 -> 0.01" in log.out + log.err
    aside = list(tmp_path.glob("ckpt.set-aside-*"))
    assert len(aside) == 1
    rc, fresh = run(0.01, tmp_path / "other_ckpt", "fresh")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_FIELDS}  # noqa: E731
                          for r in rows]
    history = strip(json.loads(metrics.read_text())["history"])
    assert [r["epoch"] for r in history] == [1, 2]
    assert history == strip(json.loads(fresh.read_text())["history"])
