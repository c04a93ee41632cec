"""The systems section: histories of `<regime>+system=<name>[+seed=N]` jobs -> the table
(final validation top-1 over the seeds with its interval, bytes, communication rounds) and
the curves figure."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finegrained.errors import ConfigError
from finegrained.fileio import sha256_file
from finegrained.plan import protocol, regimes, variants
from finegrained.plan.schema import validate_config
from finegrained.report import systems


def _history(root, job, val, rounds_per_step, param_bytes):
    rows = {"phase": ["main", "main"], "epoch": [1, 2], "step": [8, 16],
            "train_loss": [1.0, 0.5], "val_top1": [val - 0.1, val], "val_loss": [1.2, 0.9],
            "param_bytes": [param_bytes] * 2, "opt_state_bytes": [2 * param_bytes] * 2,
            "communication_rounds": [8 // rounds_per_step, 16 // rounds_per_step],
            "seconds": [0.8, 0.8]}      # per epoch: 0.1 s a step
    (root / job).mkdir(parents=True)
    pq.write_table(pa.table(rows), root / job / "history.parquet")
    (root / job / "summary.json").write_text(json.dumps(
        {"history_sha256": sha256_file(root / job / "history.parquet")}))


def test_table_and_figure_from_the_histories(tmp_path):
    for variant, vals in (("", (0.80, 0.70)), ("+seed=1", (0.90, 0.72)), ("+seed=2", (0.85, 0.74))):
        _history(tmp_path, f"full_finetune{variant}+system=sync", vals[0], 1, 400)
        _history(tmp_path, f"full_finetune{variant}+system=local_sgd_h4", vals[1], 4, 400)
    histories = systems.collect(tmp_path, ["full_finetune"], ["sync", "local_sgd_h4"],
                                ["", "+seed=1", "+seed=2"])
    rows = systems.summary_rows(histories)
    assert [r["system"] for r in rows] == ["sync", "local_sgd_h4"]
    sync, local = rows
    assert sync["val_top1"]["n"] == 3
    assert sync["val_top1"]["mean"] == pytest.approx(0.85)
    assert sync["val_top1"]["std"] == pytest.approx(0.05)
    # t(0.975, 2) = 4.303: half-width 4.303 * 0.05 / sqrt(3)
    assert sync["val_top1"]["ci95_high"] - 0.85 == pytest.approx(4.3027 * 0.05 / 3 ** 0.5, rel=1e-3)
    assert (sync["communication_rounds"], local["communication_rounds"]) == (16, 4)
    assert local["seconds_per_step"] == pytest.approx(0.1)
    text = systems.markdown(rows)
    assert "| full_finetune | local_sgd_h4 | 3 | 72.0 ± 2.0 [67.0, 77.0] |" in text
    systems.curves(histories, tmp_path / "fig" / "systems")
    assert (tmp_path / "fig" / "systems.png").stat().st_size > 0
    assert (tmp_path / "fig" / "systems.svg").exists()


def test_system_variants_name_a_system_and_set_its_keys():
    config = validate_config({"regimes": ["linear_probe", "full_finetune"], "systems": {
        "bf16_sr": {"precision": {"params": "bfloat16", "rounding": "stochastic"}}}})
    assert protocol.system_variants(config, "linear_probe") == []
    assert protocol.system_variants(config, "full_finetune") == ["+system=bf16_sr"]
    assert variants.join_variants("+system=bf16_sr", "+seed=2") == "+seed=2+system=bf16_sr"
    settings = regimes.job_settings(config, "full_finetune", "+seed=2+system=bf16_sr")
    train = settings["phases"][-1]["train_settings"]
    assert train["precision"] == {"params": "bfloat16", "rounding": "stochastic",
                                  "opt_state": "float32"}
    assert train["parallel"]["mode"] == "sync"
    plain = regimes.job_settings(config, "full_finetune", "+seed=2")
    assert plain["config_hash"] != settings["config_hash"]
    with pytest.raises(ConfigError, match="not among systems"):
        regimes.job_settings(config, "full_finetune", "+system=other")
