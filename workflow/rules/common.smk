# Helpers shared by every stage: config validation, output paths, input functions.

import urllib.parse
from pathlib import Path

from finegrained.config import is_url, load_schema, validate_config
from finegrained.data.manifest import SPLITS
from finegrained.data.readers import DATASET_FORMATS, annotation_files
from finegrained.models.download import sha256_record

validate_config(config, load_schema(f"{workflow.basedir}/workflow/schemas/config.schema.yaml"))

# Jobs import the library from this checkout, also inside the per-family conda
# environments (envs/*.yaml hold only the third-party packages). The prefix replaces
# Snakemake's default one, so it starts with that: `set -euo pipefail;`.
# (The prefix is formatted like a shell command: {{ }} are literal braces.)
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH='{workflow.basedir}/src'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
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


def crop_args():
    """The crop options of crop_shard, only those that change its output (a changed param
    reruns every crop job)."""
    crop = config["crop"]
    args = f"--size {crop['size']} --margin {crop['margin']} --aspect {crop['aspect']}"
    if crop["aspect"] == "square":
        args += f" --overflow {crop['overflow']}"
        if crop["overflow"] == "squeeze":
            args += f" --max-squeeze {crop['max_squeeze']}"
    shards = config["shards"]
    args += f" --format {shards['format']}"
    if shards["format"] == "parquet":
        args += f" --codec {shards['codec']}"
    return args


def data_resources(key):
    return config["resources"]["data"][key]


def train_resources(key):
    return config["resources"]["train"][key]


def stage_depths_arg():
    """The --stage-depths option of the model scripts, empty for the standard depths."""
    depths = config["backbone"]["stage_depths"]
    return f"--stage-depths {' '.join(map(str, depths))}" if depths else ""


def backbone_weights_file():
    """The weights file the target model starts from, or None for random init. A URL is
    downloaded to resources/weights/<host>/<path> (one file per URL, beside the user's own)."""
    weights = config["backbone"]["weights"]
    if weights == "none":
        return None
    if weights == "pretrain":
        return results("pretrain/weights.safetensors")
    if is_url(weights):
        url = urllib.parse.urlsplit(weights)
        return f"resources/weights/{url.hostname}{url.path}"
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
    return _json.dumps(_regimes.feature_settings(config, wildcards.split), sort_keys=True)


def pretrain_job_settings():
    return _json.dumps(_regimes.pretrain_settings(config), sort_keys=True)


def train_inputs(wildcards):
    """Init weights for pretrained regimes; the feature cache for cached ones."""
    settings = _regimes.job_settings(config, wildcards.regime, wildcards.variant)
    inputs = {}
    if settings["init"] == "pretrained":
        inputs["init"] = results("weights/init.safetensors")
    if _regimes.uses_cache(config, wildcards.regime, wildcards.variant):
        inputs["features"] = [results(f"features/{split}/index.json") for split in ("train", "val")]
    return inputs


def train_dir(regime, variant=""):
    return results(f"train/{regime}{variant}")

REGIMES = list(_regimes.REGIMES)
VARIANT_PATTERN = _regimes.VARIANT_PATTERN
