"""The data phase of the workflow on bad input and interruptions: a corrupt photo (`error`
stops with the file named and no shard of that split written; `skip` drops it and reports
it), an unusable box, and a `kill -9` in the middle of cropping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from finegrained.demo import generate_demo_dataset
from finegrained.data.shards import ShardReader
from finegrained.fileio import sha256_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "birds"
    generate_demo_dataset(root, variant="target", num_classes=2, train_per_class=4,
                          test_per_class=2, min_side=64, max_side=80, seed=5)
    lines = (root / "images.txt").read_text().split("\n")
    split = dict(line.split() for line in (root / "train_test_split.txt").read_text().split("\n")
                 if line)
    image_id, rel = next(line.split() for line in lines if line and split[line.split()[0]] == "0")
    photo = root / "images" / rel
    photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 3])  # truncated JPEG
    return root, image_id, rel


def _data_command(workdir: Path, root: Path, on_bad_image: str, fmt: str, *, size: int = 32,
                  test_shards: int = 2) -> tuple[list[str], dict]:
    config = {"run_name": "bad", "dataset": {"format": "nabirds", "root": str(root),
                                             "on_bad_image": on_bad_image, "val_fraction": 0.25},
              "crop": {"size": size}, "train": {"image_size": size},
              "shards": {"format": fmt, "num_shards": {"train": 1, "val": 1, "test": test_shards}}}
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return ([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
             "data", "--configfile", str(configfile), "--cores", "2", "--keep-going"], env)


def _run_data(workdir: Path, root: Path, on_bad_image: str, fmt: str, **options):
    command, env = _data_command(workdir, root, on_bad_image, fmt, **options)
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)


def test_error_names_the_file_and_writes_no_partial_shard(corrupt_dataset, tmp_path):
    root, image_id, rel = corrupt_dataset
    proc = _run_data(tmp_path, root, "error", "npy")
    assert proc.returncode != 0
    test_dir = tmp_path / "results" / "bad" / "data" / "target" / "shards" / "test"
    logs = "".join(p.read_text() for p in (tmp_path / "results" / "bad" / "logs" / "crop_shard"
                                           / "target" / "test").glob("*.log"))
    assert f"{rel}: cannot decode image: image file is truncated" in logs
    assert not (test_dir / "index.json").exists()
    # only the shard without the corrupt photo exists (complete); no temporary files
    written = sorted(p.name for p in test_dir.iterdir())
    assert written in ([f"shard-0000{i}.{ext}" for ext in ("npy", "parquet", "record.json",
                                                         "skipped.json")] for i in (0, 1))
    meta = pq.read_table(test_dir / written[1])
    assert meta.num_rows == 2 and image_id not in meta.column("image_id").to_pylist()


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_skip_reports_the_image_and_keeps_the_rest(corrupt_dataset, tmp_path, fmt):
    root, image_id, rel = corrupt_dataset
    proc = _run_data(tmp_path, root, "skip", fmt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = tmp_path / "results" / "bad" / "data" / "target"
    index = json.loads((data / "shards" / "test" / "index.json").read_text())
    assert index["num_skipped"] == 1 and index["count"] == 3
    assert index["skipped"][0]["image_id"] == image_id
    assert index["skipped"][0]["path"] == f"images/{rel}"
    assert "truncated" in index["skipped"][0]["reason"]
    images, labels = ShardReader(data / "shards" / "test" / "index.json").load_all()
    assert images.shape == (3, 32, 32, 3) and len(labels) == 3
    manifest = pq.read_table(data / "manifest" / "test.parquet")
    assert manifest.num_rows == 4   # the manifest lists it; the crop phase dropped it


def test_a_shard_edited_after_cropping_stops_the_rerun_naming_it(corrupt_dataset, tmp_path):
    """The edited file's newer date reruns shard_index, which used to hash the edited shard
    into index.json, so every later check passed on corrupted pixels."""
    root, _, _ = corrupt_dataset
    assert _run_data(tmp_path, root, "skip", "npy").returncode == 0
    shards = tmp_path / "results" / "bad" / "data" / "target" / "shards" / "train"
    shard = shards / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = _run_data(tmp_path, root, "skip", "npy")
    assert proc.returncode != 0
    log = (tmp_path / "results" / "bad" / "logs" / "shard_index" / "target" / "train.log")
    recorded = json.loads((shards / "shard-00000.record.json").read_text())["files"]
    assert log.read_text() == (
        f"error: results/bad/data/target/shards/train/shard-00000.npy: changed since it was "
        f"written: its sha256 is "
        f"{sha256_file(shard)}, its crop job's record shard-00000.record.json records "
        f"{recorded[shard.name]['sha256']}; delete the shard's files and rerun the crop phase "
        f"to rebuild it\n")
    assert not (shards / "index.json").exists()


def test_skip_drops_an_image_whose_box_has_no_area(tmp_path_factory, tmp_path):
    """A new user's folder: good photos and one zero-area box. `skip` runs on and lists it."""
    root = tmp_path_factory.mktemp("data") / "birds"
    generate_demo_dataset(root, variant="target", num_classes=2, train_per_class=4,
                          test_per_class=2, min_side=64, max_side=80, seed=5)
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    image_id, x, y, _, h = lines[0].split()
    lines[0] = f"{image_id} {x} {y} 0 {h}"
    (root / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    proc = _run_data(tmp_path, root, "skip", "npy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = tmp_path / "results" / "bad" / "data" / "target"
    [skipped] = json.loads((data / "manifest" / "skipped.json").read_text())
    assert skipped["image_id"] == image_id
    assert skipped["reason"].startswith("bounding box has zero or negative area "
                                        "(bounding_boxes.txt line 1")
    counts = sum(json.loads((data / "shards" / s / "index.json").read_text())["count"]
                 for s in ("train", "val", "test"))
    assert counts == 11


def test_kill_9_mid_crop_then_rerun_leaves_no_temporary_files(tmp_path_factory, tmp_path):
    """SLURM's time limit: every process of the run killed with -9 while shards are written.
    The rerun completes, accepts no torn shard, and removes the killed jobs' temporary files."""
    root = tmp_path_factory.mktemp("data") / "birds"
    generate_demo_dataset(root, variant="target", num_classes=2, train_per_class=40,
                          test_per_class=20, min_side=300, max_side=400, seed=6)
    command, env = _data_command(tmp_path, root, "error", "npy", size=256, test_shards=1)
    shards = tmp_path / "results" / "bad" / "data" / "target" / "shards"
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not list(shards.glob("*/.shard-*.npy.*.tmp")):
            assert run.poll() is None, "the crop jobs ended before they could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    leftovers = list(shards.glob("*/.*.tmp"))
    assert leftovers                                    # what a kill -9 leaves behind

    unlock = subprocess.run(command + ["--unlock"], cwd=tmp_path, env=env, capture_output=True)
    assert unlock.returncode == 0
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.joinpath("results").rglob("*.tmp")) == []
    logs = "".join(p.read_text() for p in tmp_path.joinpath("results").rglob("crop_shard/**/*.log"))
    assert "left by an interrupted earlier attempt" in logs
    for split in ("train", "val", "test"):
        reader = ShardReader(shards / split / "index.json", verify=True)
        assert len(reader) == {"train": 60, "val": 20, "test": 40}[split]
