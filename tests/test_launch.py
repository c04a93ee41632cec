"""The local GPU leases of ``python -m finegrained.launch``, with fake device ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finegrained import launch
from helpers.processes import stop_all

REPO = Path(__file__).resolve().parents[1]

# The job: report its devices and memory policy, then hold them until told to stop.
HOLD = ("import os, sys, time, pathlib; out = pathlib.Path(sys.argv[1]);"
        "out.write_text(os.environ['CUDA_VISIBLE_DEVICES'] + ' '"
        " + os.environ['XLA_PYTHON_CLIENT_PREALLOCATE']);"
        "stop = out.with_suffix('.stop')\n"
        "while not stop.exists(): time.sleep(0.05)")


def _env(tmp_path, ids, **extra):
    """The launcher's environment: ``ids`` as the machine's, ``extra`` on top (None drops)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", launch.IDS_VAR)}
    env.update({launch.IDS_VAR: ids, launch.LOCK_DIR_VAR: str(tmp_path / "locks"),
                "PYTHONPATH": str(REPO / "src")}, **extra)
    return {k: v for k, v in env.items() if v is not None}


def _start(tmp_path, name, ids, count=1, **extra):
    out = tmp_path / f"{name}.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "finegrained.launch", "--gpus", str(count), "--",
         sys.executable, "-c", HOLD, str(out)],
        env=_env(tmp_path, ids, **extra), stderr=subprocess.PIPE, text=True)
    return proc, out


def _devices(out, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (out.exists() and out.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.05)
    devices, preallocate = out.read_text().split(" ")
    return devices


def _stop(out, proc):
    out.with_suffix(".stop").touch()
    proc.wait(timeout=30)


def test_concurrent_jobs_never_share_an_id_and_a_killed_jobs_ids_come_back(tmp_path):
    jobs = [_start(tmp_path, f"job{i}", "0,1,2,3") for i in range(4)]
    held = [_devices(out, proc) for proc, out in jobs]
    assert sorted(held) == ["0", "1", "2", "3"]

    waiting, waiting_out = _start(tmp_path, "waiting", "0,1,2,3")
    time.sleep(1.0)
    assert not waiting_out.exists(), "a fifth job got a GPU while four were leased"

    victim, victim_out = jobs[2]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert _devices(waiting_out, waiting) == held[2]

    for proc, out in [*jobs[:2], jobs[3], (waiting, waiting_out)]:
        _stop(out, proc)


def test_a_multi_gpu_job_gets_distinct_devices_and_a_shared_gpu_is_shared_by_slots(tmp_path):
    two, two_out = _start(tmp_path, "two", "0,1,2", count=2)
    assert sorted(_devices(two_out, two).split(",")) == ["0", "1"]
    _stop(two_out, two)
    # 0 listed twice: two jobs share GPU 0 (the second only once GPU 1 is taken).
    a, a_out = _start(tmp_path, "a", "0,1,0")
    b, b_out = _start(tmp_path, "b", "0,1,0")
    c, c_out = _start(tmp_path, "c", "0,1,0")
    assert sorted(_devices(o, p) for p, o in [(a, a_out), (b, b_out), (c, c_out)]) == ["0", "0", "1"]
    for p, o in [(a, a_out), (b, b_out), (c, c_out)]:
        _stop(o, p)


def test_mig_instance_ids_with_slashes_are_leased(tmp_path):
    """A MIG instance id of the older form holds '/', which a lock file name cannot: two
    jobs each lease one instance, and the lock files sit in the lock directory itself."""
    gpu = "MIG-GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f"
    ids = f"{gpu}/1/0,{gpu}/2/0"
    a, a_out = _start(tmp_path, "a", ids)
    b, b_out = _start(tmp_path, "b", ids)
    assert sorted([_devices(a_out, a), _devices(b_out, b)]) == ids.split(",")
    locks = sorted(p.name for p in (tmp_path / "locks").iterdir())
    assert locks == ["slot0-gpuMIG-GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f%2F1%2F0.lock",
                     "slot1-gpuMIG-GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f%2F2%2F0.lock"]
    for proc, out in [(a, a_out), (b, b_out)]:
        _stop(out, proc)


def test_jobs_inside_an_allocation_lease_among_the_gpus_slurm_granted(tmp_path):
    """Under salloc/sbatch with GPUs 2 and 3 granted, Snakemake's local jobs share those
    two, one each, with locks of that allocation only."""
    granted = {"SLURM_JOB_ID": "4711", "CUDA_VISIBLE_DEVICES": "2,3"}
    allocation = {**granted, launch.IDS_VAR: None}       # no FINEGRAINED_GPU_IDS
    jobs = [_start(tmp_path, f"job{i}", None, **allocation) for i in range(2)]
    held = [_devices(out, proc) for proc, out in jobs]
    assert sorted(held) == ["2", "3"]
    waiting, waiting_out = _start(tmp_path, "waiting", None, **allocation)
    time.sleep(1.0)
    assert not waiting_out.exists(), "a third job got a GPU while both were leased"
    _stop(jobs[0][1], jobs[0][0])
    assert _devices(waiting_out, waiting) == held[0]
    for proc, out in (jobs[1], (waiting, waiting_out)):
        _stop(out, proc)
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["slurm-4711"]
    # Another allocation on the node has its own locks, though its ids also read 2 and 3.
    env, fds = launch.job_environment(2, environ={**granted, "SLURM_JOB_ID": "4712"},
                                    lock_dir=launch.default_lock_dir(
                                        {launch.LOCK_DIR_VAR: str(tmp_path / "locks"),
                                         "SLURM_JOB_ID": "4712"}))
    assert sorted(env["CUDA_VISIBLE_DEVICES"].split(",")) == ["2", "3"]
    for fd in fds:
        os.close(fd)


def test_granted_ids_come_from_slurm_when_cuda_visible_devices_is_unset():
    assert launch.machine_gpu_ids({"SLURM_JOB_ID": "1", "SLURM_STEP_GPUS": "4,5"}) == ["4", "5"]
    assert launch.machine_gpu_ids({"SLURM_JOB_ID": "1", "SLURM_JOB_GPUS": "6"}) == ["6"]


def test_a_cpu_job_sees_no_gpu_and_runs_jax_on_the_cpu(tmp_path):
    env, fds = launch.job_environment(0, environ={launch.IDS_VAR: "0,1"}, lock_dir=tmp_path)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["JAX_PLATFORMS"] == "cpu" and fds == []
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and env[launch.GPUS_VAR] == "0"
    env, _ = launch.job_environment(0, mem_fraction=0.45, environ={}, lock_dir=tmp_path)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45"


def test_the_lock_directory_is_private_and_a_planted_link_is_refused(tmp_path):
    lock_dir = tmp_path / "a" / "locks"
    chosen, fds = launch.try_lease(["0"], 1, lock_dir)
    assert chosen == ["0"] and (lock_dir.stat().st_mode & 0o777) == 0o700
    assert (lock_dir.parent.stat().st_mode & 0o777) == 0o700
    for fd in fds:
        os.close(fd)
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    planted = tmp_path / "b"
    planted.mkdir(mode=0o700)
    (planted / "slot0-gpu0.lock").symlink_to(target)
    with pytest.raises(launch.LeaseError, match="symbolic link"):
        launch.try_lease(["0"], 1, planted)
    assert target.read_text() == "precious"
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(launch.LeaseError, match="others could plant locks"):
        launch.try_lease(["0"], 1, open_dir)


def test_the_machine_ids_come_from_the_environment_first():
    assert launch.machine_gpu_ids({launch.IDS_VAR: "2, 3", "CUDA_VISIBLE_DEVICES": "0"}) == ["2", "3"]
    assert launch.machine_gpu_ids({"CUDA_VISIBLE_DEVICES": "1,0"}) == ["1", "0"]


def test_asking_for_more_gpus_than_the_machine_has_fails(tmp_path):
    with pytest.raises(launch.LeaseError, match="asks for 3 GPUs"):
        launch.lease(["0", "1"], 3, tmp_path)


CACHED_JOB = """
import jax, jax.numpy as jnp, json, sys
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
jitted = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
jitted(jnp.ones((64, 64))).block_until_ready()
print(json.dumps(events))
"""


def test_the_compilation_cache_is_hit_by_a_second_process(tmp_path):
    """Jobs of a run share one cache through the launcher: the second compiles nothing."""
    cache = tmp_path / "jax_cache"

    def job():
        proc = subprocess.run(
            [sys.executable, "-m", "finegrained.launch", "--gpus", "0",
             "--compilation-cache", str(cache), "--", sys.executable, "-c", CACHED_JOB],
            env=_env(tmp_path, "0"), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        events = json.loads(proc.stdout.strip().splitlines()[-1])
        return sum(e.endswith("/cache_hits") for e in events), sum(
            e.endswith("/cache_misses") for e in events)

    hits, misses = job()                       # compiled, written to the cache
    assert hits == 0 and misses >= 1
    assert len([p for p in cache.iterdir() if p.name.endswith("-cache")]) == misses
    assert job() == (misses, 0)                # read back, nothing compiled


# ---------------------------------------------------------------------------- several tasks

# A task: write what it was told, then end with its code from argv[2] ({process id: code}),
# or wait until told to stop (a file), ending with 1 on SIGTERM after marking it.
TASK = """
import json, os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1]) / f"task{os.environ['JAX_PROCESS_ID']}"
def stopped(signum, frame):
    out.with_suffix(".sigterm").touch()
    sys.exit(1)
signal.signal(signal.SIGTERM, stopped)
keys = ("CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "FINEGRAINED_GPUS")
out.with_suffix(".json").write_text(json.dumps({"pid": os.getpid(),
                                                **{k: os.environ.get(k) for k in keys}}))
code = json.loads(sys.argv[2]).get(os.environ["JAX_PROCESS_ID"])
if code is not None:
    sys.exit(code)
while not out.with_suffix(".stop").exists():
    time.sleep(0.05)
"""


_LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_launcher_left():
    """A launcher a failed test left running is stopped (its tasks go with it)."""
    yield
    stop_all(_LAUNCHED)


def _start_tasks(tmp_path, ids, *, gpus=1, tasks=2, codes=None, **extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "finegrained.launch", "--gpus", str(gpus),
         "--tasks-per-node", str(tasks), "--", sys.executable, "-c", TASK, str(tmp_path),
         json.dumps(codes or {})],
        env=_env(tmp_path, ids, **extra), stderr=subprocess.PIPE, text=True)
    _LAUNCHED.append(proc)
    return proc


def _told(tmp_path, proc, tasks=2, timeout=60.0) -> list[dict]:
    """What each task wrote once all have started."""
    paths = [tmp_path / f"task{i}.json" for i in range(tasks)]
    deadline = time.monotonic() + timeout
    while not all(p.exists() and p.read_text() for p in paths):
        assert time.monotonic() < deadline, "the tasks never started"
        time.sleep(0.05)
    return [json.loads(p.read_text()) for p in paths]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no longer does)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_local_tasks_are_joined_by_the_coordinator_and_split_the_leased_gpus(tmp_path):
    """Two tasks of two GPUs on a four-GPU machine: one coordinator, process ids 0 and 1,
    disjoint GPUs (leased in one go), each told its own count and local device ids."""
    proc = _start_tasks(tmp_path, "0,1,2,3", gpus=2)
    told = _told(tmp_path, proc)
    for i in range(2):
        (tmp_path / f"task{i}.stop").touch()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert [t["JAX_PROCESS_ID"] for t in told] == ["0", "1"]
    assert {t["JAX_NUM_PROCESSES"] for t in told} == {"2"}
    [address] = {t["JAX_COORDINATOR_ADDRESS"] for t in told}
    assert address.startswith("127.0.0.1:") and int(address.split(":")[1]) > 0
    gpus = [t["CUDA_VISIBLE_DEVICES"].split(",") for t in told]
    assert sorted(gpus[0] + gpus[1]) == ["0", "1", "2", "3"]
    assert {t["JAX_LOCAL_DEVICE_IDS"] for t in told} == {"0,1"}
    assert {t["FINEGRAINED_GPUS"] for t in told} == {"2"}
    # On the CPU: no GPU, no device ids.
    (tmp_path / "cpu").mkdir()
    cpu = _start_tasks(tmp_path / "cpu", "0,1", gpus=0)
    told = _told(tmp_path / "cpu", cpu)
    for i in range(2):
        (tmp_path / "cpu" / f"task{i}.stop").touch()
    assert cpu.wait(timeout=60) == 0
    assert [(t["CUDA_VISIBLE_DEVICES"], t["JAX_LOCAL_DEVICE_IDS"]) for t in told] == [("", None)] * 2


def test_one_failing_task_ends_the_job_with_its_code_and_leaves_no_process(tmp_path):
    proc = _start_tasks(tmp_path, "0,1", codes={"1": 3})
    told = _told(tmp_path, proc)
    assert proc.wait(timeout=60) == 3
    assert "task 1 of 2 ended with exit code 3" in proc.stderr.read()
    assert not any(_alive(t["pid"]) for t in told)
    assert not (tmp_path / "task0.sigterm").exists()     # killed, not asked to checkpoint


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_sigterm_to_the_launcher_reaches_every_task(tmp_path, signum):
    """SIGTERM (preemption) or SIGINT: every task gets a SIGTERM, to checkpoint and stop."""
    proc = _start_tasks(tmp_path, "0,1")
    told = _told(tmp_path, proc)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 1
    assert (tmp_path / "task0.sigterm").exists() and (tmp_path / "task1.sigterm").exists()
    assert not any(_alive(t["pid"]) for t in told)


def test_the_tasks_of_a_killed_launcher_are_killed_too(tmp_path):
    proc = _start_tasks(tmp_path, "0,1")
    told = _told(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(_alive(t["pid"]) for t in told):
        assert time.monotonic() < deadline, "a task outlived its launcher"
        time.sleep(0.05)


def test_where_the_tasks_of_a_job_start():
    route = launch.task_route
    assert route(1, 1, {"SLURM_JOB_ID": "7"}) == "one"
    assert route(1, 2, {}) == "local"
    # the batch script of the job (the SLURM plugin drops the step's variables), or salloc
    assert route(2, 4, {"SLURM_JOB_ID": "7"}) == "srun"
    # inside the step srun started: one of its 8 tasks
    assert route(2, 4, {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}) == "task"
    # inside a step of one task (srun --pty bash): this machine's processes
    assert route(1, 2, {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}) == "local"
    with pytest.raises(launch.LeaseError, match=r"spans 2 nodes \(resources.train.nodes: 2\), "
                                                r"which needs SLURM"):
        route(2, 1, {})
    assert launch.srun_command(2, 4, 1, 8, ["--gpus", "1", "--", "python", "x.py"]) == [
        "srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1",
        "--cpus-per-task=8", "--gres=gpu:4", sys.executable, "-m", "finegrained.launch",
        "--gpus", "1", "--", "python", "x.py"]
    assert "--gres" not in " ".join(launch.srun_command(1, 2, 0, None, []))
    # each step of an allocation leases among its own GPUs
    assert launch.default_lock_dir({launch.LOCK_DIR_VAR: "/l", "SLURM_JOB_ID": "7",
                                    "SLURM_STEP_ID": "3"}) == Path("/l/slurm-7.3")


def test_several_nodes_outside_slurm_stop_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "finegrained.launch", "--gpus", "0", "--nodes", "2", "--",
         sys.executable, "-c", "print('ran')"],
        env=_env(tmp_path, "0"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: this job spans 2 nodes") and proc.stderr.count("\n") == 1
