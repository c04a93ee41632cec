"""Several processes, one training run: ``jax.distributed`` from the environment.

One process per node (or per GPU) under ``srun --ntasks N``: each process sees its own
devices, :func:`initialize` joins them, and ``jax.devices()`` is then every device of every
process, so the loop's 1-D ``data`` mesh spans all of them. Each process gathers and puts
only its own rows of every global batch (:func:`finegrained.train.sharding.local_rows`),
parameters stay replicated, and XLA all-reduces the gradients across processes as it does
across the devices of one. Every process computes the same replicated state; only process 0
writes files (orbax's checkpoint saves are collective: every process calls them, the primary
host writes).

Where the processes come from, first match wins:

- ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``: explicit, as :mod:`finegrained.launch` starts the tasks of a training
  job on one machine (``resources.train.tasks_per_node``), or a launcher of one's own;
- SLURM with more than one task in the step (``SLURM_NTASKS`` > 1 inside ``srun``, as the
  launcher starts them in an allocation): jax's SLURM cluster detection (coordinator on the
  step's first node, port from the job id; ``JAX_LOCAL_DEVICE_IDS`` from the launcher keeps
  the GPUs a task leased);
- otherwise a single process, and nothing here changes anything.

What one process does for all (a lock, claiming the checkpoint folder) goes through
:func:`on_main`: the others wait for it and stop quietly when it failed (:class:`PeerFailed`).
On the CPU the cross-process collectives are gloo's (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, TypeVar

import jax

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
AGREE_TIMEOUT_MS = 10 * 60 * 1000
_own_previous_key: str | None = None
T = TypeVar("T")


def launch_settings(env: Mapping[str, str] | None = None) -> dict | None:
    """``jax.distributed.initialize`` keyword arguments for this environment, ``{}`` for
    SLURM's auto-detection, ``None`` for a single process."""
    env = os.environ if env is None else env
    if env.get(COORDINATOR_ENV):
        missing = [k for k in (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if not env.get(k)]
        if missing:
            raise ValueError(f"{COORDINATOR_ENV} is set but {', '.join(missing)} is not")
        return {"coordinator_address": env[COORDINATOR_ENV],
                "num_processes": int(env[NUM_PROCESSES_ENV]),
                "process_id": int(env[PROCESS_ID_ENV])}
    # SLURM_STEP_ID: inside an srun step, where every task runs this same program (a batch
    # script's own shell has SLURM_NTASKS but is one process).
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return {}
    return None


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Join the processes of this run (before any other JAX call); True when there are
    several. A second call is a no-op."""
    settings = launch_settings(env)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    return True


def is_initialized() -> bool:
    """Whether this process has joined others (:func:`initialize` did)."""
    return jax.distributed.is_initialized()


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0, the one that writes outputs and logs (True in a single process)."""
    return jax.process_index() == 0


def _client():
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op in a single process).
    ``name`` must be unique for the run."""
    if is_multiprocess():
        _client().wait_at_barrier(f"finegrained/{name}", AGREE_TIMEOUT_MS)


class PeerFailed(RuntimeError):
    """What the other processes raise when a step process 0 takes alone failed there (the
    job's lock, its checkpoint folder): process 0 prints the error, they end quietly."""


#: Seconds of each wait of :func:`on_main`'s other processes (they wait again until told).
_HEAR_POLL_MS = 60 * 1000


def on_main(name: str, step: Callable[[], T]) -> T | None:
    """Run ``step`` in process 0 only and tell the others how it went: its result in process
    0 (its exception raised there), None in the others, which wait for it as long as it
    takes (a lock it waits for) and raise :class:`PeerFailed` when it failed. ``name`` must be
    unique for the run. In a single process: ``step()``."""
    if not is_multiprocess():
        return step()
    client, key = _client(), f"finegrained/main/{name}"
    if is_main_process():
        try:
            result = step()
        except BaseException:
            client.key_value_set(key, "failed")
            raise
        client.key_value_set(key, "ok")
        return result
    while True:
        try:
            outcome = client.blocking_key_value_get(key, _HEAR_POLL_MS)
            break
        except jax.errors.JaxRuntimeError as exc:
            if "DEADLINE_EXCEEDED" not in str(exc):
                raise
    if outcome != "ok":
        raise PeerFailed(f"process 0 of {jax.process_count()} failed at {name} (its error is "
                         f"in the log)")
    return None


def any_process(flag: bool, name: str) -> bool:
    """True when ``flag`` is True on any process; ``flag`` itself in a single process.
    Host-only (the coordination service's key-value store, no device work), so it does not
    wait for queued steps. ``name`` must be unique for the run (e.g. tagged with the step)."""
    global _own_previous_key
    if not is_multiprocess():
        return flag
    client, key = _client(), f"finegrained/any/{name}"
    own = f"{key}/{jax.process_index()}"
    client.key_value_set(own, "1" if flag else "0")
    client.wait_at_barrier(f"{key}/barrier", AGREE_TIMEOUT_MS)
    answer = any(value == "1" for _, value in client.key_value_dir_get(f"{key}/"))
    # Every process has read the previous round (it reached this barrier after), so its
    # key can go: the store holds one round per process, not one per step of the run.
    if _own_previous_key is not None:
        client.key_value_delete(_own_previous_key)
    _own_previous_key = own
    return answer
