"""The embedded demo trains and evaluates every transfer regime, each beats chance clearly,
transfer from the pretrained source model beats scratch on the test split, and a train job
killed with -9 mid-epoch resumes through Snakemake to bit-identical weights and history.

About 7 minutes on 2 cores: `make test-demo` runs these (marker `demo`), `make test` the rest;
CI runs both."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from finegrained.train.loop import TIMING_FIELDS

REPO = Path(__file__).resolve().parents[2]
REGIMES = ["linear_probe", "partial_finetune", "full_finetune", "two_stage", "scratch"]


def _snakemake(workdir: Path, *args: str, background: bool = False):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(REPO / "config" / "demo.yaml"), "--cores", "2", *args]
    if background:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=1800)


def _fail_with_logs(proc, workdir: Path):
    logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}"
                     for p in sorted((workdir / "results").rglob("*.log")))
    pytest.fail(f"workflow failed:\n{proc.stderr[-5000:]}\n{logs}")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    proc = _snakemake(workdir, "evaluate")
    if proc.returncode != 0:
        _fail_with_logs(proc, workdir)
    return workdir


@pytest.mark.demo
def test_every_regime_beats_chance_and_transfer_beats_scratch(demo_run):
    """Chance is 0.1 (10 species). The comparison with scratch is made on the 200 test photos:
    the best of 20 epochs' validation top-1 on 40 photos is too noisy (and biased to the regime
    with the most epochs) to order regimes: on an Intel Xeon scratch's best is 0.75 on val and
    the linear probe's 0.70, while on test they are 0.54 and 0.715."""
    val_top1, test_top1 = {}, {}
    for regime in REGIMES:
        summary = json.loads((demo_run / "results/demo/train" / regime / "summary.json").read_text())
        val_top1[regime] = summary["best_val_top1"]
        metrics = json.loads((demo_run / "results/demo/eval" / regime / "metrics.json").read_text())
        assert metrics["n_test"] == 200
        test_top1[regime] = {view: m["top1"] for view, m in metrics["views"].items()}
    chance = 1 / 10
    assert all(v >= chance + 0.3 for v in val_top1.values()), val_top1
    assert all(t["center"] >= chance + 0.3 for t in test_top1.values()), test_top1
    for regime in ("linear_probe", "partial_finetune", "full_finetune", "two_stage"):
        for view in ("center", "ten_crop"):
            assert test_top1[regime][view] > test_top1["scratch"][view] + 0.05, (view, test_top1)


def _comparable(path: Path):
    rows = pq.read_table(path).to_pylist()
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


@pytest.mark.demo
def test_kill_9_mid_epoch_then_rerun_gives_identical_weights_and_history(demo_run):
    out = demo_run / "results/demo/train/full_finetune"
    reference = {name: (out / name).read_bytes() for name in ("weights.safetensors",)}
    reference_history = _comparable(out / "history.parquet")
    reference_summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out)
    checkpoints = demo_run / "results/demo/checkpoints/full_finetune"
    job = _snakemake(demo_run, "results/demo/train/full_finetune/summary.json", background=True)
    try:
        deadline = time.time() + 900
        # wait until an epoch-end checkpoint exists, then kill during a later epoch
        while time.time() < deadline:
            steps = [p for p in checkpoints.rglob("*") if p.is_dir() and p.name.isdigit()]
            if len(steps) >= 1:
                break
            assert job.poll() is None, "the job ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
        time.sleep(1.5)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert not (out / "summary.json").exists()
    assert checkpoints.exists()          # not a declared output: kept for the rerun
    _snakemake(demo_run, "--unlock")
    proc = _snakemake(demo_run, "--rerun-incomplete",
                      "results/demo/train/full_finetune/summary.json")
    if proc.returncode != 0:
        _fail_with_logs(proc, demo_run)
    log = (demo_run / "results/demo/logs/train/full_finetune.log").read_text()
    assert "resumed from checkpoint at step" in log
    assert (out / "weights.safetensors").read_bytes() == reference["weights.safetensors"]
    assert _comparable(out / "history.parquet") == reference_history
    summary = json.loads((out / "summary.json").read_text())
    for key in ("best_epoch", "best_val_top1", "best_val_loss", "config_hash", "best_phase"):
        assert summary[key] == reference_summary[key], key
    assert not checkpoints.exists()
