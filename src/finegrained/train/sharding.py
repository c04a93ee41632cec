"""Data parallelism, declared: a 1-D mesh with axis ``data``; batches split along their
leading axis, parameters and optimizer state replicated. ``jax.jit`` with these
``NamedSharding``s inserts the gradient all-reduce itself (no pmap, no psum by hand).

With several processes (:mod:`finegrained.distributed`) the mesh spans every process's
devices, and each process supplies only its rows of a global batch (:func:`local_rows`):
the rows that land on its own devices."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from finegrained.errors import ConfigError, Everywhere

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all when None), axis ``data``."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


class BatchSizeError(Everywhere, ConfigError):
    """A global batch the devices of the mesh cannot split evenly (every process meets it)."""


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        processes = len({d.process_index for d in mesh.devices.flat})
        across = f", in {processes} processes" if processes > 1 else ""
        raise BatchSizeError(f"global batch size {batch_size} is not divisible by the {n} "
                             f"devices of the '{DATA_AXIS}' mesh axis{across}; pick a multiple "
                             f"of {n}")


def local_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch of ``batch_size`` that this process feeds: all of them
    in a single process, else the contiguous block its devices hold on the mesh."""
    if jax.process_count() == 1:
        return slice(None)
    check_batch_size(batch_size, mesh)
    index_map = data_sharding(mesh).addressable_devices_indices_map((batch_size,))
    blocks = sorted({(ix[0].start or 0, batch_size if ix[0].stop is None else ix[0].stop)
                     for ix in index_map.values()})
    for (_, stop), (start, _) in zip(blocks, blocks[1:]):
        if stop != start:
            raise ValueError(f"this process's devices hold rows {blocks} of the batch, "
                             f"not one contiguous block; order the mesh by process")
    return slice(blocks[0][0], blocks[-1][1])


def shard_batch(batch: Any, mesh: Mesh, global_size: int | None = None) -> Any:
    """Put every array of ``batch`` (a pytree) on the mesh, split along its leading axis.

    With several processes, ``batch`` holds this process's rows (:func:`local_rows`) of a
    global batch of ``global_size`` rows, and the result is the global array."""
    leaves = jax.tree_util.tree_leaves(batch)
    if leaves:
        sizes = {int(np.shape(x)[0]) for x in leaves}
        if len(sizes) != 1:
            raise ValueError(f"batch arrays disagree on the leading (batch) size: {sorted(sizes)}")
        size = sizes.pop()
        check_batch_size(size if global_size is None else global_size, mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, data_sharding(mesh))
    if global_size is None:
        raise ValueError("with several processes, shard_batch needs the global batch size")
    sharding = data_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_size,) + np.shape(x)[1:]), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree (parameters, optimizer state) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
