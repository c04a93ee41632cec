"""Running the workflow as users run it: any Snakemake, jobs on Snakemake's interpreter,
resources per rule family, the SLURM profile and the pinned conda envs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
#: The launcher's task layout of a training rule run as one task (the demo's 2 threads).
ONE_TASK = " --nodes 1 --tasks-per-node 1 --cpus-per-task 2"

# Runs Snakemake with JAX (and friends) unimportable and without the pip-installed
# finegrained: the Snakefile must find the library in src/ on its own.
PLAIN_SNAKEMAKE = """
import importlib.abc, sys
from pathlib import Path
BLOCKED = {"jax", "jaxlib", "flax", "optax", "orbax"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not importable here")
sys.meta_path.insert(0, Block())
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "finegrained").is_dir()]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.argv = ["snakemake", *sys.argv[1:]]
from snakemake.cli import main
main()
"""


def _run(args, cwd, env=None, plain=False):
    command = [sys.executable, "-c", PLAIN_SNAKEMAKE] if plain else [sys.executable, "-m", "snakemake"]
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([*command, "-s", str(REPO / "Snakefile"), *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _demo(tmp_path, *extra_configs, **overrides):
    files = [str(REPO / "config" / "demo.yaml")]
    for i, config in enumerate(extra_configs):
        path = tmp_path / f"extra{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        files.append(str(path))
    return ["--configfile", *files, "--cores", "1", "-d", str(tmp_path / "run")]


def _job(dry_run: str, rule: str) -> str:
    """The first job block of ``rule`` in a dry run's output."""
    match = re.search(rf"^(local)?rule {rule}:\n(.*?)\n\n", dry_run, re.S | re.M)
    assert match, f"no {rule} job in:\n{dry_run}"
    return match.group(2)


def test_the_snakefile_loads_without_jax_or_the_installed_package(tmp_path):
    """With JAX unimportable and no installed finegrained, the whole demo DAG is planned:
    every job of every rule, each with its resolved settings."""
    out = _run([*_demo(tmp_path), "-n", "-p", "all"], cwd=tmp_path, plain=True)
    stats = out.split("Job stats:")[1].split("\n\n")[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", stats, re.M))
    assert counts == {"demo_dataset": "2", "manifests": "2", "crop_shard": "8",
                      "shard_index": "5", "channel_stats": "2", "pretrain": "1",
                      "init_target_model": "1", "features": "2", "feature_map": "2",
                      "train_regime": "5", "evaluate_regime": "5", "summarize": "1",
                      "report_results": "1", "report_examples": "1", "all": "1",
                      "total": "39"}, counts
    assert len(re.findall(rf"finegrained.launch --gpus 0{ONE_TASK} -- python \S+/train.py",
                          out)) == 5
    assert '"regime": "two_stage"' in out and '"phases": [' in out


def test_jobs_run_with_snakemakes_python_whatever_is_first_on_path(tmp_path):
    # A PATH whose python (if any) lacks the project's packages, as a shell outside the venv.
    _run([*_demo(tmp_path), "results/demo/demo_data/target/images.txt"], cwd=tmp_path,
         env={"PATH": "/usr/bin:/bin"})
    assert (tmp_path / "run/results/demo/demo_data/target/images.txt").stat().st_size > 0


def test_resources_come_from_the_rule_family_and_the_cluster_settings(tmp_path):
    config = {"resources": {"train": {"gpu": 1, "gpu_model": "a100", "runtime": 60,
                                      "gpu_memory_fraction": 0.45}},
              "cluster": {"gpu_partition": "gpuq"}}
    out = _run([*_demo(tmp_path, config), "-n", "-p", "all"], cwd=tmp_path,
               env={"FINEGRAINED_CPU_PARTITION": "short", "FINEGRAINED_ACCOUNT": "birds"})
    train = _job(out, "train_regime")
    for resource in ("gpu=1", "gpu_model=a100", "lease_gpus=1", "runtime=60",
                     "slurm_partition=gpuq", "slurm_account=birds", "mem_mb=8000"):
        assert resource in train, train
    assert re.search(rf"python -m finegrained.launch --gpus 1{ONE_TASK} -- python \S+/train.py",
                     train)
    crop = _job(out, "crop_shard")
    assert "slurm_partition=short" in crop and "gpu=0" in crop and "gpu_model" not in crop
    init = _job(out, "init_target_model")
    assert "gpu=0" in init and "slurm_partition=short" in init
    assert re.search(r"--gpus 0 -- python \S+/init_model.py", init)
    # Light rules run on the submitting node.
    assert "localrules" not in out and re.search(r"^(local)?rule shard_index:", out, re.M)
    # The gres route: the GPU request becomes --gres (never beside a gpu resource).
    gres = _run([*_demo(tmp_path, {**config, "cluster": {"gpu_request": "gres"}}), "-n", "-p",
                 "all"], cwd=tmp_path)
    train = _job(gres, "train_regime")
    assert "gres=gpu:a100:1" in train and "lease_gpus=1" in train
    assert not re.search(r"\bgpu=|gpu_model=", train), train
    assert "gres=" not in _job(gres, "crop_shard")


def _sbatch(resources: dict, threads: int) -> str:
    """The sbatch line the SLURM executor plugin writes for a job of these resources (its
    own functions, attempt 1), after checking ``slurm_extra`` as it does."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    class Resources(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    values = Resources({k: v(None, 1) if callable(v) else v for k, v in resources.items()})
    job = SimpleNamespace(resources=values, threads=threads)
    validate_slurm_extra(job)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "rule_train_regime",
              "account": "", "partition": "", "workdir": None}
    return " ".join((get_submit_command(job, params) + set_gres_string(job)).split())


def test_a_training_job_of_two_nodes_is_one_slurm_job_of_their_tasks(tmp_path):
    """2 nodes x 4 GPUs, one task per GPU: the train job asks SLURM for one allocation of
    8 tasks (the plugin's MPI mode, so its command runs once and the launcher starts the
    tasks under srun), 4 GPUs and 4 tasks' memory per node; the features job stays one task
    on one node's 4 GPUs; and a single task is submitted as before."""
    from finegrained.plan.resources import family_threads, rule_resources
    from finegrained.plan.schema import load_config

    layout = {"resources": {"train": {"gpu": 4, "nodes": 2, "tasks_per_node": 4}}}
    out = _run([*_demo(tmp_path, layout), "-n", "-p", "all"], cwd=tmp_path, plain=True)
    train = _job(out, "train_regime")
    for resource in ("nodes=2", "tasks_per_node=4", "mpi=srun", "slurm_extra=--gpus-per-node=4",
                     "lease_gpus=1", "cpus_per_task=2", "mem_mb=32000"):
        assert resource in train, train
    assert re.search(r"finegrained.launch --gpus 1 --nodes 2 --tasks-per-node 4 "
                     r"--cpus-per-task 2 -- python \S+/train.py", train), train
    assert "nodes=" not in _job(out, "features") and "gpu=4" in _job(out, "features")

    config = load_config(REPO / "config" / "config.yaml", overrides=layout)
    sbatch = _sbatch(rule_resources(config, "train", environ={}, distributed=True),
                     family_threads(config, "train", distributed=True))
    assert sbatch == ("sbatch --parsable --job-name run --output log --export=ALL --comment "
                      "rule_train_regime -t 720 --mem 128000 --nodes=2 --ntasks-per-node=4 "
                      "--cpus-per-task=8 --gpus-per-node=4"), sbatch
    gres = load_config(REPO / "config" / "config.yaml",
                       overrides={**layout, "cluster": {"gpu_request": "gres"}})
    assert _sbatch(rule_resources(gres, "train", environ={}, distributed=True), 32).endswith(
        "--nodes=2 --ntasks-per-node=4 --cpus-per-task=8 --gres=gpu:4")
    single = load_config(REPO / "config" / "config.yaml")
    assert _sbatch(rule_resources(single, "train", environ={}, distributed=True), 8).endswith(
        "-t 720 --mem 32000 --nodes=1 --cpus-per-task=8 --gpus=1")


def test_the_slurm_profile_asks_for_nothing_twice_and_names_no_partition():
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    text = yaml.safe_dump(profile)
    for name in ("gres", "slurm_partition", "slurm_account", "set-resources"):
        assert name not in text


def test_refit_and_the_probe_head_are_file_edges_of_the_dag(tmp_path):
    """With protocol.refit, every regime gets a refit job whose model the evaluation reads;
    two-stage reads the probe job's weights (its refit reads the refit probe's), and a
    `regimes:` without linear_probe still runs the probe it starts from."""
    out = _run([*_demo(tmp_path, {"protocol": {"refit": True, "select_by": "val_loss"}}),
                "-n", "-p", "all"], cwd=tmp_path, plain=True)
    stats = out.split("Job stats:")[1].split("\n\n")[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", stats, re.M))
    assert counts["refit_regime"] == "5" and counts["evaluate_regime"] == "5", counts
    evaluation = re.findall(r"--gpus 0 -- python \S+/evaluate.py .*", out)
    assert len(evaluation) == 5
    assert all(re.search(r"--weights results/demo/refit/\w+/weights.safetensors", e)
               for e in evaluation), evaluation
    jobs = re.findall(rf"--gpus 0{ONE_TASK} -- python \S+/train.py .*", out)
    train = [line for line in jobs if '"regime": "two_stage"' in line
             and "--out-dir results/demo/train/" in line]
    assert len(train) == 1 and "--probe-weights results/demo/train/linear_probe/weights" in train[0]
    refit = [line for line in jobs if '"regime": "two_stage"' in line
             and "--out-dir results/demo/refit/" in line]
    assert len(refit) == 1 and "--probe-weights results/demo/refit/linear_probe/weights" in refit[0]
    assert '"select_by": "val_loss"' in refit[0]

    alone = _run([*_demo(tmp_path, {"regimes": ["two_stage"]}), "-n", "-p", "all"],
                 cwd=tmp_path, plain=True)
    stats = alone.split("Job stats:")[1].split("\n\n")[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", stats, re.M))
    assert counts["train_regime"] == "2" and counts["evaluate_regime"] == "1", counts


def test_systems_train_each_sgd_regime_per_system_and_seed_and_draw_one_figure(tmp_path):
    """`systems:` adds train jobs `<regime>+system=<name>[+seed=N]` for the SGD regimes (not
    the L-BFGS probe), each with its parallel/precision settings, no test evaluations, and
    the report_systems notebook over their histories; without `systems:` none of it."""
    systems = {"sync": {}, "local_sgd_h4": {"parallel": {"mode": "local_sgd", "average_every": 4}},
               "bf16_sr": {"precision": {"params": "bfloat16", "rounding": "stochastic"}}}
    out = _run([*_demo(tmp_path, {"regimes": ["linear_probe", "full_finetune"], "seeds": [0, 1],
                                  "systems": systems}), "-n", "-p", "all"],
               cwd=tmp_path, plain=True)
    stats = out.split("Job stats:")[1].split("\n\n")[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", stats, re.M))
    # 2 regimes x 2 seeds + full_finetune x 3 systems x 2 seeds; evaluations of the 4 only
    assert counts["train_regime"] == "10" and counts["evaluate_regime"] == "4", counts
    assert counts["report_systems"] == "1", counts
    train = re.findall(rf"--gpus 0{ONE_TASK} -- python \S+/train.py .*", out)
    local = [t for t in train if "--out-dir results/demo/train/full_finetune+seed=1+system=local_sgd_h4" in t]
    assert len(local) == 1
    assert '"parallel": {"average_every": 4, "average_opt_state": true, "mode": "local_sgd"}' in local[0]
    assert not any("linear_probe+system" in t for t in train)
    job = _job(out, "report_systems")
    assert "results/demo/train/full_finetune+seed=1+system=bf16_sr/history.parquet" in job
    assert "results/demo/report/figures/systems.png" in job
    # the notebook's parameters: paths from the rule's outputs, the comparison from the config
    assert "-r train_root results/demo/train -r figures_dir results/demo/report/figures" in job
    comparison = json.loads(re.search(r"-y '(\{.*?\})'", job).group(1))
    assert comparison == {"regimes": ["full_finetune"], "variants": ["", "+seed=1"],
                          "systems": sorted(systems)}          # as the config file lists them

    plain = _run([*_demo(tmp_path), "-n", "all"], cwd=tmp_path, plain=True)
    assert "report_systems" not in plain
