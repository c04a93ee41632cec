# Helpers shared by every stage: config validation, output paths, input functions.

import json
import os
import shlex
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import DeploymentMethod

from finegrained.config import is_url, load_schema, validate_config
from finegrained.data.manifest import SPLITS
from finegrained.data.settings import crop_settings, manifest_settings
from finegrained.data.readers import DATASET_FORMATS, annotation_files
from finegrained.models.download import WEIGHTS_DIR, download_path, sha256_record
from finegrained.models.settings import fetch_settings, init_settings
from finegrained.resources import (device_environment, export_line, family_threads,
                                   jax_conda_env, rule_resources)

validate_config(config, load_schema(f"{workflow.basedir}/workflow/schemas/config.schema.yaml"))

# Jobs import the library from this checkout, also inside the per-family conda
# environments (envs/*.yaml hold only the third-party packages). Without conda they run
# with the Python of the environment Snakemake runs in (its bin/ first on PATH), not with
# whatever `python` the shell finds. The prefix replaces Snakemake's default one, so it
# starts with that: `set -euo pipefail;`. (It is formatted like a shell command: {{ }} are
# literal braces.)
USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
_JOB_PATH = "" if USES_CONDA else f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; "
shell.prefix(
    f"set -euo pipefail; {_JOB_PATH}"
    f"export PYTHONPATH={shlex.quote(str(Path(workflow.basedir) / 'src'))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    + export_line(device_environment(config)).replace("{", "{{").replace("}", "}}")
)

DATASETS = ["target", "source"]


def results(path):
    """Path of an output of this run: results/<run_name>/<path>."""
    return f"results/{config['run_name']}/{path}"


def script_path(name):
    """A script under scripts/, listed among the inputs. The workflow then also runs from another
    --directory, and a changed script marks its outputs for rerun."""
    return str(Path(workflow.basedir) / "scripts" / name)


def dataset_config(dataset):
    """The config block of the target dataset or of the pretraining source dataset."""
    return config["dataset"] if dataset == "target" else config["pretrain"]["dataset"]


def dataset_root(wildcards):
    """Where a dataset's annotation files and images/ are: generated for the demo, else
    dataset.root. A param, not an input: the inputs are the annotation files themselves."""
    cfg = dataset_config(wildcards.dataset)
    if cfg["demo"] is not None:
        return results(f"demo_data/{wildcards.dataset}")
    return cfg["root"]


def annotation_inputs(wildcards):
    """The annotation files the manifests read (the demo generator writes all of them)."""
    cfg = dataset_config(wildcards.dataset)
    files = annotation_files(cfg["format"], dataset_root(wildcards),
                             all_optional=cfg["demo"] is not None)
    return [str(path) for path in files]


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


# ---------------------------------------------------------------------------- resources


def job_threads(family):
    return family_threads(config, family)


def job_resources(family, gpu=None):
    """A rule's resources (unpacked into `resources:`): finegrained.resources.rule_resources."""
    return rule_resources(config, family, gpu)


def jax_env(gpu=None):
    return jax_conda_env(config, gpu)


def backbone_weights_file():
    """The weights file the target model starts from, or None for random init. A URL is
    downloaded to resources/weights/<host>/<path> (one file per URL, beside the user's own)."""
    weights = config["backbone"]["weights"]
    if weights == "none":
        return None
    if weights == "pretrain":
        return results("pretrain/weights.safetensors")
    if is_url(weights):
        return download_path(weights)
    return weights


def backbone_weights_record():
    """For downloaded weights, the sha256 recorded beside the file (checked on every use)."""
    if not is_url(config["backbone"]["weights"]):
        return None
    return str(sha256_record(backbone_weights_file()))


# ---------------------------------------------------------------------------- training

import json as _json

from finegrained.train import regimes as _regimes


def train_job_settings(wildcards):
    """The resolved settings of one train job, as the JSON the script reads. Every default
    comes from the schema; a changed value changes this string and reruns the job."""
    return _json.dumps(_regimes.job_settings(config, wildcards.regime, wildcards.variant),
                       sort_keys=True)


def feature_job_settings(wildcards):
    """The pooled layers of a split (`features`)."""
    return _json.dumps(_regimes.feature_settings(config, wildcards.split), sort_keys=True)


def feature_map_job_settings(wildcards):
    """One boundary map of a split (`feature_map`)."""
    return _json.dumps(_regimes.feature_settings(config, wildcards.split, f"{wildcards.stage}:map"),
                       sort_keys=True)


def pretrain_job_settings():
    return _json.dumps(_regimes.pretrain_settings(config), sort_keys=True)


def train_inputs(wildcards):
    """Init weights for pretrained regimes; the feature cache for cached ones."""
    settings = _regimes.job_settings(config, wildcards.regime, wildcards.variant)
    inputs = {}
    if settings["init"] == "pretrained":
        inputs["init"] = results("weights/init.safetensors")
    layers = _regimes.cached_layers(config, wildcards.regime, wildcards.variant)
    if layers:
        inputs["features"] = [results(f"features/{_regimes.cache_index(split, layer)}")
                              for layer in layers for split in ("train", "val")]
    return inputs


def features_dir_arg(wildcards, input):
    """--features-dir: the folder the cache indexes among the inputs sit in (from the input
    paths, so a module's prefix moves it too)."""
    if "features" not in input.keys():
        return ""
    first = _regimes.cached_layers(config, wildcards.regime, wildcards.variant)[0]
    index = Path(input.features[0])
    return f"--features-dir {shlex.quote(str(index.parents[len(Path(_regimes.cache_index('train', first)).parts) - 1]))}"


def checkpoint_dir(output, relative, job):
    """results/<run>/checkpoints/<job>, from an output of the job and that output's path
    relative to results/<run>/ (so a module's prefix moves it too). Not an output: Snakemake
    keeps it when a job dies, and the rerun resumes from it."""
    output = Path(output)
    return str(output.parents[len(Path(relative).parts) - 1] / "checkpoints" / job)


REGIMES = list(_regimes.REGIMES)
VARIANT_PATTERN = _regimes.VARIANT_PATTERN


# ---------------------------------------------------------------------------- replicates, sweeps

from finegrained import protocol as _protocol

_protocol.check_protocol(config)


def train_targets():
    """Every train job: each regime's grid points (if swept) times the replicate seeds."""
    return [results(f"train/{regime}{variant}/summary.json") for regime in config["regimes"]
            for variant in _protocol.train_variants(config, regime)]


def eval_targets():
    """One evaluation per regime and replicate (of the chosen grid point, if swept)."""
    return [results(f"eval/{regime}{variant}/metrics.json") for regime in config["regimes"]
            for variant in _protocol.replicate_variants(config)]


def selection_targets():
    return [results(f"select/{regime}.json") for regime in config["regimes"]
            if _protocol.has_sweep(config, regime)]


def sweep_candidates(wildcards):
    """Grid point -> the summary.json of each replicate, for select_sweep."""
    return {point: [results(f"train/{wildcards.regime}{_protocol.join_variants(point, rep)}/summary.json")
                    for rep in _protocol.replicate_variants(config)]
            for point in _protocol.sweep_variants(config, wildcards.regime)}


def _reads_selection(wildcards):
    """Whether eval/<regime><variant>/ evaluates the point its regime's sweep chose (an
    explicitly named grid point is evaluated as it is)."""
    return (_protocol.has_sweep(config, wildcards.regime)
            and not _protocol.is_sweep_point(config, wildcards.regime, wildcards.variant))


def evaluate_inputs(wildcards):
    """The train job an evaluation reads. For a swept regime: the sweep's choice and every
    grid point of this replicate (the job opens the chosen one), so the DAG needs no
    checkpoint and `snakemake -n` shows the whole run."""
    regime, variant = wildcards.regime, wildcards.variant
    if not _reads_selection(wildcards):
        train_dir = results(f"train/{regime}{variant}")
        return {"weights": f"{train_dir}/weights.safetensors", "summary": f"{train_dir}/summary.json"}
    points = [results(f"train/{regime}{_protocol.join_variants(p, variant)}")
              for p in _protocol.sweep_variants(config, regime)]
    return {"selection": results(f"select/{regime}.json"),
            "weights": [f"{p}/weights.safetensors" for p in points],
            "summary": [f"{p}/summary.json" for p in points]}


def evaluate_train_args(wildcards, input):
    """The evaluate script's options naming the trained model (see evaluate_inputs)."""
    if "selection" in input.keys():
        train_root = Path(input.summary[0]).parent.parent
        return (f"--selection {shlex.quote(input.selection)} "
                f"--train-root {shlex.quote(str(train_root))}")
    return f"--weights {shlex.quote(input.weights)} --train-summary {shlex.quote(input.summary)}"


# ---------------------------------------------------------------------------- evaluation

from finegrained.evaluate.settings import evaluation_settings as _evaluation_settings


def evaluate_job_settings(wildcards):
    """The resolved settings of one evaluate job, as the JSON the script reads."""
    return _json.dumps(_evaluation_settings(config, wildcards.regime, wildcards.variant),
                       sort_keys=True)


# ---------------------------------------------------------------------------- report


def notebook_path(name):
    """A papermill notebook under workflow/notebooks/ (an input: a changed notebook reruns it)."""
    return str(Path(workflow.basedir) / "workflow" / "notebooks" / name)


def report_figure(name, caption, subcategory):
    """The PNG of a figure, marked for `snakemake --report` with its caption
    (workflow/report/<caption>.rst); the SVG beside it is a plain output."""
    return report(results(f"report/figures/{name}.png"), caption=f"../report/{caption}.rst",
                  category="Figures", subcategory=subcategory)
