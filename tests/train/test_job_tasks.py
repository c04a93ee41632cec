"""A train job of two tasks, as the workflow runs it on one machine: `python -m
finegrained.launch --gpus 0 --tasks-per-node 2 -- python scripts/train.py ...` (two processes
of 2 CPU devices each, joined by the launcher's coordinator) against one process of 4 CPU
devices: the same history within float rounding, files and log lines written once; a SIGTERM
to the launcher checkpoints once and the rerun of two tasks resumes bit-identically; a rerun
of one task is refused, naming both layouts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from finegrained.models.weights import read_tensors
from finegrained.plan import regimes
from finegrained.train.loop import TIMING_FIELDS
from helpers.training import job_inputs, tiny_job_config
from helpers.xla import xla_flags
from helpers.processes import stop_all

REPO = Path(__file__).resolve().parents[2]
LABEL = "full_finetune/main"
EPOCHS = 3          # 3 steps each (48 images, batch 16); the first epoch's end checkpoints


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The job's command line after the launcher's options: the tiny inputs and the full
    fine-tune recipe (crop and flip augmentation, checkpoints at epoch ends only)."""
    root = tmp_path_factory.mktemp("tasks")
    inputs = job_inputs(root)
    config = tiny_job_config(full_finetune={
        "epochs": EPOCHS, "augment": {"crop_area": [0.5, 1.0], "flip": 0.5}})
    config["train"].update(num_devices=None, checkpoint_every_steps=0)
    settings = root / "settings.json"
    settings.write_text(json.dumps(regimes.job_settings(config, "full_finetune")))
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--settings", f"@{settings}",
            "--train-index", str(inputs["train_index"]), "--val-index", str(inputs["val_index"]),
            "--stats", str(inputs["stats"]), "--classes", str(inputs["classes"]),
            "--init-weights", str(inputs["init_weights"])]


_LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True, scope="module")
def _no_launcher_left():
    """A launcher a failed test left running is stopped (its tasks go with it)."""
    yield
    stop_all(_LAUNCHED)


def _start(job, tasks: int, run: Path, checkpoints: Path) -> tuple[subprocess.Popen, Path]:
    """The launcher with ``tasks`` tasks of 4 / tasks CPU devices, its output in a log file
    as the rule's `> {log} 2>&1` puts it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "FINEGRAINED_", "XLA_"))}
    env.update(PYTHONPATH=str(REPO / "src"),
               XLA_FLAGS=xla_flags(4 // tasks),
               FINEGRAINED_GPU_LOCK_DIR=str(run.parent / "gpu-locks"))
    log = run.parent / f"{run.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finegrained.launch", "--gpus", "0", "--tasks-per-node",
             str(tasks), "--", *job, "--checkpoint-dir", str(checkpoints), "--out-dir", str(run)],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    _LAUNCHED.append(proc)
    return proc, log


def _run(job, tasks: int, run: Path, checkpoints: Path) -> tuple[int, str]:
    proc, log = _start(job, tasks, run, checkpoints)
    return proc.wait(timeout=600), log.read_text()


def _history(run: Path) -> list[dict]:
    rows = pq.read_table(run / "history.parquet").to_pylist()
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def runs(job, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for tasks in (1, 2):
        code, log = _run(job, tasks, root / f"tasks{tasks}", root / f"ck{tasks}" / "job")
        assert code == 0, log[-3000:]
        out[tasks] = {"run": root / f"tasks{tasks}", "log": log}
    return out


@pytest.mark.slow(seconds=80)
def test_two_tasks_train_like_one_process_and_only_process_0_writes(runs):
    one, two = (_history(runs[n]["run"]) for n in (1, 2))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [3, 6, 9]
    for got, want in zip(two, one):
        assert got["val_count"] == want["val_count"] == 16
        for key in ("train_loss", "val_loss", "lr"):
            assert abs(got[key] - want[key]) < 1e-5, (key, got[key], want[key])
        assert (got["train_top1"], got["val_top1"]) == (want["train_top1"], want["val_top1"])
    a, b = (read_tensors(runs[n]["run"] / "weights.safetensors") for n in (1, 2))
    assert set(a) == set(b)
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) < 1e-4
    summaries = [json.loads((runs[n]["run"] / "summary.json").read_text()) for n in (1, 2)]
    assert [(s["devices"], s["processes"]) for s in summaries] == [("4 x cpu", 1), ("4 x cpu", 2)]
    # One writer: the outputs once, every log line of the job once.
    assert sorted(p.name for p in runs[2]["run"].iterdir()) == [
        "history.parquet", "summary.json", "weights.safetensors"]
    log = runs[2]["log"]
    assert [int(line.split()[2]) for line in log.splitlines()
            if line.startswith(f"{LABEL} epoch ")] == [1, 2, 3]
    assert log.count("best val top-1") == 1 and not _errors(log)
    assert "[finegrained.launch] 2 tasks on this machine" in log


def _tasks_of(launcher: int) -> list[int]:
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_sigterm_checkpoints_once_and_the_rerun_resumes_bit_identically(job, runs, tmp_path):
    """Both tasks stopped (SIGSTOP) once the first epoch's checkpoint is on disk, the
    launcher SIGTERMed, the tasks let go: they checkpoint once, at the same step of the
    second epoch, and end; a rerun of one task is refused before it reads an array; the
    rerun of two resumes there and ends where the uninterrupted run did, bit for bit."""
    checkpoints = tmp_path / "ck" / "job"
    phase = checkpoints / "0-main"
    proc, log = _start(job, 2, tmp_path / "killed", checkpoints)
    deadline = time.monotonic() + 600
    while not (phase / "3").is_dir():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint of the first epoch"
        time.sleep(0.01)
    tasks = _tasks_of(proc.pid)
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)                  # the launcher passes it on to the stopped tasks
    for pid in tasks:
        os.kill(pid, signal.SIGCONT)
    assert proc.wait(timeout=600) == 1
    text = log.read_text()
    [error] = _errors(text)
    # Stopped in the second epoch (a checkpoint of its own), or between the first epoch's
    # checkpoint and its check for a stop (none more): either way one checkpoint at the stop.
    stopped_at = re.fullmatch(rf"error: {LABEL}: SIGTERM (?:at epoch 2, step (\d); checkpoint "
                              rf"written|during epoch 1; checkpoint written at its end "
                              rf"\(step (3)\)), rerun to resume", error)
    assert stopped_at, text[-3000:]
    step = int(stopped_at[1] or stopped_at[2])
    assert 3 <= step < 6
    assert sorted(int(p.name) for p in phase.iterdir() if p.name.isdigit()) == sorted({3, step})
    assert not any(Path(f"/proc/{pid}").exists() for pid in tasks)

    code, text = _run(job, 1, tmp_path / "one", checkpoints)
    [error] = _errors(text)
    assert code == 1 and error == (
        f"error: {phase}: checkpoint step {step} was written by 2 processes with 4 devices in "
        f"all, this run has 1 process with 4 devices; a run resumes only on the layout that "
        f"wrote it (local SGD keeps a copy of the model per device, and synchronous training "
        f"would not continue bit-identically): rerun with 2 process(es) "
        f"(resources.train.nodes x tasks_per_node) and 4 device(s) in all, or remove {phase} "
        f"to start afresh"), text[-3000:]
    assert sorted(int(p.name) for p in phase.iterdir() if p.name.isdigit()) == sorted({3, step})

    code, text = _run(job, 2, tmp_path / "resumed", checkpoints)
    assert code == 0, text[-3000:]
    assert f"{LABEL}: resumed from checkpoint at step {step}" in text
    assert _history(tmp_path / "resumed") == _history(runs[2]["run"])
    a = read_tensors(tmp_path / "resumed" / "weights.safetensors")
    b = read_tensors(runs[2]["run"] / "weights.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
