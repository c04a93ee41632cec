"""Colour statistics against numpy computed directly on the same crops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finegrained.data import stats as stats_module
from finegrained.data.shards import ShardReader
from finegrained.data.stats import compute_channel_stats, write_channel_stats
from finegrained.errors import DataError

from test_shards import make_dataset, write_split


def _content_pixels(reader):
    """The image pixels of every crop (padding cut away), as float64 rows of RGB."""
    images, _ = reader.load_all()
    content = np.concatenate([reader.shard_content(i) for i in range(reader.num_shards)])
    return np.concatenate([images[i, y:y + h, x:x + w].reshape(-1, 3)
                           for i, (x, y, w, h) in enumerate(content)]).astype(np.float64)


def test_stats_match_numpy_and_eigen_reconstructs(tmp_path, monkeypatch):
    root = tmp_path / "data"
    manifest, _ = make_dataset(root, n=5)
    index = write_split(root, manifest, tmp_path / "s", 2)
    monkeypatch.setattr(stats_module, "_CHUNK_PIXELS", 1500)  # force several chunks per shard
    stats = compute_channel_stats(ShardReader(index))

    pixels = _content_pixels(ShardReader(index))
    assert stats["num_images"] == 5 and stats["num_pixels"] == len(pixels)
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0), rtol=1e-10)
    covariance = np.cov(pixels, rowvar=False, bias=True)
    np.testing.assert_allclose(stats["covariance"], covariance, rtol=1e-9, atol=1e-9)

    values, vectors = np.array(stats["eigenvalues"]), np.array(stats["eigenvectors"])
    assert np.all(np.diff(values) <= 0)
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, covariance, atol=1e-8)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-12)
    for k in range(3):  # columns are eigenvectors
        np.testing.assert_allclose(covariance @ vectors[:, k], values[k] * vectors[:, k],
                                   atol=1e-8)


def test_stats_leave_padding_out(tmp_path):
    root = tmp_path / "data"
    manifest, _ = make_dataset(root, n=6)
    index = write_split(root, manifest, tmp_path / "s", 2, aspect="keep")  # letterboxed crops
    reader = ShardReader(index)
    content = np.concatenate([reader.shard_content(i) for i in range(reader.num_shards)])
    images, _ = reader.load_all()
    assert (content[:, 2:] < images.shape[1]).any(axis=1).sum() >= 4   # most are padded
    pixels = _content_pixels(reader)
    stats = compute_channel_stats(reader)
    assert stats["num_pixels"] == len(pixels) < images[..., 0].size
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["covariance"], np.cov(pixels, rowvar=False, bias=True),
                               rtol=1e-9, atol=1e-9)


def test_no_images_is_a_data_error(tmp_path):
    root = tmp_path / "data"
    manifest, _ = make_dataset(root, n=1, bad={0: "missing"})
    index = write_split(root, manifest, tmp_path / "s", 1, on_bad_image="skip")
    with pytest.raises(DataError, match="index.json: no images"):
        compute_channel_stats(ShardReader(index))


def test_write_channel_stats_json(tmp_path):
    root = tmp_path / "data"
    manifest, _ = make_dataset(root, n=3)
    index = write_split(root, manifest, tmp_path / "s", 1, fmt="parquet")
    out = tmp_path / "stats.json"
    write_channel_stats(index, out)
    written = json.loads(out.read_text())
    assert written["num_images"] == 3 and len(written["eigenvectors"]) == 3


def test_channel_stats_script(tmp_path, repo_root):
    import subprocess
    import sys

    root = tmp_path / "data"
    manifest, _ = make_dataset(root, n=2)
    index = write_split(root, manifest, tmp_path / "s", 1)
    out = tmp_path / "stats.json"
    script = str(repo_root / "scripts" / "channel_stats.py")
    done = subprocess.run([sys.executable, script, "--index", str(index), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["num_images"] == 2
    missing = subprocess.run([sys.executable, script, "--index", str(tmp_path / "nope.json"),
                              "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode == 1 and "nope.json" in missing.stderr


def test_channel_stats_script_on_an_empty_split_is_a_message(tmp_path, repo_root):
    import subprocess
    import sys

    root = tmp_path / "data"
    manifest, _ = make_dataset(root, n=1, bad={0: "missing"})
    index = write_split(root, manifest, tmp_path / "s", 1, on_bad_image="skip")
    done = subprocess.run([sys.executable, str(repo_root / "scripts" / "channel_stats.py"),
                           "--index", str(index), "--out", str(tmp_path / "stats.json")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "index.json: no images to compute colour statistics from" in done.stderr
    assert not (tmp_path / "stats.json").exists()
