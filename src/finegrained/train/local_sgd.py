"""Periodic model averaging (local SGD): the parameter-server picture of the lectures on a
device mesh.

Each device of the mesh's ``data`` axis keeps its own copy of the parameters, BatchNorm
statistics and optimizer state, and steps on its own shard of every batch; every
``average_every`` (H) steps the copies are averaged (parameters and statistics; the optimizer
state too with ``average_opt_state``, else each copy keeps its own). H = 1 with averaged
optimizer state is synchronous data parallelism for optimizers linear in the gradient (SGD,
momentum, weight decay, L2-SP), except BatchNorm, whose batch statistics are then each
device's own.

The copies are one state with a leading axis of the device count, split over ``data``
(:func:`stack_copies`); the step is a :func:`jax.shard_map` over that axis, so the same code
runs on forced CPU devices, a multi-GPU box and across processes. The augmentation runs
before it, on the global batch, with the same random draws as a synchronous step.
Validation and exported weights use the mean of the copies (:func:`mean_of_copies`): the
model averaging would give at that step. Checkpoints hold the copies, so a run resumed
mid-period continues with the same copies and the same schedule of averages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from finegrained.errors import ConfigError
from finegrained.train.augment import Lighting
from finegrained.train.sharding import DATA_AXIS, data_sharding, replicated
from finegrained.train.steps import (StepOptions, TrainState, resolve_compute_dtype,
                                     training_view, update_step)

MODES = ("sync", "local_sgd")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How the devices of the data axis train together (config ``train.parallel``)."""

    mode: str                 # 'sync' (one state, gradients all-reduced) | 'local_sgd'
    average_every: int        # H: steps between averages of the copies (local_sgd)
    average_opt_state: bool   # average the optimizer state too, or keep it per copy

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"parallel.mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.average_every, int) or self.average_every < 1:
            raise ConfigError(f"parallel.average_every must be an integer >= 1, got "
                              f"{self.average_every!r}")

    @property
    def local(self) -> bool:
        return self.mode == "local_sgd"

    def communication_rounds(self, step: int) -> int:
        """Parameter exchanges after ``step`` steps: one all-reduce per step in sync mode,
        one average per H steps in local SGD."""
        return step // self.average_every if self.local else step


#: Synchronous data parallelism (the schema's default).
SYNC = Parallel("sync", 1, True)


def _copies(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def stack_copies(state: TrainState, mesh) -> TrainState:
    """One copy of ``state`` per device of the mesh, stacked on a leading axis split over
    ``data`` (every copy starts equal)."""
    n = mesh.devices.size
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), state)
    return jax.device_put(stacked, _copies(mesh))


def place(state: TrainState, mesh) -> TrainState:
    """A host copy of stacked state (a restored checkpoint) back on the mesh."""
    return jax.device_put(state, _copies(mesh))


def _average(tree: Any) -> Any:
    """Mean over the copies (inside shard_map), computed in float32, stored as it was."""
    def mean(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jax.lax.pmean(x.astype(jnp.float32), DATA_AXIS).astype(x.dtype)
    return jax.tree_util.tree_map(mean, tree)


def make_mean_of_copies(mesh) -> Callable[[TrainState], TrainState]:
    """``state -> state``: the mean of the copies, replicated (for validation and export);
    integer leaves (step counts) are the first copy's."""
    def mean(state):
        return jax.tree_util.tree_map(
            lambda x: (jnp.mean(x.astype(jnp.float32), 0).astype(x.dtype)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x[0]), state)
    return jax.jit(mean, out_shardings=replicated(mesh))


def make_local_sgd_step(options: StepOptions, parallel: Parallel, mesh, *,
                        lighting: Lighting | None = None,
                        schedule: optax.Schedule | None = None,
                        donate: bool = False) -> Callable:
    """``train_step(copies, batch, rng) -> (copies, metrics)``, jitted: the views of the
    global batch as a synchronous step makes them, then on every device one update of its
    copy on its shard, and the average of the copies after every H-th step. Metrics are
    the means over the devices (the loss of the global batch)."""
    resolve_compute_dtype(options.compute_dtype)
    every = parallel.average_every

    def local(copies, images, labels, rng):
        own = jax.tree_util.tree_map(lambda x: x[0], copies)
        # each copy rounds (bfloat16 storage) with its own noise
        key = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))
        new, metrics = update_step(own, images, labels, key, options=options,
                                   schedule=schedule)

        def average(state):
            return state.replace(
                params=_average(state.params), stats=_average(state.stats),
                opt_state=(_average(state.opt_state) if parallel.average_opt_state
                           else state.opt_state))

        new = jax.lax.cond(new.step % every == 0, average, lambda state: state, new)
        metrics = jax.tree_util.tree_map(lambda m: jax.lax.pmean(m, DATA_AXIS), metrics)
        return jax.tree_util.tree_map(lambda x: x[None], new), metrics

    spec = P(DATA_AXIS)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()),
                            out_specs=(spec, P()), check_vma=False)

    def step(copies, batch, rng):
        images = training_view(batch["image"], rng, options, lighting)
        return sharded(copies, images, batch["label"], rng)

    kwargs = {"donate_argnums": (0,)} if donate else {}
    return jax.jit(step, in_shardings=(_copies(mesh), data_sharding(mesh), replicated(mesh)),
                   out_shardings=(_copies(mesh), replicated(mesh)), **kwargs)
