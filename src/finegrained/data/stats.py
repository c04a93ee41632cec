"""Colour statistics of a split's crops: per-channel mean/std and the RGB covariance.

Computed once over the training crops (never the test set) for input normalisation and for
AlexNet-style PCA lighting noise (Krizhevsky et al., 2012), which perturbs each pixel along
the eigenvectors of this covariance scaled by the square roots of its eigenvalues.

Values are on the 0..255 scale: divide the mean/std by 255 and the covariance/eigenvalues
by 255**2 for inputs in 0..1. Sums are accumulated in float64 over uint8 pixels; every
partial sum is an integer below 2**53, so the sums and hence the statistics are exact up to
the final divisions.

Only image pixels count: the letterbox padding around a crop's content rectangle (recorded
per crop in the shard metadata) is left out, so grey bars do not pull the mean towards 128
or shrink the variance.
"""

from __future__ import annotations

import os

import numpy as np

from finegrained.data.shards import ShardReader
from finegrained.errors import DataError
from finegrained.fileio import write_json

#: Pixels converted to float64 at a time (~24 MB of float64 RGB), to bound memory.
_CHUNK_PIXELS = 1 << 20


def compute_channel_stats(reader: ShardReader) -> dict:
    """Mean, std, covariance and its eigen-decomposition of RGB over all crops of a reader.

    Returns a JSON-ready dict: ``num_images``, ``num_pixels`` (image pixels, padding
    excluded), ``mean`` and ``std`` (3 values,
    population std), ``covariance`` (3x3), ``eigenvalues`` (descending) and ``eigenvectors``
    (3x3, eigenvector ``k`` is column ``k``, i.e. ``eigenvectors[i][k]``; each column's
    largest component is positive so the output is deterministic).
    """
    total = np.zeros(3, np.float64)
    outer = np.zeros((3, 3), np.float64)
    num_pixels = 0

    def add(pixels: np.ndarray) -> None:
        nonlocal total, outer, num_pixels
        x = np.asarray(pixels).reshape(-1, 3).astype(np.float64)
        total += x.sum(axis=0)
        outer += x.T @ x
        num_pixels += x.shape[0]

    for shard in range(reader.num_shards):
        images = reader.shard_arrays(shard)
        if len(images) == 0:
            continue
        content = reader.shard_content(shard)
        size = images.shape[1]
        full = np.flatnonzero((content[:, 2] == size) & (content[:, 3] == size))
        step = max(1, _CHUNK_PIXELS // (size * size))
        for start in range(0, len(full), step):
            chunk = full[start:start + step]
            if chunk[-1] - chunk[0] == len(chunk) - 1:      # contiguous: a slice, no copy
                add(images[chunk[0]:chunk[-1] + 1])
            else:
                add(images[chunk])
        for i in np.flatnonzero((content[:, 2] != size) | (content[:, 3] != size)):
            x, y, w, h = content[i]
            add(images[i, y:y + h, x:x + w])
    if num_pixels == 0:
        raise DataError(reader.index_path, "no images to compute colour statistics from")

    mean = total / num_pixels
    covariance = outer / num_pixels - np.outer(mean, mean)
    covariance = (covariance + covariance.T) / 2.0
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    signs = np.sign(eigenvectors[np.abs(eigenvectors).argmax(axis=0), np.arange(3)])
    eigenvectors = eigenvectors * np.where(signs == 0, 1.0, signs)
    return {
        "num_images": len(reader),
        "num_pixels": int(num_pixels),
        "scale": "0-255",
        "mean": mean.tolist(),
        "std": np.sqrt(np.clip(np.diag(covariance), 0.0, None)).tolist(),
        "covariance": covariance.tolist(),
        "eigenvalues": eigenvalues.tolist(),
        "eigenvectors": eigenvectors.tolist(),
    }


def write_channel_stats(index_path: str | os.PathLike, out_json: str | os.PathLike) -> dict:
    """Compute :func:`compute_channel_stats` for a split's shard index and write it as JSON."""
    stats = compute_channel_stats(ShardReader(index_path))
    stats["index"] = os.fspath(index_path)
    write_json(out_json, stats)
    return stats
