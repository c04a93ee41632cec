"""finegrained.plan.resources: what a rule asks the scheduler for and the environment of its job."""

from __future__ import annotations

import copy
import subprocess

import pytest

from finegrained.plan.schema import load_config, validate_config
from finegrained.plan.resources import (device_environment, family_threads, jax_conda_env,
                                        rule_resources, shell_prefix)


@pytest.fixture(scope="module")
def base(repo_root):
    return load_config(repo_root / "config" / "config.yaml")


def _config(base, cluster=None, **train):
    config = copy.deepcopy(base)
    config["cluster"].update(cluster or {})
    config["resources"]["train"].update(train)
    return config


def test_the_gpus_route_asks_for_the_gpu_resource_and_the_model(base):
    res = rule_resources(_config(base, gpu=2, gpu_model="a100"), "train", environ={})
    assert (res["gpu"], res["gpu_model"], res["lease_gpus"]) == (2, "a100", 2)
    assert "gres" not in res
    cpu = rule_resources(_config(base, gpu=2, gpu_model="a100"), "light", environ={})
    assert (cpu["gpu"], cpu["lease_gpus"]) == (0, 0) and "gpu_model" not in cpu


def test_the_gres_route_asks_by_gres_only_and_leases_the_same(base):
    config = _config(base, {"gpu_request": "gres"}, gpu=2, gpu_model="a100")
    res = rule_resources(config, "train", environ={})
    assert res["gres"] == "gpu:a100:2" and res["lease_gpus"] == 2
    assert "gpu" not in res and "gpu_model" not in res          # the executor refuses both
    plain = rule_resources(_config(base, {"gpu_request": "gres"}, gpu=1), "train", environ={})
    assert plain["gres"] == "gpu:1"
    none = rule_resources(config, "train", gpu=0, environ={})
    assert "gres" not in none and none["lease_gpus"] == 0


def test_heavy_families_ask_for_more_on_a_retry(base):
    res = rule_resources(base, "train", environ={})
    requests = base["resources"]["train"]
    assert res["mem_mb"](None, 1) == requests["mem_mb"]
    assert res["mem_mb"](None, 3) == 3 * requests["mem_mb"]
    assert res["runtime"](None, 2) == 2 * requests["runtime"]
    light = rule_resources(base, "light", environ={})
    assert light["mem_mb"] == base["resources"]["light"]["mem_mb"]


def test_partition_and_account_come_from_the_config_else_the_environment(base):
    environ = {"FINEGRAINED_GPU_PARTITION": "gpu-env", "FINEGRAINED_CPU_PARTITION": "cpu-env",
               "SLURM_ACCOUNT": "slurm-acct"}
    gpu = rule_resources(_config(base, gpu=1), "train", environ=environ)
    cpu = rule_resources(_config(base, gpu=1), "light", environ=environ)
    assert (gpu["slurm_partition"], cpu["slurm_partition"]) == ("gpu-env", "cpu-env")
    assert gpu["slurm_account"] == cpu["slurm_account"] == "slurm-acct"
    environ["FINEGRAINED_ACCOUNT"] = "ours"                      # before SLURM_ACCOUNT
    assert rule_resources(base, "light", environ=environ)["slurm_account"] == "ours"
    given = _config(base, {"gpu_partition": "a100", "account": "lab"}, gpu=1)
    res = rule_resources(given, "train", environ=environ)
    assert (res["slurm_partition"], res["slurm_account"]) == ("a100", "lab")
    bare = rule_resources(base, "light", environ={})
    assert "slurm_partition" not in bare and "slurm_account" not in bare


def test_jobs_see_the_device_settings_through_the_shell_prefix(base, tmp_path):
    """The prefix every job's shell runs: strict mode, this checkout first on PYTHONPATH, and
    the launcher's settings, quoted (a value with spaces, quotes and braces arrives whole)."""
    flags = "--xla_gpu_foo=true --bar='{x y}'"
    config = _config(base, allow_cpu=True, xla_flags=flags, gpu_memory_fraction=0.5,
                     compilation_cache=str(tmp_path / "my cache"))
    assert device_environment(config) == {
        "FINEGRAINED_ALLOW_CPU": "1", "FINEGRAINED_GPU_MEM_FRACTION": "0.5",
        "FINEGRAINED_COMPILATION_CACHE": str(tmp_path / "my cache"),
        "FINEGRAINED_XLA_FLAGS": flags}
    prefix = shell_prefix(config, tmp_path / "src dir", tmp_path / "bin")
    # Snakemake formats the prefix like a command: doubled braces become single ones
    script = prefix.replace("{{", "{").replace("}}", "}") + (
        'printf "%s\\n" "$FINEGRAINED_ALLOW_CPU" "$FINEGRAINED_XLA_FLAGS" '
        '"$FINEGRAINED_COMPILATION_CACHE" "${PYTHONPATH%%:*}" "${PATH%%:*}"; false; echo after')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "/elsewhere"})
    assert proc.stdout.splitlines() == ["1", flags, str(tmp_path / "my cache"),
                                        str(tmp_path / "src dir"), str(tmp_path / "bin")]
    assert proc.returncode != 0                                  # set -e: `false` stops it
    assert device_environment(_config(base, allow_cpu=False, compilation_cache=None)) == {
        "FINEGRAINED_ALLOW_CPU": "0"}
    # waiting for a running copy of a job (finegrained.locks) reaches jobs the same way
    assert device_environment(_config(base, allow_cpu=False, compilation_cache=None,
                                      wait_for_lock=True)) == {
        "FINEGRAINED_ALLOW_CPU": "0", "FINEGRAINED_WAIT_FOR_LOCK": "1"}


def test_jax_rules_take_the_cuda_env_only_when_they_ask_for_a_gpu(base):
    assert jax_conda_env(_config(base, gpu=1)) == "../../envs/jax-cuda12.yaml"
    assert jax_conda_env(_config(base, gpu=1), gpu=0) == "../../envs/jax.yaml"
    assert jax_conda_env(_config(base, gpu=0)) == "../../envs/jax.yaml"


def test_a_training_rule_of_one_task_asks_for_what_it_always_did(base):
    res = rule_resources(_config(base, gpu=2), "train", environ={}, distributed=True)
    assert (res["gpu"], res["lease_gpus"], res["mem_mb"](None, 1)) == (2, 2, 32000)
    assert (res["nodes"], res["launch_tasks_per_node"], res["cpus_per_task"]) == (1, 1, 8)
    assert not {"mpi", "tasks", "tasks_per_node", "slurm_extra"} & set(res)
    assert family_threads(_config(base, gpu=2), "train", distributed=True) == 8


def test_tasks_on_one_node_share_its_gpus_one_each(base):
    """One node, four tasks of one GPU: the node's 4 GPUs (`gpu`, which a workstation's
    --resources gpu=4 counts, --gpus=4 under SLURM), a task's memory and threads four
    times, and the plugin's MPI mode: --ntasks-per-node=4, the command run once."""
    config = _config(base, gpu=4, tasks_per_node=4)
    res = rule_resources(config, "train", environ={}, distributed=True)
    assert (res["gpu"], res["lease_gpus"]) == (4, 1)
    assert (res["nodes"], res["launch_tasks_per_node"], res["tasks_per_node"]) == (1, 4, 4)
    assert (res["mpi"], res["cpus_per_task"], res["mem_mb"](None, 2)) == ("srun", 8, 4 * 32000 * 2)
    assert family_threads(config, "train", distributed=True) == 32
    # the feature and evaluation jobs stay one task on the node's GPUs
    features = rule_resources(config, "train", environ={})
    assert (features["gpu"], features["lease_gpus"], features["mem_mb"](None, 1)) == (4, 4, 32000)
    assert not {"nodes", "mpi", "tasks_per_node", "cpus_per_task"} & set(features)
    assert family_threads(config, "train") == 8


def test_several_nodes_ask_for_gpus_per_node(base):
    """--gpus counts a job's GPUs, which SLURM may spread unevenly over the nodes: two nodes
    ask --gpus-per-node (slurm_extra), or --gres, which SLURM counts per node anyway."""
    res = rule_resources(_config(base, gpu=4, gpu_model="a100", nodes=2, tasks_per_node=4),
                         "train", environ={}, distributed=True)
    assert res["slurm_extra"] == "--gpus-per-node=a100:4" and res["lease_gpus"] == 1
    assert not {"gpu", "gpu_model", "gres"} & set(res)
    assert (res["nodes"], res["tasks_per_node"], res["mpi"]) == (2, 4, "srun")
    gres = rule_resources(_config(base, {"gpu_request": "gres"}, gpu=4, nodes=2),
                          "train", environ={}, distributed=True)
    # one task per node: --ntasks=2, not the plugin's reading of `tasks` as tasks per GPU
    assert (gres["gres"], gres["lease_gpus"], gres["tasks"], gres["tasks_per_gpu"]) == (
        "gpu:4", 4, 2, 0)
    assert "tasks_per_node" not in gres and "slurm_extra" not in gres


def test_tasks_on_the_cpu_need_no_gpu_count():
    validate_config({"resources": {"train": {"gpu": 0, "tasks_per_node": 3}}})
