"""A job that asks for GPUs runs on GPUs or stops before reading data, saying why
(finegrained.devices); GPU rules on the CPU only on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from finegrained import devices, launch
from finegrained.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class FakeDevice:
    platform: str
    id: int = 0

    def __str__(self):
        return f"{self.platform.upper()}Device(id={self.id})"


def test_a_gpu_job_without_a_gpu_stops_naming_job_devices_and_the_install():
    with pytest.raises(ConfigError) as caught:
        devices.check_backend(1, job="train.py", devices=[FakeDevice("cpu")], log=None)
    message = str(caught.value)
    assert "train.py asks for 1 GPU(s)" in message
    assert "found 1 x cpu (CPUDevice(id=0))" in message
    assert "make install GPU=cuda12" in message and "resources.train.allow_cpu: true" in message


def test_allow_cpu_runs_it_on_the_cpu_and_says_so():
    lines = []
    assert devices.check_backend(1, allow_cpu=True, job="pretrain.py",
                                 devices=[FakeDevice("cpu")], log=lines.append) == "cpu"
    assert lines and "pretrain" in lines[0] and "on purpose" in lines[0]


def test_enough_gpus_or_no_gpu_asked_for_pass_quietly():
    lines = []
    two = [FakeDevice("gpu", 0), FakeDevice("gpu", 1)]
    assert devices.check_backend(2, devices=two, log=lines.append) == "gpu"
    assert devices.check_backend(0, devices=[FakeDevice("cpu")], log=lines.append) == "cpu"
    assert lines == []
    with pytest.raises(ConfigError, match="asks for 3 GPU"):
        devices.check_backend(3, devices=two, log=None)


def _through_the_launcher(tmp_path, *flags, environ=None):
    """A job started as the workflow starts it: the launcher, then a script whose main runs
    on devices (``job_runner.runs_on_devices``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINEGRAINED_", "SLURM_"))
           and k not in ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS")}
    env.update({"PYTHONPATH": str(REPO / "src"), launch.IDS_VAR: "0",
                launch.LOCK_DIR_VAR: str(tmp_path / "locks"), **(environ or {})})
    script = tmp_path / "job.py"
    script.write_text(
        "import argparse, sys\nimport jax\nfrom finegrained import job_runner\n"
        "@job_runner.runs_on_devices(argparse.ArgumentParser().parse_args)\n"
        "def main(args):\n    print('ran on', jax.default_backend(), jax.config.jax_platforms)\n"
        "sys.exit(main([]))\n")
    return subprocess.run([sys.executable, "-m", "finegrained.launch", *flags, "--",
                           sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_launcher_tells_the_job_what_its_rule_asked_for(tmp_path):
    """This machine's JAX is the CPU build: a GPU rule stops with the message, unless CPU
    use is allowed; a gpu 0 job runs with JAX_PLATFORMS=cpu."""
    refused = _through_the_launcher(tmp_path, "--gpus", "1")
    assert refused.returncode == 1 and "ran on" not in refused.stdout
    assert "error: job.py asks for 1 GPU(s)" in refused.stderr, refused.stderr
    allowed = _through_the_launcher(tmp_path, "--gpus", "1",
                                    environ={launch.ALLOW_CPU_VAR: "1"})
    assert allowed.returncode == 0 and "ran on cpu" in allowed.stdout, allowed.stderr
    assert "on the CPU on purpose" in allowed.stdout
    cpu = _through_the_launcher(tmp_path, "--gpus", "0")
    assert cpu.returncode == 0 and cpu.stdout.strip().endswith("ran on cpu cpu"), cpu.stderr
