"""Linear probe by full-batch L-BFGS: the standard protocol for frozen features.

Multinomial logistic regression ``softmax(x W + b)`` on cached pooled features, minimising
the mean cross-entropy plus ``l2 / 2 * |W|^2`` (the bias is not penalised) with
``optax.lbfgs`` (zoom line search) from zero weights. Every strength of the grid is fitted
on the training features and scored on the validation split; the best by ``select_by``
(:mod:`finegrained.plan.selection`) is kept. Without a validation split (a refit on train +
validation) the grid holds the one strength chosen before. Features are centred and scaled
by the training statistics for conditioning; the returned ``W, b`` act on the raw features, so they drop
into the model's ``head`` Linear as they are. Non-finite features, or a head that comes out
non-finite, stop the fit with :class:`~finegrained.train.loop.NonFinite` (as SGD training
does): no NaN head is ever written.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from finegrained.plan.selection import better
from finegrained.train.loop import NonFinite


def _objective(w_and_b, x, y, l2):
    w, b = w_and_b
    logits = x @ w + b
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(w * w)


def solve(x: jax.Array, y: jax.Array, num_classes: int, l2: float, max_iter: int = 500,
          tol: float = 1e-6) -> tuple[tuple[jax.Array, jax.Array], dict]:
    """Minimise the objective for one ``l2``; ``((W, b), info)`` with iterations and the
    final objective and gradient norm."""
    params = (jnp.zeros((x.shape[1], num_classes), jnp.float32),
              jnp.zeros((num_classes,), jnp.float32))
    fun = lambda p: _objective(p, x, y, l2)   # noqa: E731
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        p, state, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(p, updates), state, optax.tree.norm(grad)

    def cont(carry):
        _, state, gnorm = carry
        k = optax.tree.get(state, "count")
        return (k == 0) | ((k < max_iter) & (gnorm >= tol))

    init = (params, opt.init(params), jnp.asarray(jnp.inf, jnp.float32))
    params, state, gnorm = jax.jit(lambda c: jax.lax.while_loop(cont, step, c))(init)
    info = {"iterations": int(optax.tree.get(state, "count")), "objective": float(fun(params)),
            "grad_norm": float(gnorm)}
    return params, info


def _scores(w, b, x, y) -> tuple[float, float]:
    logits = np.asarray(x @ w + b, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    y = np.asarray(y)
    return (float(np.mean(np.argmax(logits, -1) == y)),
            float(-logp[np.arange(len(y)), y].mean()))


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None,
              val_y: np.ndarray | None, num_classes: int, *, l2_grid: Sequence[float],
              max_iter: int = 500, select_by: str = "val_top1",
              log_fn: Callable[[str], None] | None = None) -> dict:
    """Fit one probe per L2 strength, keep the best on validation (``select_by``).

    Returns ``{"kernel" [D, K], "bias" [K], "l2", "best", "history": [row per strength]}``;
    each row has l2, iterations, objective, train count, train/val top-1 and loss, seconds.
    Without validation data (``val_x`` None) ``l2_grid`` must hold one strength, and
    ``best`` is None.
    """
    if val_x is None and len(l2_grid) != 1:
        raise ValueError(f"without a validation split there is nothing to choose among "
                         f"{list(l2_grid)}: give the one chosen strength")
    log = log_fn or (lambda _: None)
    x = np.asarray(train_x, np.float32)
    for split, values in (("training", x), ("validation", val_x)):
        bad = 0 if values is None else int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise NonFinite(f"linear probe: {bad} of the {split} features are NaN or infinite "
                            f"(a damaged feature cache, or activations beyond float16); no "
                            f"head was fitted")
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = jnp.asarray((x - mean) / std)
    ty = jnp.asarray(train_y, jnp.int32)
    rows, best = [], None
    for i, l2 in enumerate(l2_grid):
        t0 = time.perf_counter()
        (w, b), info = solve(xs, ty, num_classes, float(l2), max_iter)
        train_top1, train_loss = _scores(w, b, xs, train_y)
        row = {"epoch": i + 1, "l2": float(l2), **info, "train_count": int(len(train_y)),
               "train_top1": train_top1, "train_loss": train_loss}
        if val_x is not None:
            vs = (np.asarray(val_x, np.float32) - mean) / std
            val_top1, val_loss = _scores(w, b, vs, val_y)
            row.update(val_top1=val_top1, val_loss=val_loss, val_count=int(len(val_y)))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        log(f"probe l2 {l2:g}: {info['iterations']} iterations, train top-1 {train_top1:.4f}"
            + (f", val top-1 {row['val_top1']:.4f}, val loss {row['val_loss']:.4f}"
               if val_x is not None else ""))
        if best is None or (val_x is not None and better(row, best[0], select_by)):
            best = (row, np.asarray(w), np.asarray(b))
    row, w, b = best
    # Undo the standardisation: x_s W = (x - mean) / std W  =>  W' = W / std, b' = b - mean W'.
    kernel = w / std[:, None]
    bias = b - mean @ kernel
    if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
        raise NonFinite(f"linear probe: the head fitted at l2 {row['l2']:g} is not finite; no "
                        f"weights were written")
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32),
            "l2": row["l2"], "best": row if val_x is not None else None, "history": rows}
