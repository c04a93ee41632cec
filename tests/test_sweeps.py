"""A sweep's files: the choice written from the train summaries (checked as read), and the
train job a choice points to (finegrained.sweeps)."""

from __future__ import annotations

import json

import pytest

from finegrained.errors import DataError
from finegrained.fileio import sha256_file
from finegrained.sweeps import chosen_train_files, write_selection


def summary(variant, top1, loss=1.0, select_by="val_top1"):
    return {"variant": variant, "best_val_top1": top1, "best_val_loss": loss,
            "select_by": select_by}


def test_write_selection_reads_the_summaries_and_records_them(tmp_path):
    paths = {}
    for variant, top1 in [("+lr=0.01", 0.4), ("+lr=0.1", 0.6)]:
        path = tmp_path / f"{variant}.json"
        path.write_text(json.dumps(summary(variant, top1)))
        paths[variant] = [str(path)]
    out = tmp_path / "select" / "scratch.json"
    selection = write_selection("scratch", paths, out)
    assert json.loads(out.read_text()) == selection and selection["chosen"] == "+lr=0.1"
    recorded = selection["provenance"]["train_summaries_sha256"]
    assert recorded == {p[0]: sha256_file(p[0]) for p in paths.values()}
    assert "device" not in selection["provenance"]


@pytest.mark.parametrize("key, value", [("best_val_top1", "0.9"), ("best_val_top1", 1.7),
                                        ("best_val_loss", -0.5)])
def test_a_sweep_refuses_a_validation_figure_out_of_range(tmp_path, key, value):
    """A summary edited to a top-1 of "0.9" or 1.7 would have been chosen: its file and key
    are named and no selection is written."""
    paths = {}
    for variant, top1 in [("+lr=0.01", 0.4), ("+lr=0.1", 0.6)]:
        path = tmp_path / f"{variant}.json"
        path.write_text(json.dumps({**summary(variant, top1),
                                    **({key: value} if variant == "+lr=0.01" else {})}))
        paths[variant] = [str(path)]
    out = tmp_path / "select" / "scratch.json"
    with pytest.raises(DataError, match=f"{key} is ") as caught:
        write_selection("scratch", paths, out)
    assert caught.value.path == paths["+lr=0.01"][0]
    assert not out.exists()


def test_chosen_train_files_and_a_selection_of_another_regime(tmp_path):
    selection = tmp_path / "full_finetune.json"
    selection.write_text(json.dumps({"regime": "full_finetune", "chosen": "+lr=0.1"}))
    weights, summary = chosen_train_files(selection, tmp_path / "train", "full_finetune", "+seed=2")
    assert weights == tmp_path / "train" / "full_finetune+seed=2+lr=0.1" / "weights.safetensors"
    assert summary.name == "summary.json" and summary.parent == weights.parent
    with pytest.raises(DataError, match="not for 'scratch'"):
        chosen_train_files(selection, tmp_path / "train", "scratch", "")
