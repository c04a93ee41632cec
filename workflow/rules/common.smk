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

from finegrained import protocol
from finegrained.config import is_url, load_schema, validate_config
from finegrained.data.manifest import SPLITS
from finegrained.data.readers import (DATASET_FORMATS, annotation_files, check_image_paths,
                                      dataset_root_problem)
from finegrained.data.settings import crop_settings, manifest_settings
from finegrained.errors import DataError
from finegrained.evaluate.settings import evaluation_settings
from finegrained.models.download import WEIGHTS_DIR, download_path, sha256_record
from finegrained.models.settings import fetch_settings, init_settings
from finegrained.resources import family_threads, jax_conda_env, rule_resources, shell_prefix
from finegrained.train import regimes

validate_config(config, load_schema(FINEGRAINED_DIR / "workflow" / "schemas" / "config.schema.yaml"))
protocol.check_protocol(config)

# Jobs run with the Python of the environment Snakemake runs in (not whatever `python` the
# shell finds), or in the rule's conda env; either way with this checkout's library.
USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
shell.prefix(
    shell_prefix(config, FINEGRAINED_DIR / "src", None if USES_CONDA else Path(sys.executable).parent)
)

DATASETS = ["target", "source"]
REGIMES = list(regimes.REGIMES)
VARIANT_PATTERN = regimes.VARIANT_PATTERN


# ---------------------------------------------------------------------------- paths


def results(path):
    """Path of an output of this run: results/<run_name>/<path>."""
    return f"results/{config['run_name']}/{path}"


def script_path(name):
    """A script under scripts/, listed among the inputs: a changed script reruns its jobs."""
    return str(FINEGRAINED_DIR / "scripts" / name)


def notebook_path(name):
    """A papermill notebook under workflow/notebooks/ (an input: a changed notebook reruns it)."""
    return str(FINEGRAINED_DIR / "workflow" / "notebooks" / name)


def run_folder(output, relative):
    """results/<run>/ (with a module's prefix), from an output of a job and that output's
    path relative to results/<run>/."""
    return Path(output).parents[len(Path(relative).parts) - 1]


def checkpoint_dir(output, relative, job):
    """results/<run>/checkpoints/<job>: not an output, so Snakemake keeps it when a job dies
    and the rerun resumes from it."""
    return str(run_folder(output, relative) / "checkpoints" / job)


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


def dataset_config(dataset):
    """The config block of the target dataset or of the pretraining source dataset."""
    return config["dataset"] if dataset == "target" else config["pretrain"]["dataset"]


def annotation_inputs(wildcards):
    """The annotation files the manifests read: generated for the demo, else in dataset.root
    (absolute, so a module's prefix leaves the user's data where it is). A missing root
    stops the DAG with one line naming the key and the path."""
    cfg = dataset_config(wildcards.dataset)
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
    return [str(path) for path in annotation_files(cfg["format"], root, all_optional=demo)]


def dataset_root(wildcards, input):
    """The folder holding a dataset's images.txt (the first annotation input)."""
    return str(Path(input.annotations[0]).parent)


def shard_ids(split):
    return [f"{i:05d}" for i in range(config["shards"]["num_shards"][split])]


def shard_outputs():
    """Files one crop job writes: metadata + skipped report, and the pixels for npy shards."""
    stem = results("data/{dataset}/shards/{split}/shard-{shard}")
    outputs = {"meta": f"{stem}.parquet", "skipped": f"{stem}.skipped.json"}
    if config["shards"]["format"] == "npy":
        outputs["images"] = f"{stem}.npy"
    return outputs


def split_shard_files(kind):
    """Input function: every shard file of one kind ('meta', 'skipped', 'images') of a split."""

    def files(wildcards):
        if kind not in shard_outputs():
            return []
        return expand(
            shard_outputs()[kind],
            dataset=wildcards.dataset,
            split=wildcards.split,
            shard=shard_ids(wildcards.split),
        )

    return files


# ---------------------------------------------------------------------------- weights


def backbone_weights_file():
    """The weights file the target model starts from, or None for random init: a URL's
    download under resources/weights/, the pretrain rule's output, or the user's own file."""
    weights = config["backbone"]["weights"]
    if weights == "none":
        return None
    if weights == "pretrain":
        return results("pretrain/weights.safetensors")
    if is_url(weights):
        return download_path(weights)
    return str(Path(weights).absolute())


def backbone_weights_record():
    """For downloaded weights, the sha256 recorded beside the file (checked on every use)."""
    if not is_url(config["backbone"]["weights"]):
        return None
    return str(sha256_record(backbone_weights_file()))


def source_class_names():
    names = config["backbone"]["source_class_names"]
    return str(Path(names).absolute()) if names else None


def optional_flag(flag, name):
    """A param: ``flag <input.name>`` when the rule has that input (a named input given as
    [], as `backbone.weights: none` gives the init rule's weights, is none), else nothing."""
    return lambda wildcards, input: f"{flag} {shlex.quote(input[name])}" if input.get(name) else ""


# ---------------------------------------------------------------------------- training


def train_inputs(wildcards, folder="train"):
    """Init weights for pretrained regimes; the feature cache for cached ones; the linear
    probe job's weights and summary (under `folder`: train, or refit) for a probe head."""
    settings = regimes.job_settings(config, wildcards.regime, wildcards.variant)
    inputs = {}
    if settings["init"] == "pretrained":
        inputs["init"] = results("weights/init.safetensors")
    layers = regimes.cached_layers(config, wildcards.regime, wildcards.variant)
    if layers:
        inputs["features"] = [
            results(f"features/{regimes.cache_index(split, layer)}") for layer in layers for split in ("train", "val")
        ]
    for phase in settings["phases"]:
        if phase["kind"] == "probe_head":
            probe_dir = results(f"{folder}/{phase['probe']['regime']}{phase['probe']['variant']}")
            inputs["probe_weights"] = f"{probe_dir}/weights.safetensors"
            inputs["probe_summary"] = f"{probe_dir}/summary.json"
    return inputs


def probe_args(wildcards, input):
    """--probe-weights/--probe-summary for a job that starts from the probe's head."""
    if "probe_weights" not in input.keys():
        return ""
    return f"--probe-weights {shlex.quote(input.probe_weights)} --probe-summary {shlex.quote(input.probe_summary)}"


def features_dir_arg(wildcards, input):
    """--features-dir: the folder the cache indexes among the inputs sit in."""
    if "features" not in input.keys():
        return ""
    first = regimes.cached_layers(config, wildcards.regime, wildcards.variant)[0]
    return f"--features-dir {shlex.quote(str(run_folder(input.features[0], regimes.cache_index('train', first))))}"


# ---------------------------------------------------------------------------- replicates, sweeps


def train_targets():
    """Every train job: each regime's grid points (if swept) times the replicate seeds, and
    the `systems:` comparison's jobs."""
    return [
        results(f"train/{regime}{variant}/summary.json")
        for regime in config["regimes"]
        for variant in protocol.train_variants(config, regime) + protocol.system_variants(config, regime)
    ]


def systems_regimes():
    """The regimes the `systems:` comparison trains (the SGD regimes listed)."""
    return protocol.systems_comparison(config)["regimes"]


def systems_histories():
    return [
        results(f"train/{regime}{variant}/history.parquet")
        for regime in systems_regimes()
        for variant in protocol.system_variants(config, regime)
    ]


def systems_report_targets():
    """The systems figure, when the config lists `systems:` for an SGD regime."""
    return [results("report/figures/systems.png")] if systems_regimes() else []


def eval_targets():
    """One evaluation per regime and replicate (of the chosen grid point, if swept)."""
    return [
        results(f"eval/{regime}{variant}/metrics.json")
        for regime in config["regimes"]
        for variant in protocol.replicate_variants(config)
    ]


def refit_targets():
    """One refit per regime and replicate with `protocol.refit`."""
    if not config["protocol"]["refit"]:
        return []
    return [
        results(f"refit/{regime}{variant}/summary.json")
        for regime in config["regimes"]
        for variant in protocol.replicate_variants(config)
    ]


def selection_targets():
    return [results(f"select/{regime}.json") for regime in config["regimes"] if protocol.has_sweep(config, regime)]


def sweep_candidates(wildcards):
    """Grid point -> the summary.json of each replicate, for select_sweep."""
    return {
        point: [
            results(f"train/{wildcards.regime}{protocol.join_variants(point, rep)}/summary.json")
            for rep in protocol.replicate_variants(config)
        ]
        for point in protocol.sweep_variants(config, wildcards.regime)
    }


def chosen_train_inputs(wildcards):
    """The train job chosen on validation. For a swept regime (unless the variant names a
    grid point itself): the sweep's choice and every grid point of this replicate (the job
    opens the chosen one), so the DAG needs no checkpoint and `snakemake -n` shows the run."""
    regime, variant = wildcards.regime, wildcards.variant
    if not protocol.has_sweep(config, regime) or protocol.is_sweep_point(config, regime, variant):
        train_dir = results(f"train/{regime}{variant}")
        return {"weights": f"{train_dir}/weights.safetensors", "summary": f"{train_dir}/summary.json"}
    points = [results(f"train/{regime}{protocol.join_variants(p, variant)}") for p in protocol.sweep_variants(config, regime)]
    return {
        "selection": results(f"select/{regime}.json"),
        "weights": [f"{p}/weights.safetensors" for p in points],
        "summary": [f"{p}/summary.json" for p in points],
    }


def evaluate_inputs(wildcards):
    """The model an evaluation reads: the chosen train job, or with `protocol.refit` its
    refit on train + validation (an explicitly requested grid point: its train job)."""
    regime, variant = wildcards.regime, wildcards.variant
    if protocol.uses_refit(config, regime, variant):
        refit_dir = results(f"refit/{regime}{variant}")
        return {"weights": f"{refit_dir}/weights.safetensors", "summary": f"{refit_dir}/summary.json"}
    return chosen_train_inputs(wildcards)


def refit_inputs(wildcards):
    """A refit reads the chosen train job's summary (see chosen_train_inputs), the inputs of
    that job, and the refit probe for a probe head."""
    chosen = {k: v for k, v in chosen_train_inputs(wildcards).items() if k != "weights"}
    return {**train_inputs(wildcards, folder="refit"), **chosen}


def evaluate_train_args(wildcards, input):
    """The evaluate script's options naming the trained model (see evaluate_inputs)."""
    if "selection" in input.keys():
        return chosen_selection_args(wildcards, input)
    return f"--weights {shlex.quote(input.weights)} --train-summary {shlex.quote(input.summary)}"


def chosen_selection_args(wildcards, input):
    """--selection/--train-root of a swept regime's choice."""
    train_root = Path(input.summary[0]).parent.parent
    return f"--selection {shlex.quote(input.selection)} --train-root {shlex.quote(str(train_root))}"


def refit_train_args(wildcards, input):
    """The refit script's options naming the chosen train job (see refit_inputs)."""
    if "selection" in input.keys():
        return chosen_selection_args(wildcards, input)
    return f"--train-summary {shlex.quote(input.summary)}"
