# Helpers shared by every stage: config validation, output paths, input functions.

from pathlib import Path

from finegrained.config import load_schema, validate_config

validate_config(config, load_schema(f"{workflow.basedir}/workflow/schemas/config.schema.yaml"))

# Jobs import the library from this checkout, also inside the per-family conda
# environments (envs/*.yaml hold only the third-party packages).
# (The prefix is formatted like a shell command: {{ }} are literal braces.)
shell.prefix(f"export PYTHONPATH='{workflow.basedir}/src'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

SPLITS = ["train", "val", "test"]
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
    """Where a dataset's annotation files are: generated for the demo, else dataset.root."""
    cfg = dataset_config(wildcards.dataset)
    if cfg["demo"] is not None:
        return results(f"demo_data/{wildcards.dataset}")
    return cfg["root"]


def shard_ids(split):
    return [f"{i:05d}" for i in range(config["shards"]["num_shards"][split])]


def shard_outputs():
    """Files one crop job writes: metadata + skipped report, and the pixels for npy shards."""
    stem = results("data/{dataset}/shards/{split}/shard-{shard}")
    outputs = {"meta": f"{stem}.parquet", "skipped": f"{stem}.skipped.json"}
    if config["shards"]["format"] == "npy":
        outputs["images"] = f"{stem}.npy"
    return outputs


def split_shard_metas(wildcards):
    return expand(
        results("data/{dataset}/shards/{split}/shard-{shard}.parquet"),
        dataset=wildcards.dataset,
        split=wildcards.split,
        shard=shard_ids(wildcards.split),
    )


def data_resources(key):
    return config["resources"]["data"][key]


def train_resources(key):
    return config["resources"]["train"][key]


def stage_depths_arg():
    """The --stage-depths option of the model scripts, empty for the standard depths."""
    depths = config["backbone"]["stage_depths"]
    return f"--stage-depths {' '.join(map(str, depths))}" if depths else ""


def backbone_weights_file():
    """The weights file the target model starts from, or None for random init."""
    weights = config["backbone"]["weights"]
    if weights == "none":
        return None
    if weights == "pretrain":
        return results("pretrain/weights.safetensors")
    if weights.startswith(("http://", "https://")):
        return f"resources/weights/{Path(weights.split('?')[0]).name}"
    return weights


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
