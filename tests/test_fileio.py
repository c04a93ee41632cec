"""Atomic outputs: the leftovers of a killed attempt are removed by the next one, and only
those. Every JSON file the pipeline reads is read by one reader that names a torn file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finegrained.errors import DataError
from finegrained.fileio import atomic_output, read_json, remove_stale_temporaries, sha256_file


def test_next_attempt_removes_only_its_own_leftovers(tmp_path):
    out = tmp_path / "shard-00001.npy"
    stale = [tmp_path / ".shard-00001.npy.k2j4_9xa.tmp", tmp_path / ".shard-00001.npy.00000000.tmp"]
    others = [tmp_path / ".shard-00001.npy.meta.abcdefgh.tmp",   # another output's (name.meta)
              tmp_path / ".shard-00011.npy.abcdefgh.tmp",        # another shard's
              tmp_path / ".shard-00001.npy.tmp",                 # not a name atomic_output makes
              tmp_path / "shard-00001.npy.abcdefgh.tmp"]
    for path in stale + others:
        path.write_bytes(b"torn")
    with atomic_output(out) as tmp:
        assert not any(p.exists() for p in stale)
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole"
    assert all(p.exists() for p in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name] + [p.name for p in others])


def test_remove_stale_temporaries_in_a_missing_folder(tmp_path):
    assert remove_stale_temporaries(tmp_path / "nope" / "x.json") == []


def test_a_nested_temporary_of_a_killed_truncation_is_removed(tmp_path):
    """A kill between a skip-mode shard's two writes used to leave ``..<name>.<tok>.tmp.<tok>.tmp``
    (as large as the shard) that no later attempt removed."""
    out = tmp_path / "shard-00001.npy"
    nested = tmp_path / "..shard-00001.npy.k2j4_9xa.tmp.0ab1cd2e.tmp"
    unrelated = tmp_path / "..shard-00011.npy.k2j4_9xa.tmp.0ab1cd2e.tmp"
    for path in (nested, unrelated):
        path.write_bytes(b"torn")
    assert remove_stale_temporaries(out) == [nested]
    assert unrelated.exists()


def test_a_skip_mode_shard_leaves_only_its_outputs(tmp_path):
    """A shard with skipped images is cut short in place: no second temporary, and the
    header of the images kept fits the room left for that of all."""
    import numpy as np

    from finegrained.data import shards

    final = tmp_path / "shard-00000.npy"
    with atomic_output(final) as tmp, shards._NpyWriter(tmp, final, 4, 2) as images:
        for k in range(3):
            images.append(np.full((2, 2, 3), k, np.uint8))
        assert images.finish() == {"shape": [3, 2, 2, 3], "dtype": "uint8"}
    np.testing.assert_array_equal(np.load(final, mmap_mode="r"),
                                  np.arange(3, dtype=np.uint8).repeat(12).reshape(3, 2, 2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_the_demo_generator_removes_the_folders_of_a_killed_run(tmp_path):
    from finegrained.demo import generate_demo_dataset

    out = tmp_path / "target"
    stale = [tmp_path / ".target.ab12cd_3.tmp", tmp_path / ".target.zz99yy00.old"]
    other = tmp_path / ".source.ab12cd_3.tmp"
    for folder in (*stale, other):
        (folder / "images").mkdir(parents=True)
    generate_demo_dataset(out, num_classes=2, train_per_class=1, test_per_class=1,
                          min_side=48, max_side=48)
    assert not any(p.exists() for p in stale) and other.exists()
    assert (out / "images.txt").is_file()


def test_a_committed_file_and_its_rename_reach_the_disk_first(tmp_path, monkeypatch):
    """fsync of the temporary before the rename and of the folder after it, before
    atomic_output returns: a power loss cannot leave an empty file under the final name."""
    import os

    from finegrained import fileio

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: events.append(
        ("replace", str(b))) or real_replace(a, b))
    out = tmp_path / "metrics.json"
    with atomic_output(out) as tmp:
        tmp.write_text("{}")
        name = str(tmp)
    assert events == [("fsync", name), ("replace", str(out)), ("fsync", str(tmp_path))]


def test_a_missing_or_torn_json_file_is_named(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(DataError, match="metrics file not found") as caught:
        read_json(path, "metrics file")
    assert caught.value.path == str(path)
    path.write_text('{"views": {"center": {"top1": 0.8')
    with pytest.raises(DataError, match=r"not a valid metrics file \(Expecting .* line 1, "
                                        r"column 34; truncated or edited\?\)") as caught:
        read_json(path, "metrics file")
    assert str(caught.value).startswith(f"{path}: ")


def test_a_truncated_shard_skipped_report_is_named_by_the_index_job(tmp_path):
    """The shard index read each shard's .skipped.json with a bare json.loads: a truncated
    one ended in a JSONDecodeError that named no file. Its crop job's record names it now."""
    from finegrained.data.shards import SHARD_METADATA_KEY, record_path, write_split_index
    settings = {"size": 32, "margin": 0.1, "aspect": "square", "overflow": "pad",
                "max_squeeze": 1.0, "format": "parquet", "codec": "png"}
    meta = tmp_path / "shard-00000.parquet"
    table = pa.table({"label": pa.array([0], pa.int32())})
    pq.write_table(table.replace_schema_metadata({SHARD_METADATA_KEY: json.dumps(settings)}), meta)
    skipped = tmp_path / "shard-00000.skipped.json"
    skipped.write_text('[{"image_id": "12", "path": "a/b.jpg", "reason": "unreadable"}]')
    record_path(meta).write_text(json.dumps({"count": 1, "files": {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in (meta, skipped)}}))
    skipped.write_text('[{"image_id": "12", "path": "a/b.jpg", "rea')
    with pytest.raises(DataError, match="truncated or replaced since") as caught:
        write_split_index([meta], tmp_path / "index.json", "test")
    assert caught.value.path == str(skipped)
    assert not (tmp_path / "index.json").exists()
