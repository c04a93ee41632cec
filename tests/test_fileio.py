"""Atomic outputs: the leftovers of a killed attempt are removed by the next one, and only
those."""

from __future__ import annotations

from finegrained.fileio import atomic_output, remove_stale_temporaries


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
