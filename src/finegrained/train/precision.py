"""Low-precision training state: parameters (and optionally optimizer state) stored in
bfloat16, each update rounded to nearest or stochastically.

With round-to-nearest, an update smaller than half a bfloat16 ulp of its parameter (2^-9 of
its magnitude) vanishes: late in training, small learning rates times small gradients stop
moving the weights at all. Stochastic rounding rounds up with probability equal to the
distance to the lower neighbour, so each rounding is unbiased (its expectation is the
float32 value) and small updates survive on average (Gupta et al., 2015, "Deep learning
with limited numerical precision"; Zamirai et al., 2020).

The update itself is computed in float32: gradients, optimizer state (kept in float32, or
stored in bfloat16 and widened for the computation) and ``params + updates``; only the
stored result is rounded (:func:`apply_updates`). The rounding noise comes from its own
random stream, ``fold_in(key(seed), ROUNDING_STREAM)`` folded with the step, so a run is
reproducible and a resumed run rounds as an uninterrupted one does.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from finegrained.errors import ConfigError

PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROUNDINGS = ("nearest", "stochastic")
#: Folded into the run's key to give the rounding its own stream (the augmentation uses 1).
ROUNDING_STREAM = 2


def check(precision: Mapping) -> None:
    if precision["params"] not in PARAM_DTYPES or precision["opt_state"] not in PARAM_DTYPES:
        raise ConfigError(f"precision: params and opt_state are float32 or bfloat16, got "
                          f"{precision['params']!r}, {precision['opt_state']!r}")
    if precision["rounding"] not in ROUNDINGS:
        raise ConfigError(f"precision.rounding must be one of {ROUNDINGS}, got "
                          f"{precision['rounding']!r}")


def round_stochastic(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounded up in magnitude with probability (distance to the lower
    neighbour) / (gap between neighbours): unbiased. bfloat16 is float32's upper 16 bits, so
    adding a uniform 16-bit integer to the lower half and truncating does it exactly."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    finite = jnp.isfinite(x)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    return jnp.where(finite, out, x).astype(jnp.bfloat16)


def round_to(x: jax.Array, dtype, rounding: str, key: jax.Array | None) -> jax.Array:
    """``x`` stored as ``dtype``: as it is for float32, else rounded."""
    if dtype == jnp.float32:
        return x.astype(jnp.float32)
    if rounding == "stochastic":
        return round_stochastic(x, key)
    return x.astype(jnp.bfloat16)


def _keys(key: jax.Array, tree: Any) -> Any:
    """One key per leaf of ``tree`` (its position folded in)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, [jax.random.fold_in(key, i)
                                                  for i in range(len(leaves))])


def store(params: Any, precision: Mapping) -> Any:
    """Parameters as the run stores them (initial cast: to nearest)."""
    dtype = PARAM_DTYPES[precision["params"]]
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def apply_updates(params: Any, updates: Any, precision: Mapping, key: jax.Array) -> Any:
    """``params + updates`` computed in float32 and stored at ``precision`` (rounded to
    nearest, or stochastically with ``key``)."""
    dtype = PARAM_DTYPES[precision["params"]]
    keys = _keys(key, params)
    return jax.tree_util.tree_map(
        lambda p, u, k: round_to(p.astype(jnp.float32) + u.astype(jnp.float32), dtype,
                                 precision["rounding"], k), params, updates, keys)


def with_state_dtype(tx: optax.GradientTransformation,
                     precision: Mapping) -> optax.GradientTransformation:
    """``tx`` computing in float32 on float32 gradients and parameters, its state stored as
    ``precision['opt_state']`` (bfloat16 state: rounded to nearest; its noise would be the
    optimizer's, not the weights')."""
    dtype = PARAM_DTYPES[precision["opt_state"]]

    def cast(tree, to):
        return jax.tree_util.tree_map(
            lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(tx.init(cast(params, jnp.float32)), dtype)

    def update(updates, state, params=None):
        updates, state = tx.update(cast(updates, jnp.float32), cast(state, jnp.float32),
                                   None if params is None else cast(params, jnp.float32))
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def nbytes(tree: Any) -> int:
    """Bytes of the arrays of ``tree`` (one copy)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "dtype")))
