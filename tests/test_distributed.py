"""Two JAX processes on localhost (2 CPU devices each, gloo collectives) train like one
process with the same 4 devices and the same global batch: same losses, same weights.

Each run is a subprocess: the device count and the distributed runtime are fixed when jax
first initialises. The two-process run also saves orbax checkpoints collectively and
resumes from them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from finegrained import distributed
from helpers.xla import xla_flags

WORKER = textwrap.dedent('''
    import json, os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    out, ckpt, mode = sys.argv[2], sys.argv[3], sys.argv[4]
    from finegrained import distributed
    multi = distributed.initialize()
    import jax, numpy as np
    from flax import nnx
    from helpers.training import TinyNet, coloured_squares
    from finegrained.train.loop import fit
    from finegrained.train.settings import default_settings
    from helpers.training import crop_and_flip
    from finegrained.train.local_sgd import Parallel

    assert jax.device_count() == 4, jax.devices()
    assert multi == (jax.process_count() == 2)
    settings = default_settings(epochs=2, batch_size=8, eval_batch_size=8, lr=0.05,
                                warmup_epochs=0, weight_decay=1e-4, image_size=20,
                                eval_crop_fraction=1.0, augment=crop_and_flip(crop_area=(0.6, 1.0)),
                                compute_dtype="float32", seed=3, log_every_steps=0,
                                checkpoint_every_steps=2, prefetch_batches=2,
                                parallel=Parallel(mode, 2, True))   # local_sgd: H = 2
    train = coloured_squares(24, seed=0)
    val = coloured_squares(12, seed=1)   # the last eval batch: process 1's rows all padding
    model = TinyNet(4, rngs=nnx.Rngs(0))
    result = fit(model, train, val, settings, log_fn=None, checkpoint_dir=ckpt)
    again = fit(TinyNet(4, rngs=nnx.Rngs(0)), train, val, settings, log_fn=None,
                checkpoint_dir=ckpt)   # resumes at the end from the checkpoint
    params = {"/".join(map(str, k)): np.asarray(v).tolist()
              for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    keep = ("epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_count")
    history = [{k: row[k] for k in keep} for row in result.history]
    resumed = [{k: row[k] for k in keep} for row in again.history]
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "history": history, "resumed": resumed,
                   "params": params}, f)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:        # pragma: no cover - older jaxlib layout
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    env["XLA_FLAGS"] = xla_flags(devices)
    env.update(extra)
    return env


def compare_runs(single: Path, multi: list[Path]) -> float:
    """Assert that the processes' results equal the single process's; the largest
    per-epoch train-loss difference."""
    ref = json.loads(single.read_text())
    runs = [json.loads(p.read_text()) for p in multi]
    assert [r["process"] for r in runs] == list(range(len(multi)))
    assert len(ref["history"]) == 2 and ref["history"][-1]["step"] == 6
    for run in runs:
        assert run["resumed"] == run["history"]      # restored from the shared checkpoint
        for got, want in zip(run["history"], ref["history"]):
            assert got["step"] == want["step"] and got["val_count"] == want["val_count"] == 12
            for key in ("train_loss", "val_loss", "lr"):
                assert abs(got[key] - want[key]) < 1e-5, (key, got[key], want[key])
            assert got["train_top1"] == want["train_top1"]
            assert got["val_top1"] == want["val_top1"]
        worst = max(float(np.max(np.abs(np.asarray(run["params"][k]) - np.asarray(v))))
                    for k, v in ref["params"].items())
        assert worst < 1e-5, worst
    loss_diff = max(abs(a["train_loss"] - b["train_loss"])
                    for a, b in zip(runs[0]["history"], ref["history"]))
    return loss_diff


def test_launch_settings_from_the_environment():
    assert distributed.launch_settings({}) is None
    assert distributed.launch_settings({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}) is None
    # the batch script's own shell: several tasks, but not inside srun
    assert distributed.launch_settings({"SLURM_NTASKS": "2"}) is None
    assert distributed.launch_settings({"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}) == {}
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}
    assert distributed.launch_settings(explicit) == {
        "coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.launch_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


@pytest.mark.slow(seconds=50)
@pytest.mark.parametrize("mode", ["sync", "local_sgd"])
def test_two_processes_train_like_one(tmp_path, mode):
    """Also local SGD: the per-device copies (stacked over the data axis that spans both
    processes) step, average and checkpoint as in one process."""
    if not _gloo_available():
        pytest.skip("this jaxlib has no gloo CPU collectives")
    tests_dir = str(Path(__file__).resolve().parent)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    single = subprocess.run(
        [sys.executable, str(script), tests_dir, str(tmp_path / "single.json"),
         str(tmp_path / "ckpt-single"), mode],
        env=_env(4), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr

    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(script), tests_dir, str(tmp_path / f"multi{i}.json"),
         str(tmp_path / "ckpt-multi"), mode],
        env=_env(2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text

    diff = compare_runs(tmp_path / "single.json",
                        [tmp_path / f"multi{i}.json" for i in range(2)])
    print(f"two processes vs one: max train-loss difference {diff:.3g}")


def test_an_error_every_process_meets_is_printed_once(monkeypatch, capsys):
    """Process 0 prints every expected error; another process stays quiet about one that
    every process meets alike (a preemption, process 0's refusal), and names itself in
    another."""
    from finegrained import job_runner
    from finegrained.errors import DataError
    from finegrained.train.loop import Preempted

    def failing(exc):
        def body():
            raise exc
        return body

    monkeypatch.setattr(job_runner, "_process", lambda: (1, 2))
    assert job_runner.run(failing(Preempted("job: SIGTERM at epoch 1, step 3"))) == 1
    assert job_runner.run(failing(distributed.PeerFailed("process 0 of 2 failed"))) == 1
    assert capsys.readouterr().err == ""
    assert job_runner.run(failing(DataError("a.json", "torn"))) == 1
    assert capsys.readouterr().err == "error: process 1 of 2: a.json: torn\n"
    monkeypatch.setattr(job_runner, "_process", lambda: (0, 2))
    assert job_runner.run(failing(Preempted("job: SIGTERM at epoch 1, step 3"))) == 1
    assert capsys.readouterr().err == "error: job: SIGTERM at epoch 1, step 3\n"


def test_a_batch_the_devices_cannot_split_is_one_error_of_every_process():
    from types import SimpleNamespace

    from finegrained.errors import ConfigError, Everywhere
    from finegrained.train.sharding import check_batch_size

    mesh = SimpleNamespace(devices=np.array([SimpleNamespace(process_index=i // 2)
                                             for i in range(4)]))
    with pytest.raises(ConfigError, match=r"global batch size 6 is not divisible by the 4 "
                                          r"devices of the 'data' mesh axis, in 2 processes; "
                                          r"pick a multiple of 4") as caught:
        check_batch_size(6, mesh)
    assert isinstance(caught.value, Everywhere)
    check_batch_size(8, mesh)
