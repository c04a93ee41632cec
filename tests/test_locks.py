"""One running copy per job (finegrained.locks), with real processes: a second copy stops at
once naming the holder, or waits when told to; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finegrained import locks
from finegrained.plan import jobs
from helpers.training import job_inputs, tiny_job_config

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from finegrained import locks\n"
        "with locks.hold(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(float(sys.argv[2]))\n")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != locks.WAIT_VAR}
    return {**env, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}", **extra}


def _holder(folder: Path, seconds: float = 120.0) -> subprocess.Popen:
    """Another process that holds the lock of ``folder`` (as a running job does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)],
                            env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def features_job(tmp_path_factory):
    """The features script's command line on the tiny train split (a real device job)."""
    root = tmp_path_factory.mktemp("locks")
    inputs = job_inputs(root)
    settings = jobs.features(tiny_job_config(linear_probe={}), "train")
    out = root / "features" / "train"
    return out, [sys.executable, str(REPO / "scripts" / "features.py"),
                 "--settings", json.dumps(settings), "--index", str(inputs["train_index"]),
                 "--init-weights", str(inputs["init_weights"]), "--stats", str(inputs["stats"]),
                 "--classes", str(inputs["classes"]), "--out-dir", str(out)]


def test_a_second_copy_stops_at_once_and_a_killed_holders_lock_is_taken_over(features_job):
    """The Snakemake-killed-then-rerun case: the first copy still runs, so the second stops
    with one line naming its PID and host and what to do, and writes nothing; once the
    first is killed with -9 (its lock file left behind), the rerun runs."""
    out, command = features_job
    holder = _holder(out)
    try:
        started = time.monotonic()
        proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: {out}: another copy of this job is running"), line
        assert f"PID {holder.pid} on host {socket.gethostname()}" in line
        assert f"kill {holder.pid}" in line and "resources.train.wait_for_lock" in line
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert locks.lock_path(out).exists()            # left by the killed holder
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "index.json").exists()
    assert not locks.lock_path(out).exists()        # removed by its holder as it ended
    assert time.monotonic() - started < 300


def test_a_copy_told_to_wait_runs_when_the_holder_ends(features_job):
    out, command = features_job
    holder = _holder(out, seconds=4.0)
    proc = subprocess.run(command, env=_env(**{locks.WAIT_VAR: "1"}), capture_output=True,
                          text=True, timeout=300)
    holder.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"waiting for {locks.lock_path(out)}, held by PID {holder.pid}" in proc.stderr
    assert (out / "index.json").exists()


def test_every_job_takes_its_folders_lock_before_anything_else(tmp_path):
    """train/refit (checkpoint folder), pretrain, features and evaluate (output folder)."""
    from finegrained.evaluate.job import run_evaluation
    from finegrained.train.features import run_features_job
    from finegrained.train.job import run_job
    from finegrained.train.pretrain import pretrain

    missing = tmp_path / "missing.json"          # nothing is read before the lock is taken
    calls = {
        "checkpoints": lambda folder: run_job({}, train_index=missing, val_index=missing,
                                              stats=missing, classes=missing, out_dir=tmp_path,
                                              checkpoint_dir=folder),
        "pretrain": lambda folder: pretrain(missing, missing, missing, missing, model={},
                                            settings=None, out_weights=missing,
                                            out_metrics=missing, checkpoint_dir=folder),
        "features": lambda folder: run_features_job({}, shard_index=missing,
                                                    init_weights=missing, stats=missing,
                                                    classes=missing, out_dir=folder),
        "eval": lambda folder: run_evaluation({}, test_index=missing, weights=missing,
                                              classes=missing, train_summary=missing,
                                              out_dir=folder),
    }
    for name, call in calls.items():
        folder = tmp_path / name
        holder = _holder(folder)
        try:
            with pytest.raises(locks.JobRunning, match=f"PID {holder.pid} "):
                call(folder)
        finally:
            holder.terminate()
            holder.wait(timeout=30)


def test_a_lock_file_naming_a_dead_process_does_not_block(tmp_path):
    folder = tmp_path / "checkpoints" / "job"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    path = locks.lock_path(folder)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    with locks.hold(folder) as held:
        assert held == path
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
