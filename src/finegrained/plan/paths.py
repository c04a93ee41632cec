"""The layout of ``results/<run_name>/`` and of ``resources/weights/``: where each file of
a run lives (which files a run has: :mod:`finegrained.plan.targets`).

These are contracts other tools read (``train/<regime>/summary.json``,
``eval/<regime>/metrics.json``, ...). The rule files call these functions through thin
wrappers in ``workflow/rules/common.smk``; a job is told its paths by its rule (inputs,
outputs, params), so used as a module with a prefix the workflow moves all of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from pathlib import Path
from typing import Mapping

from finegrained.errors import WeightsError

DATASETS = ("target", "source")
SPLITS = ("train", "val", "test")
#: A cached layer ``<stage>:map`` is that stage's whole activation; ``<stage>`` is its pool.
MAP_SUFFIX = ":map"
#: Where downloaded weights go, relative to the working directory.
WEIGHTS_DIR = "resources/weights"


def results(config: Mapping, path: str) -> str:
    """Path of an output of this run: ``results/<run_name>/<path>``."""
    return f"results/{config['run_name']}/{path}"


def run_folder(output: str | os.PathLike, relative: str) -> Path:
    """``results/<run>/`` (with a module's prefix), from an output of a job and that
    output's path relative to ``results/<run>/``."""
    return Path(output).parents[len(Path(relative).parts) - 1]


def checkpoint_dir(output: str | os.PathLike, relative: str, job: str) -> str:
    """``results/<run>/checkpoints/<job>``: not an output, so Snakemake keeps it when a job
    dies and the rerun resumes from it."""
    return str(run_folder(output, relative) / "checkpoints" / job)


# ---------------------------------------------------------------------------- data


def shard_ids(config: Mapping, split: str) -> list[str]:
    return [f"{i:05d}" for i in range(config["shards"]["num_shards"][split])]


def shard_outputs(config: Mapping) -> dict[str, str]:
    """Files one crop job writes (with ``{dataset}``, ``{split}``, ``{shard}`` wildcards):
    metadata, skipped report and the record of what it wrote (finegrained.data.shards), and
    the pixels for npy shards."""
    stem = results(config, "data/{dataset}/shards/{split}/shard-{shard}")
    outputs = {"meta": f"{stem}.parquet", "skipped": f"{stem}.skipped.json",
               "record": f"{stem}.record.json"}
    if config["shards"]["format"] == "npy":
        outputs["images"] = f"{stem}.npy"
    return outputs


def split_shard_files(config: Mapping, dataset: str, split: str, kind: str) -> list[str]:
    """Every shard file of one kind (``meta``, ``skipped``, ``record``, ``images``) of a
    split."""
    pattern = shard_outputs(config).get(kind)
    if pattern is None:
        return []
    return [pattern.format(dataset=dataset, split=split, shard=shard)
            for shard in shard_ids(config, split)]


# ---------------------------------------------------------------------------- weights


def backbone_weights_file(config: Mapping) -> str | None:
    """The weights file the target model starts from, or None for random init: a URL's
    download under resources/weights/, the pretrain rule's output, or the user's own file."""
    weights = config["backbone"]["weights"]
    if weights == "none":
        return None
    if weights == "pretrain":
        return results(config, "pretrain/weights.safetensors")
    if is_url(weights):
        return download_path(weights)
    return str(Path(weights).absolute())


def backbone_weights_record(config: Mapping) -> str | None:
    """For downloaded weights, the sha256 recorded beside the file (checked on every use)."""
    if not is_url(config["backbone"]["weights"]):
        return None
    return str(sha256_record(backbone_weights_file(config)))


def source_class_names(config: Mapping) -> str | None:
    names = config["backbone"]["source_class_names"]
    return str(Path(names).absolute()) if names else None


def is_url(weights: str) -> bool:
    return weights.startswith(("http://", "https://"))


#: A path segment of a URL we store: letters, digits, ``._+-``, not starting with a dot
#: (so no ``.``, ``..`` or hidden files), nothing percent-encoded.
_SEGMENT = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def download_path(url: str, root: str = WEIGHTS_DIR) -> str:
    """Where the file at ``url`` is kept: ``<root>/<host>/<path>``, or
    ``<root>/<host>-<12 hex>/<path>`` when the URL has a port or a query (their sha256, so
    neither reaches the file system as text). Raises :class:`WeightsError` for a URL that
    could name a file outside ``root``: a ``..`` or ``.`` segment, an empty or odd host,
    characters outside ``A-Za-z0-9._+-`` (percent escapes included), credentials, no file."""
    parts = urllib.parse.urlsplit(url)
    problem = None
    if parts.scheme not in ("http", "https"):
        problem = "not an http(s) URL"
    elif parts.username is not None or parts.password is not None:
        problem = "credentials in a URL are not stored in a config; use a token-free URL"
    elif not parts.hostname or not _HOST.fullmatch(parts.hostname):
        problem = f"host {parts.hostname!r} is empty or has characters outside a-z0-9.-"
    segments = parts.path.split("/")[1:]
    if problem is None:
        if not segments or segments[-1] == "":
            problem = "the URL names no file"
        else:
            bad = [s for s in segments if not _SEGMENT.fullmatch(s)]
            if bad:
                problem = (f"path segment {bad[0]!r} is empty, starts with a dot or has "
                           f"characters outside A-Za-z0-9._+- (percent escapes included)")
    if problem is not None:
        raise WeightsError(f"backbone.weights: {url!r}: {problem}")
    try:
        port = parts.port
    except ValueError as exc:
        raise WeightsError(f"backbone.weights: {url!r}: {exc}") from None
    folder = parts.hostname
    if port is not None or parts.query:
        folder += "-" + hashlib.sha256(f"{port}?{parts.query}".encode()).hexdigest()[:12]
    return "/".join([root.rstrip("/"), folder, *segments])


def sha256_record(path: str | os.PathLike) -> Path:
    """Where the recorded sha256 of a downloaded file lives: ``<file>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


# ---------------------------------------------------------------------------- features


def cache_index(split: str, layer: str) -> str:
    """The index of ``layer``'s cache of ``split``, relative to the run's ``features/``
    folder: the pooled layers share ``<split>/index.json``; each boundary map
    (``<stage>:map``) has a job and a folder of its own, ``<split>/<stage>.map/index.json``."""
    if layer.endswith(MAP_SUFFIX):
        return f"{split}/{layer_stem(layer)}/index.json"
    return f"{split}/index.json"


def layer_stem(layer: str) -> str:
    """A cached layer's name on disk (``stage3:map`` -> ``stage3.map``)."""
    return layer.replace(MAP_SUFFIX, ".map")
