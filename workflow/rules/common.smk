# Shared by the rule files. The validated config, output paths, input functions, targets.
# Files of this workflow's own tree come from FINEGRAINED_DIR (the Snakefile's folder), and
# every path a job is told comes from its rule's input, output or log: used as a module with
# a prefix, the workflow moves all of them. Config values reach jobs as JSON (--settings).

import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from finegrained.data.readers import (
    DATASET_FORMATS,
    annotation_files,
    check_image_paths,
    dataset_root_problem,
)
from finegrained.errors import DataError
from finegrained.plan import jobs, paths, protocol, targets
from finegrained.plan.regimes import REGIMES
from finegrained.plan.resources import (
    family_threads,
    jax_conda_env,
    rule_resources,
    shell_prefix,
)
from finegrained.plan.schema import validate_config
from finegrained.plan.variants import VARIANT_PATTERN

validate_config(config)
protocol.check_protocol(config)

# Jobs run with the Python of the environment Snakemake runs in (not whatever `python` the
# shell finds), or in the rule's conda env; either way with this checkout's library.
USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
shell.prefix(
    shell_prefix(
        config,
        FINEGRAINED_DIR / "src",
        None if USES_CONDA else Path(sys.executable).parent,
    )
)

DATASETS = list(paths.DATASETS)
SPLITS = list(paths.SPLITS)


# ---------------------------------------------------------------------------- paths


def results(path):
    """Path of an output of this run: results/<run_name>/<path>."""
    return paths.results(config, path)


def script_path(name):
    """A script under scripts/, listed among the inputs: a changed script reruns its jobs."""
    return str(FINEGRAINED_DIR / "scripts" / name)


def notebook_path(name):
    """A papermill notebook under workflow/notebooks/ (an input: a changed notebook reruns it)."""
    return str(FINEGRAINED_DIR / "workflow" / "notebooks" / name)


run_folder = paths.run_folder
checkpoint_dir = paths.checkpoint_dir


def job_json(settings):
    """A job's resolved settings as its --settings argument (sorted keys: one text per
    settings, so an unchanged config reruns nothing)."""
    return json.dumps(settings, sort_keys=True)


def on_devices(command, distributed=False):
    """The shell command of a JAX job, run by the device launcher (finegrained.launch): it
    leases the rule's `lease_gpus` GPUs (none: the CPU) and runs `command` on them; for a
    training rule (`distributed`), as `nodes` x `launch_tasks_per_node` tasks (under srun in
    a SLURM allocation, else processes of this machine), each leasing `lease_gpus`."""
    tasks = (
        " --nodes {resources.nodes} --tasks-per-node {resources.launch_tasks_per_node}"
        " --cpus-per-task {resources.cpus_per_task}"
        if distributed
        else ""
    )
    return f"python -m finegrained.launch --gpus {{resources.lease_gpus}}{tasks} -- {command}"


def report_figure(name, caption, subcategory):
    """The PNG of a figure, marked for `snakemake --report` with its caption
    (workflow/report/<caption>.rst); the SVG beside it is a plain output."""
    return report(
        results(f"report/figures/{name}.png"),
        caption=f"../report/{caption}.rst",
        category="Figures",
        subcategory=subcategory,
    )


# ---------------------------------------------------------------------------- data


def annotation_inputs(wildcards):
    """The annotation files the manifests read: generated for the demo, else in dataset.root
    (absolute, so a module's prefix leaves the user's data where it is). A missing root
    stops the DAG with one line naming the key and the path."""
    cfg = jobs.dataset_block(config, wildcards.dataset)
    if cfg["demo"] is not None:
        root, demo = results(f"demo_data/{wildcards.dataset}"), True
    else:
        key = "dataset" if wildcards.dataset == "target" else "pretrain.dataset"
        problem = dataset_root_problem(cfg["format"], cfg["root"], key)
        if problem:
            raise WorkflowError(problem)
        root, demo = str(Path(cfg["root"]).absolute()), False
        try:
            check_image_paths(cfg["format"], root)
        except DataError as exc:
            raise WorkflowError(f"{key}.root: {exc}") from None
    return [
        str(path) for path in annotation_files(cfg["format"], root, all_optional=demo)
    ]


def dataset_root(wildcards, input):
    """The folder holding a dataset's images.txt (the first annotation input)."""
    return str(Path(input.annotations[0]).parent)


def shard_outputs():
    """Files one crop job writes: metadata, skipped report and record, and the pixels for
    npy shards."""
    return paths.shard_outputs(config)


def split_shard_files(kind):
    """Input function: every shard file of one kind ('meta', 'skipped', 'record', 'images')
    of a split."""
    return lambda wildcards: paths.split_shard_files(
        config, wildcards.dataset, wildcards.split, kind
    )


# ---------------------------------------------------------------------------- weights


def backbone_weights_file():
    return paths.backbone_weights_file(config)


def backbone_weights_record():
    return paths.backbone_weights_record(config)


def source_class_names():
    return paths.source_class_names(config)


def optional_flag(flag, name):
    """A param: ``flag <input.name>`` when the rule has that input (a named input given as
    [], as `backbone.weights: none` gives the init rule's weights, is none), else nothing.
    """
    return lambda wildcards, input: (
        f"{flag} {shlex.quote(input[name])}" if input.get(name) else ""
    )


# ---------------------------------------------------------------------------- training


def train_inputs(wildcards):
    return targets.train_inputs(config, wildcards.regime, wildcards.variant)


def refit_inputs(wildcards):
    return targets.refit_inputs(config, wildcards.regime, wildcards.variant)


def evaluate_inputs(wildcards):
    return targets.evaluate_inputs(config, wildcards.regime, wildcards.variant)


def sweep_candidates(wildcards):
    return targets.sweep_candidates(config, wildcards.regime)


def probe_args(wildcards, input):
    """--probe-weights/--probe-summary for a job that starts from the probe's head."""
    if "probe_weights" not in input.keys():
        return ""
    return f"--probe-weights {shlex.quote(input.probe_weights)} --probe-summary {shlex.quote(input.probe_summary)}"


def feature_args(wildcards, input):
    """--features: {layer: {split: index}} of the caches among the inputs (in the order
    targets.feature_indexes lists them)."""
    if "features" not in input.keys():
        return ""
    layers = targets.feature_indexes(config, wildcards.regime, wildcards.variant)
    given = iter(input.features)
    indexes = {
        layer: {split: next(given) for split in by_split}
        for layer, by_split in layers.items()
    }
    return f"--features {shlex.quote(json.dumps(indexes))}"


def model_args(wildcards, input):
    """The evaluate or refit script's options naming the chosen model: --selection and
    --train-root of a swept regime's choice, else the job's summary (and weights)."""
    if "selection" in input.keys():
        train_root = Path(input.summary[0]).parent.parent
        return f"--selection {shlex.quote(input.selection)} --train-root {shlex.quote(str(train_root))}"
    weights = (
        f"--weights {shlex.quote(input.weights)} " if "weights" in input.keys() else ""
    )
    return f"{weights}--train-summary {shlex.quote(input.summary)}"


# ---------------------------------------------------------------------------- targets


def train_targets():
    return targets.train_targets(config)


def eval_targets():
    return targets.eval_targets(config)


def refit_targets():
    return targets.refit_targets(config)


def selection_targets():
    return targets.selection_targets(config)


def systems_histories():
    return targets.systems_histories(config)


def systems_report_targets():
    return targets.systems_report_targets(config)
