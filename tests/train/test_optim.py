"""Optimizer foundation on the real parameter trees: schedule values, which leaves get
weight decay, label smoothing, two AdamW steps against numpy, and freezing of named groups
(with their BatchNorm statistics) through the train step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.train.augment import Augmentation
from finegrained.train.optim import ADAM_B1, ADAM_B2, build_optimizer, make_schedule, param_names
from finegrained.train.steps import cross_entropy, make_train_step
from helpers.training import optimizer as plain
from helpers.training import step_options, train_state

# Tiny real backbones: the torchvision / TF parameter paths, few blocks, few channels.
MODELS = {
    "resnet18": dict(arch="resnet18", width=8, stage_depths=[1, 1, 1, 1]),
    "mobilenet_v2_bn": dict(arch="mobilenet_v2", width=16, stage_depths=[1] * 7,
                            batch_norm=True),
    "mobilenet_v2": dict(arch="mobilenet_v2", width=16, stage_depths=[1] * 7),  # conv biases
}


@pytest.fixture
def model(random_model):
    return lambda name, seed=0: random_model(seed=seed, **MODELS[name])


def _flat(tree) -> dict[str, np.ndarray]:
    """'/'-joined name -> numpy array, for nnx.State or nested dicts."""
    names = jax.tree_util.tree_leaves(param_names(tree))
    return dict(zip(names, (np.asarray(x) for x in jax.tree_util.tree_leaves(tree))))


# --- schedule -----------------------------------------------------------------------------

def test_cosine_schedule_with_warmup():
    base, total, warmup, end = 0.1, 110, 10, 0.01
    sched = make_schedule(base, "cosine", total, warmup, end_lr_fraction=end)
    value = lambda step: float(sched(step))  # noqa: E731
    assert value(0) == 0.0
    assert value(5) == pytest.approx(base / 2, rel=1e-6)             # linear warm-up
    assert value(warmup) == pytest.approx(base, rel=1e-6)            # peak at warm-up end
    mid = warmup + (total - warmup) // 2                              # half way down the cosine
    assert value(mid) == pytest.approx((base + end * base) / 2, rel=1e-6)
    quarter = warmup + (total - warmup) // 4
    expected = end * base + (base - end * base) * 0.5 * (1 + math.cos(math.pi / 4))
    assert value(quarter) == pytest.approx(expected, rel=1e-6)
    assert value(total) == pytest.approx(end * base, rel=1e-6)       # floor at total_steps
    assert value(total + 50) == pytest.approx(end * base, rel=1e-6)  # and after
    assert make_schedule(base, "cosine", total)(0) == pytest.approx(base)   # no warm-up


def test_constant_schedule_with_and_without_warmup():
    flat = make_schedule(0.3, "constant", 100)
    assert [float(flat(s)) for s in (0, 7, 1000)] == pytest.approx([0.3, 0.3, 0.3])
    warm = make_schedule(0.3, "constant", 100, warmup_steps=10)
    assert [float(warm(s)) for s in (0, 5, 10, 11, 1000)] == pytest.approx(
        [0.0, 0.15, 0.3, 0.3, 0.3])
    with pytest.raises(ConfigError, match="unknown schedule"):
        make_schedule(0.3, "linear", 100)


# --- weight decay -------------------------------------------------------------------------

def _decayed(tx, params) -> dict[str, np.ndarray]:
    """The first update for zero gradients: only weight decay moves anything."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    return _flat(updates)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("optimizer", ["momentum", "adamw"])
def test_weight_decay_applies_to_kernels_only(model, name, optimizer):
    params = nnx.state(model(name), nnx.Param)
    wd = 0.01
    tx = build_optimizer(params, schedule=make_schedule(1.0, "constant", 1),
                         settings=plain(optimizer=optimizer, weight_decay=wd), param_groups=None)
    before, updates = _flat(params), _decayed(tx, params)
    assert set(updates) == set(before)
    kernels = [k for k in before if k.endswith("/kernel")]
    others = [k for k in before if not k.endswith("/kernel")]
    assert kernels and others
    assert all(k.endswith(("/bias", "/scale")) for k in others), others
    if name == "mobilenet_v2":
        assert "stem/conv/bias" in others and "stage1/0/depthwise/conv/bias" in others
    else:
        assert "stem/bn/scale" in others and "stem/bn/bias" in others
    assert "head/bias" in others and "head/kernel" in kernels
    for k in kernels:   # decoupled decay: -lr * wd * param (momentum: first step, no history)
        np.testing.assert_allclose(updates[k], -wd * before[k], rtol=1e-6, atol=1e-12,
                                   err_msg=k)
    for k in others:
        np.testing.assert_array_equal(updates[k], 0.0, err_msg=k)


# --- label smoothing ----------------------------------------------------------------------

def test_label_smoothing_matches_hand_computation():
    logits = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0]], np.float32)
    labels = np.array([0, 2])
    eps, k = 0.2, 4
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.full((2, k), eps / k)
    targets[np.arange(2), labels] += 1.0 - eps
    expected = -(targets * logp).sum(-1)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps),
                               expected, rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                               -logp[np.arange(2), labels], rtol=1e-6)
    # smoothing = (1 - eps) * NLL + eps * mean over classes of -log p
    np.testing.assert_allclose(expected, (1 - eps) * -logp[np.arange(2), labels]
                               + eps * -logp.mean(-1), rtol=1e-6)


# --- AdamW --------------------------------------------------------------------------------

def test_adamw_two_steps_match_numpy():
    rng = np.random.default_rng(0)
    params = {"head": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                       "bias": rng.normal(size=4).astype(np.float32)},
              "stem": {"kernel": rng.normal(size=(2, 2, 3, 2)).astype(np.float32)}}
    grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                                    params) for _ in range(2)]
    lr, wd, eps, stem_mult = 0.01, 0.05, 1e-8, 0.5
    b1, b2 = ADAM_B1, ADAM_B2
    assert (b1, b2) == (0.9, 0.999)
    tx = build_optimizer(params, schedule=make_schedule(lr, "constant", 1),
                         settings=plain(optimizer="adamw", weight_decay=wd),
                         param_groups=[(r"stem/.*", stem_mult)])
    state, current = tx.init(params), params
    expected = {n: p.astype(np.float64) for n, p in _flat(params).items()}
    m = {n: 0.0 for n in expected}
    v = {n: 0.0 for n in expected}
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(g, state, current)
        current = optax.apply_updates(current, updates)
        got = _flat(current)
        for name, grad in _flat(g).items():
            mult = stem_mult if name.startswith("stem/") else 1.0
            m[name] = b1 * m[name] + (1 - b1) * grad
            v[name] = b2 * v[name] + (1 - b2) * grad.astype(np.float64) ** 2
            step = (m[name] / (1 - b1 ** t)) / (np.sqrt(v[name] / (1 - b2 ** t)) + eps)
            if name.endswith("/kernel"):
                step = step + wd * expected[name]   # decoupled weight decay, kernels only
            previous, expected[name] = expected[name], expected[name] - mult * lr * step
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {t}: {name}")
            if t == 1 and name == "head/bias":   # Adam's first step: lr * sign(grad)
                np.testing.assert_allclose(got[name] - previous, -lr * np.sign(grad),
                                           rtol=1e-4)


# --- freezing through the train step -------------------------------------------------------

def _batches(n: int, size: int = 32, classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"image": rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
               "label": rng.integers(0, classes, 8).astype(np.int32)}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2_bn"])
def test_frozen_stem_and_stage1_stay_bit_identical(model, name):
    groups = [(r"(stem|stage1)/.*", 0)]
    state = train_state(model(name, seed=1), lr=0.1, schedule="constant",
                               weight_decay=1e-3, param_groups=groups)
    frozen_names = set(_flat(state.frozen))
    assert frozen_names and all(n.startswith(("stem/", "stage1/")) for n in frozen_names)
    assert not any(n.startswith(("stem/", "stage1/")) for n in _flat(state.params))
    before = {**_flat(state.frozen), **_flat(state.stats), **_flat(state.params)}
    step = make_train_step(step_options(image_size=32, augment=Augmentation.none()))
    for i, batch in enumerate(_batches(2)):
        state, metrics = step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"]))
    after = {**_flat(state.frozen), **_flat(state.stats), **_flat(state.params)}
    assert set(after) == set(before)
    early = [n for n in before if n.startswith(("stem/", "stage1/"))]
    stats = [n for n in early if n.endswith(("/mean", "/var"))]
    assert stats and "stem/bn/mean" in stats   # BatchNorm statistics of the frozen stages
    for n in early:
        assert after[n].tobytes() == before[n].tobytes(), n
    later = [n for n in before if n not in early]
    moved = {n: not np.array_equal(after[n], before[n]) for n in later}
    assert all(moved.values()), [n for n, m in moved.items() if not m]


# --- L2-SP --------------------------------------------------------------------------------

def test_l2_sp_update_equals_the_hand_computation(model):
    """Plain SGD with L2-SP, one step from parameters moved away from where the optimizer
    started: pretrained kernels get -lr (g + alpha (w - w0)), head kernels -lr (g + beta w),
    biases and BatchNorm parameters -lr g; weight_decay is not used on top."""
    lr, alpha, beta = 0.5, 0.3, 0.02
    params = nnx.state(model("resnet18"), nnx.Param)
    tx = build_optimizer(params, schedule=make_schedule(lr, "constant", 1),
                         settings=plain(optimizer="sgd", momentum=0.0, weight_decay=0.1,
                                        regularizer="l2_sp", l2_sp_alpha=alpha,
                                        l2_sp_beta=beta), param_groups=None)
    state = tx.init(params)
    key = jax.random.key(0)
    moved = jax.tree_util.tree_map(
        lambda w: w + jax.random.normal(jax.random.fold_in(key, w.size), w.shape), params)
    grads = jax.tree_util.tree_map(
        lambda w: jax.random.normal(jax.random.fold_in(key, w.size + 1), w.shape), params)
    updates, _ = jax.jit(tx.update)(grads, state, moved)
    w0, w, g, u = _flat(params), _flat(moved), _flat(grads), _flat(updates)
    kernels = [k for k in w0 if k.endswith("/kernel") and not k.startswith("head/")]
    assert kernels and "head/kernel" in w0 and "stem/bn/scale" in w0
    for k in w0:
        if k == "head/kernel":
            expected = -lr * (g[k] + beta * w[k])
        elif k in kernels:
            expected = -lr * (g[k] + alpha * (w[k] - w0[k]))
        else:
            expected = -lr * g[k]
        np.testing.assert_allclose(u[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)


def test_l2_sp_pulls_the_weights_back_toward_the_pretrained_ones(model):
    """Without a gradient, L2-SP shrinks the distance to the starting kernels by (1 - lr
    alpha) per step, while weight decay pulls them toward zero instead."""
    lr, alpha = 0.1, 0.5
    params = nnx.state(model("resnet18"), nnx.Param)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = build_optimizer(params, schedule=make_schedule(lr, "constant", 1),
                         settings=plain(optimizer="momentum", momentum=0.0,
                                        regularizer="l2_sp", l2_sp_alpha=alpha),
                         param_groups=None)
    state = tx.init(params)
    w = jax.tree_util.tree_map(lambda p: p + 1.0, params)      # displaced by 1 everywhere
    step = jax.jit(lambda w, s: tx.update(zeros, s, w))
    for _ in range(3):
        updates, state = step(w, state)
        w = optax.apply_updates(w, updates)
    start, now = _flat(params), _flat(w)
    k = "stage1/0/conv1/kernel"
    np.testing.assert_allclose(now[k] - start[k], (1 - lr * alpha) ** 3, rtol=1e-5)
    np.testing.assert_allclose(now["head/kernel"] - start["head/kernel"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(now["stem/bn/bias"] - start["stem/bn/bias"], 1.0, rtol=1e-6)
