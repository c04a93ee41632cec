"""What each rule asks a scheduler for, and the environment every job runs in, from the
validated config (no JAX: the Snakefile imports it).

A rule belongs to a *family* of ``config.resources`` (``light``, ``data``, ``train``): its
threads, memory and wall time come from there, its GPUs from the train family. How GPUs are
asked for depends on the cluster (``cluster.gpu_request``):

- ``gpus`` (default): the ``gpu`` resource, which ``snakemake --resources gpu=4`` counts on
  a workstation and the SLURM executor turns into ``--gpus`` (with ``gpu_model``:
  ``--gpus=<model>:N``);
- ``gres``: the ``gres`` resource ``gpu[:<model>]:N`` (the executor's ``--gres``), for
  clusters that refuse ``--gpus``; no ``gpu`` resource then (the executor refuses both).

Either way ``lease_gpus`` tells the job's launcher (:mod:`finegrained.launch`) how many GPUs
to lease, so a change of route reruns nothing and ``gpu: 0`` means no GPU in every route.
Partition and account come from ``config.cluster``, else ``$FINEGRAINED_*_PARTITION`` /
``$FINEGRAINED_ACCOUNT`` / ``$SLURM_ACCOUNT``, else the cluster's defaults (left out).
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Mapping

#: Rule families whose failed jobs retry with more memory and time.
RETRY_SCALED = ("data", "train")
CPU_PARTITION_VARS = ("FINEGRAINED_CPU_PARTITION",)
GPU_PARTITION_VARS = ("FINEGRAINED_GPU_PARTITION",)
ACCOUNT_VARS = ("FINEGRAINED_ACCOUNT", "SLURM_ACCOUNT")


def cluster_setting(config: Mapping, key: str, variables, environ: Mapping[str, str] = os.environ):
    """``config.cluster.<key>``, else the first of ``variables`` set, else None."""
    value = config["cluster"][key]
    if value is None:
        value = next((environ[v] for v in variables if environ.get(v)), None)
    return value


def family_threads(config: Mapping, family: str) -> int:
    return config["resources"][family].get("threads", 1)


def family_gpus(config: Mapping, family: str) -> int:
    return config["resources"][family].get("gpu", 0)


def rule_resources(config: Mapping, family: str, gpu: int | None = None,
                   environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The ``resources:`` of a rule of ``family`` (``gpu`` overrides the family's count):
    mem_mb and runtime (callables of the attempt for the heavy families, so a retry asks for
    more), the GPU request of ``cluster.gpu_request``, ``lease_gpus``, partition, account."""
    requests = config["resources"][family]
    gpu = family_gpus(config, family) if gpu is None else gpu
    if family in RETRY_SCALED:
        res: dict[str, Any] = {
            "mem_mb": lambda wildcards, attempt: requests["mem_mb"] * attempt,
            "runtime": lambda wildcards, attempt: requests["runtime"] * attempt}
    else:
        res = {"mem_mb": requests["mem_mb"], "runtime": requests["runtime"]}
    model = requests.get("gpu_model") if gpu else None
    if config["cluster"]["gpu_request"] == "gres":
        if gpu:
            res["gres"] = ":".join(["gpu", *([model] if model else []), str(gpu)])
    else:
        res["gpu"] = gpu
        if model:
            res["gpu_model"] = model
    res["lease_gpus"] = gpu
    partition = cluster_setting(config, "gpu_partition" if gpu else "cpu_partition",
                                GPU_PARTITION_VARS if gpu else CPU_PARTITION_VARS, environ)
    account = cluster_setting(config, "account", ACCOUNT_VARS, environ)
    if partition:
        res["slurm_partition"] = partition
    if account:
        res["slurm_account"] = account
    return res


def device_environment(config: Mapping) -> dict[str, str]:
    """What the device launcher of every JAX job reads besides its GPU count (environment
    variables, so changing them reruns no job): GPU rules on the CPU on purpose, GPU memory
    preallocation, the persistent compilation cache, extra XLA flags, and whether a job
    waits for a running copy of itself (:mod:`finegrained.locks`)."""
    train = config["resources"]["train"]
    env = {"FINEGRAINED_ALLOW_CPU": "1" if train["allow_cpu"] else "0"}
    if train["wait_for_lock"]:
        env["FINEGRAINED_WAIT_FOR_LOCK"] = "1"
    if train["gpu_memory_fraction"]:
        env["FINEGRAINED_GPU_MEM_FRACTION"] = f"{train['gpu_memory_fraction']:g}"
    if train["compilation_cache"]:
        env["FINEGRAINED_COMPILATION_CACHE"] = train["compilation_cache"]
    if train["xla_flags"]:
        env["FINEGRAINED_XLA_FLAGS"] = train["xla_flags"]
    return env


def shell_prefix(config: Mapping, src: str | os.PathLike,
                 python_bin: str | os.PathLike | None) -> str:
    """What every job's shell runs first (Snakemake's ``shell.prefix``): strict mode (the
    prefix replaces Snakemake's own ``set -euo pipefail;``), the Python of the environment
    Snakemake runs in first on PATH (``python_bin``; None inside per-rule conda envs), this
    checkout's library first on PYTHONPATH (conda envs hold only third-party packages), and
    the device launcher's settings (:func:`device_environment`). Formatted like a shell
    command by Snakemake, so braces are doubled."""
    parts = ["set -euo pipefail; "]
    if python_bin is not None:
        parts.append(f"export PATH={shlex.quote(os.fspath(python_bin))}:\"$PATH\"; ")
    parts.append(f"export PYTHONPATH={shlex.quote(os.fspath(src))}"
                 "${PYTHONPATH:+:$PYTHONPATH}; ")
    env = device_environment(config)
    if env:
        parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
                     + "; ")
    return "".join(parts).replace("{", "{{").replace("}", "}}")


def jax_conda_env(config: Mapping, gpu: int | None = None) -> str:
    """The conda env of a JAX rule, relative to workflow/rules/: CUDA JAX when it asks for a
    GPU (``gpu``, default the train family's), CPU JAX otherwise."""
    gpu = family_gpus(config, "train") if gpu is None else gpu
    return "../../envs/jax-cuda12.yaml" if gpu else "../../envs/jax.yaml"
