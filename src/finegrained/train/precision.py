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
random stream, ``fold_in(step key, ROUNDING_STREAM)`` (the step key is folded from the seed and
the step), so a run is reproducible and a resumed run rounds as an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from finegrained.errors import ConfigError

PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROUNDINGS = ("nearest", "stochastic")
#: Folded into a step's key for the rounding noise (the augmentation draws
#: ``split(key, 6)`` and ``fold_in(key, 6)``, ``fold_in(key, 7)``: see ``augment``).
ROUNDING_STREAM = 8


@dataclasses.dataclass(frozen=True)
class Precision:
    """How trained parameters and optimizer state are stored (config ``train.precision``)."""

    params: str        # 'float32' | 'bfloat16'
    rounding: str      # 'nearest' | 'stochastic' (of each update, bfloat16 params only)
    opt_state: str     # 'float32' | 'bfloat16'

    def __post_init__(self):
        if self.params not in PARAM_DTYPES or self.opt_state not in PARAM_DTYPES:
            raise ConfigError(f"precision: params and opt_state are float32 or bfloat16, got "
                              f"{self.params!r}, {self.opt_state!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"precision.rounding must be one of {ROUNDINGS}, got "
                              f"{self.rounding!r}")

    @property
    def full(self) -> bool:
        """float32 parameters and state: the plain update, nothing rounded."""
        return self.params == "float32" and self.opt_state == "float32"


#: float32 parameters and optimizer state (the schema's default): no rounding anywhere.
FLOAT32 = Precision("float32", "nearest", "float32")


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


def cast_floats(tree: Any, dtype) -> Any:
    """``tree`` with its floating-point leaves cast to ``dtype`` (others as they are)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def store(params: Any, precision: Precision) -> Any:
    """Parameters as the run stores them (the initial cast rounds to nearest)."""
    return cast_floats(params, PARAM_DTYPES[precision.params])


def apply_updates(params: Any, updates: Any, precision: Precision, key: jax.Array) -> Any:
    """``params + updates`` computed in float32 and stored at ``precision`` (rounded to
    nearest, or stochastically with ``key``: one stream per leaf, its position folded in)."""
    dtype = PARAM_DTYPES[precision.params]
    keys = _keys(key, params)
    return jax.tree_util.tree_map(
        lambda p, u, k: round_to(p.astype(jnp.float32) + u.astype(jnp.float32), dtype,
                                 precision.rounding, k), params, updates, keys)


def with_state_dtype(tx: optax.GradientTransformation,
                     precision: Precision) -> optax.GradientTransformation:
    """``tx`` computing in float32 on float32 gradients and parameters, its state stored as
    ``precision.opt_state`` (bfloat16 state: rounded to nearest; its noise would be the
    optimizer's, not the weights')."""
    dtype = PARAM_DTYPES[precision.opt_state]
    cast = cast_floats

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
