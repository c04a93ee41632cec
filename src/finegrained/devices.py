"""The devices a job computes on: a job that asks for GPUs runs on GPUs, or stops saying why.

The launcher (:mod:`finegrained.launch`) tells a job what its rule asked for
(``$FINEGRAINED_GPUS``, ``$FINEGRAINED_JOB``, ``$FINEGRAINED_ALLOW_CPU``). Before it loads
any data, the job compares that with the devices JAX found: a rule that asks for a GPU on a
machine whose JAX is the CPU build (or whose GPUs the driver does not show) would otherwise
run, silently, ten to a hundred times slower. ``resources.train.allow_cpu: true`` runs GPU
rules on the CPU on purpose (the log says so).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from finegrained.errors import ConfigError
from finegrained.launch import ALLOW_CPU_VAR, GPUS_VAR, JOB_VAR

INSTALL_HINT = ("install the CUDA build of JAX: `make install GPU=cuda12` (or `pip install -r "
                "envs/requirements-cuda12.lock`)")


def describe(devices: Sequence) -> str:
    """``'1 x cpu (TFRT_CPU_0)'``-style summary of a device list."""
    if not devices:
        return "no device"
    kinds = sorted({f"{d.platform}" for d in devices})
    names = ", ".join(str(d) for d in devices[:4]) + (", ..." if len(devices) > 4 else "")
    return f"{len(devices)} x {'/'.join(kinds)} ({names})"


def check_backend(requested: int, *, allow_cpu: bool = False, job: str = "this job",
                  devices: Sequence | None = None,
                  log: Callable[[str], None] | None = print) -> str:
    """The platform the job will compute on ('gpu', 'cpu', ...). Raises :class:`ConfigError`
    when ``requested`` GPUs were asked for and JAX found fewer (none, with the CPU build),
    unless ``allow_cpu``: then the log says the GPU rule runs on the CPU on purpose."""
    import jax

    devices = list(jax.local_devices() if devices is None else devices)   # this process's
    gpus = [d for d in devices if d.platform in ("gpu", "cuda", "rocm")]
    platform = devices[0].platform if devices else "none"
    if requested <= 0 or len(gpus) >= requested:
        return platform
    found = describe(devices)
    if allow_cpu and not gpus:
        if log:
            log(f"{job}: asks for {requested} GPU(s) but JAX found {found}: running on the CPU "
                f"on purpose (resources.train.allow_cpu: true)")
        return platform
    raise ConfigError(
        f"{job} asks for {requested} GPU(s) (resources.train.gpu: {requested}), but JAX "
        f"{jax.__version__} found {found}; to run it on GPUs, {INSTALL_HINT}, and check that "
        f"nvidia-smi lists the GPUs; to run GPU rules on the CPU on purpose, set "
        f"resources.train.allow_cpu: true (or resources.train.gpu: 0)")


def check_job_devices(log: Callable[[str], None] | None = print) -> str | None:
    """:func:`check_backend` with what the launcher told this job (nothing to check when the
    job was started by hand, without the launcher)."""
    if GPUS_VAR not in os.environ:
        return None
    return check_backend(int(os.environ[GPUS_VAR]),
                         allow_cpu=os.environ.get(ALLOW_CPU_VAR) == "1",
                         job=os.environ.get(JOB_VAR) or "this job", log=log)
