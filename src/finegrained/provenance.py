"""Provenance of a result file: what produced it, from which inputs, on what.

Every result JSON of the workflow (train and evaluate summaries, sweep selections, the run
summary) carries a ``provenance`` block from :func:`provenance`, so a number in a paper can
be traced to the code revision, the package versions, the device and the exact inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Mapping

from finegrained.fileio import sha256_file

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "pyarrow")
#: The checkout this module runs from (no git revision when installed elsewhere).
SOURCE_DIR = Path(__file__).resolve().parents[2]


def git_revision(directory: str | os.PathLike | None = SOURCE_DIR) -> str | None:
    """``git rev-parse HEAD`` of ``directory``, or None (no git, not a checkout)."""
    if directory is None:
        return None
    try:
        proc = subprocess.run(["git", "-C", os.fspath(directory), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    revision = proc.stdout.strip() if proc.returncode == 0 else ""
    return revision or None


def package_versions(packages=PACKAGES) -> dict[str, str | None]:
    versions = {"python": sys.version.split()[0]}
    for package in packages:
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def device_info() -> dict:
    """Platform, kind and count of the JAX devices this process computes on."""
    import jax
    device = jax.devices()[0]
    return {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}


def provenance(*, config_hash: str | None = None,
               shard_indexes: Mapping[str, str | os.PathLike] | None = None,
               device: bool = True, source_dir: str | os.PathLike | None = SOURCE_DIR,
               **files: str | os.PathLike | None) -> dict:
    """The provenance block: config hash, git revision, package versions, the device (for
    jobs that compute on one), the sha256 of each shard index read (``{split: sha256}``)
    and of any other input ``files`` (``<name>_sha256``; None stays None)."""
    block = {"config_hash": config_hash, "git_revision": git_revision(source_dir),
             "package_versions": package_versions()}
    if device:
        block["device"] = device_info()
    block["shard_indexes_sha256"] = {split: sha256_file(path)
                                     for split, path in (shard_indexes or {}).items()}
    for name, path in files.items():
        block[f"{name}_sha256"] = None if path is None else sha256_file(path)
    return block
