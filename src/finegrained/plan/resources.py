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

A training rule (train, refit, pretrain: ``distributed=True``) runs as
``resources.train.nodes`` x ``tasks_per_node`` processes joined into one data-parallel run.
``gpu`` then counts a node's GPUs (each task leases ``gpu / tasks_per_node``), ``threads`` and
``mem_mb`` a task's. With more than one task the job is, for the SLURM executor plugin, an
"MPI" job (``mpi``): one allocation of ``nodes`` (``--nodes``) x ``tasks_per_node``
(``--ntasks-per-node``, or ``--ntasks`` with one task per node) tasks of ``cpus_per_task``
CPUs, whose command the plugin runs once, in the batch script, so that the launcher starts
the tasks under ``srun``; GPUs per node by ``--gpus-per-node`` (``slurm_extra``: the plugin's
``--gpus`` counts the job's, which SLURM may spread unevenly over the nodes) or ``--gres``.
Locally the launcher starts the tasks itself. The launcher reads the layout from
``nodes``, ``launch_tasks_per_node`` and ``cpus_per_task`` (the plugin's own
``tasks_per_node`` exists only in its MPI mode, and refuses 1).
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


def task_layout(config: Mapping) -> tuple[int, int]:
    """``(nodes, tasks per node)`` of a training job (``resources.train``)."""
    train = config["resources"]["train"]
    return train["nodes"], train["tasks_per_node"]


def family_threads(config: Mapping, family: str, distributed: bool = False) -> int:
    """A rule's ``threads``: the family's, times the tasks on one machine for a training
    rule (what a local run of several tasks takes of ``--cores``)."""
    threads = config["resources"][family].get("threads", 1)
    return threads * task_layout(config)[1] if distributed else threads


def family_gpus(config: Mapping, family: str) -> int:
    return config["resources"][family].get("gpu", 0)


def rule_resources(config: Mapping, family: str, gpu: int | None = None,
                   environ: Mapping[str, str] = os.environ, *,
                   distributed: bool = False) -> dict[str, Any]:
    """The ``resources:`` of a rule of ``family`` (``gpu`` overrides the family's count):
    mem_mb and runtime (callables of the attempt for the heavy families, so a retry asks for
    more), the GPU request of ``cluster.gpu_request``, ``lease_gpus``, partition, account;
    for a training rule (``distributed``) its task layout (see the module docstring)."""
    requests = config["resources"][family]
    gpu = family_gpus(config, family) if gpu is None else gpu
    nodes, per_node = task_layout(config) if distributed else (1, 1)
    if family in RETRY_SCALED:
        res: dict[str, Any] = {
            "mem_mb": lambda wildcards, attempt: requests["mem_mb"] * per_node * attempt,
            "runtime": lambda wildcards, attempt: requests["runtime"] * attempt}
    else:
        res = {"mem_mb": requests["mem_mb"], "runtime": requests["runtime"]}
    model = requests.get("gpu_model") if gpu else None
    if config["cluster"]["gpu_request"] == "gres":
        if gpu:
            res["gres"] = ":".join(["gpu", *([model] if model else []), str(gpu)])
    elif nodes > 1:
        if gpu:
            res["slurm_extra"] = f"--gpus-per-node={model + ':' if model else ''}{gpu}"
    else:
        res["gpu"] = gpu
        if model:
            res["gpu_model"] = model
    res["lease_gpus"] = gpu // per_node
    if distributed:
        res.update(task_resources(nodes, per_node, requests["threads"], gpu))
    partition = cluster_setting(config, "gpu_partition" if gpu else "cpu_partition",
                                GPU_PARTITION_VARS if gpu else CPU_PARTITION_VARS, environ)
    account = cluster_setting(config, "account", ACCOUNT_VARS, environ)
    if partition:
        res["slurm_partition"] = partition
    if account:
        res["slurm_account"] = account
    return res


def task_resources(nodes: int, per_node: int, threads: int, gpu: int) -> dict[str, Any]:
    """The task layout of a training rule: what the launcher reads (``nodes``,
    ``launch_tasks_per_node``, ``cpus_per_task``) and, with more than one task, what makes
    the SLURM executor plugin submit one allocation of them and leave starting them to the
    job's command (``mpi``; ``tasks_per_node``, else ``tasks``)."""
    res: dict[str, Any] = {"nodes": nodes, "launch_tasks_per_node": per_node,
                           "cpus_per_task": threads}
    if nodes * per_node == 1:
        return res
    res["mpi"] = "srun"
    if per_node > 1:
        res["tasks_per_node"] = per_node
    else:
        res["tasks"] = nodes
        if gpu:
            # The plugin reads `tasks` of a GPU job as --ntasks-per-gpu unless this is set;
            # 0 asks for none.
            res["tasks_per_gpu"] = 0
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
