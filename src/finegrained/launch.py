"""The device launcher of every JAX job: ``python -m finegrained.launch --gpus N -- CMD``.

Snakemake counts the ``gpu`` resource (``--resources gpu=4``) but never tells a job which
device is its own, and JAX in every job would see, and preallocate most of, every GPU. This
launcher leases ``N`` device ids for the lifetime of ``CMD``, sets ``CUDA_VISIBLE_DEVICES``
to them before JAX starts, and ``exec``s ``CMD`` in its own process.

A lease is an exclusive ``flock`` on one file per id slot under the lock directory. The
file descriptors are inherited through ``exec``, so the lock lasts exactly as long as the
job's process (and any child it forks): normal exit, crash or ``kill -9``, the kernel
releases it; there is no stale lock to clean up.

- The ids jobs share: ``$FINEGRAINED_GPU_IDS`` (comma-separated; an id listed twice gives
  two jobs a share of that GPU each), else ``$CUDA_VISIBLE_DEVICES`` as Snakemake was started
  with (under ``salloc``/``sbatch``: the GPUs SLURM granted), else SLURM's
  ``$SLURM_STEP_GPUS`` / ``$SLURM_JOB_GPUS``, else one per GPU that ``nvidia-smi -L`` lists.
  None (a CPU-only machine): the job runs as it is.
- Inside a SLURM allocation the leases are among the GPUs SLURM granted, one set per job,
  with locks of that allocation only (``.../slurm-<job id>/``): the ids of two allocations
  on one node may both read ``0``. A job the SLURM executor submitted has an allocation of
  its own with exactly its GPUs, so it keeps what SLURM gave it.
- The lock directory is the user's own (``$TMPDIR/finegrained-gpus-<uid>``, created 0700,
  refused when another user owns it or can write it), and a lock file that is a symbolic
  link is refused (``O_NOFOLLOW``): no other user can plant one.
- ``--gpus 0`` hides every GPU (``CUDA_VISIBLE_DEVICES=``, ``JAX_PLATFORMS=cpu``), so a CPU
  job of a CUDA JAX install takes no GPU memory.
- Memory: ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (allocate as needed, so jobs sharing a GPU
  still run), or ``--mem-fraction F`` preallocates that fraction of each visible GPU.
- ``--allow-cpu``: what the job's backend check permits
  (:func:`finegrained.devices.check_backend`, told through ``$FINEGRAINED_GPUS``,
  ``$FINEGRAINED_ALLOW_CPU``, and ``$FINEGRAINED_JOB``: the job's script, for its message).
- ``--compilation-cache DIR``: JAX's persistent compilation cache, shared by the jobs of a
  run (``$JAX_COMPILATION_CACHE_DIR``; a size bound, so reads and writes take its file
  lock and jobs writing it at the same time are safe).
- ``--xla-flags``: appended to ``$XLA_FLAGS``.
- The options but ``--gpus`` default to ``$FINEGRAINED_ALLOW_CPU``,
  ``$FINEGRAINED_GPU_MEM_FRACTION``, ``$FINEGRAINED_COMPILATION_CACHE`` and
  ``$FINEGRAINED_XLA_FLAGS``, which the workflow exports for every job.

Several tasks (``--nodes N --tasks-per-node K``, a training rule's
``resources.train.nodes`` / ``tasks_per_node``): ``N x K`` processes of ``CMD`` joined into
one data-parallel run by :mod:`finegrained.distributed`, each leasing ``--gpus`` GPUs:

- in a SLURM allocation, outside a job step (the batch script the SLURM executor plugin
  runs an "MPI" job's command in, or a shell of ``salloc``): ``exec srun`` of this same
  command line as ``N x K`` tasks (``--kill-on-bad-exit``: one failing task ends them all,
  srun's exit code is the job's), with the node's GPUs (``--gres=gpu:K*gpus``);
- in the job step srun started (``SLURM_NTASKS`` is ``N x K``): this process is one task; it
  leases its GPUs among the step's and ``exec``s ``CMD``, which joins the others through
  JAX's SLURM detection (``JAX_LOCAL_DEVICE_IDS`` names the leased GPUs, where JAX would
  take the one numbered by ``SLURM_LOCALID``);
- otherwise, on this machine (``N`` must be 1): ``K`` child processes with
  ``JAX_COORDINATOR_ADDRESS`` (a free local port), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``, their GPUs leased in one go and split among them. The launcher waits
  for all: a SIGTERM (or SIGINT, SIGHUP) it gets goes to every task as a SIGTERM (they
  checkpoint at the same step and stop); when one task fails the others are given a few
  seconds to end, then killed; the first failure's exit code is the job's; a task whose
  launcher dies is killed by the kernel (``PR_SET_PDEATHSIG``), so none is left behind.

Standard library only: it runs in any of the workflow's environments before JAX exists.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

IDS_VAR = "FINEGRAINED_GPU_IDS"
LOCK_DIR_VAR = "FINEGRAINED_GPU_LOCK_DIR"
JOB_VAR, GPUS_VAR, ALLOW_CPU_VAR = "FINEGRAINED_JOB", "FINEGRAINED_GPUS", "FINEGRAINED_ALLOW_CPU"
#: The launcher's defaults from the environment the workflow exports for every job
#: (finegrained.plan.resources.device_environment): changing them reruns nothing.
MEM_FRACTION_VAR = "FINEGRAINED_GPU_MEM_FRACTION"
CACHE_VAR = "FINEGRAINED_COMPILATION_CACHE"
XLA_FLAGS_VAR = "FINEGRAINED_XLA_FLAGS"
#: Bound of the compilation cache, bytes. Any bound turns on JAX's file lock around cache
#: reads and writes (without one, a reader can meet a half-written entry).
CACHE_MAX_BYTES = 32 * 2 ** 30


class LeaseError(RuntimeError):
    """The lock directory or a lock file cannot be trusted, or too few GPUs exist."""


def _split_ids(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def machine_gpu_ids(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The device ids jobs on this machine (or in this allocation) share; see the module
    docstring for the order."""
    if IDS_VAR in environ:
        return _split_ids(environ[IDS_VAR])
    if "CUDA_VISIBLE_DEVICES" in environ:
        return _split_ids(environ["CUDA_VISIBLE_DEVICES"])
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(var):
            return _split_ids(environ[var])
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def default_lock_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The user's own lock directory; inside a SLURM allocation, that allocation's (and
    inside a job step, that step's: SLURM gives each step GPUs of its own, which may be
    numbered from 0 in each)."""
    if environ.get(LOCK_DIR_VAR):
        base = Path(environ[LOCK_DIR_VAR])
    else:
        base = Path(tempfile.gettempdir()) / f"finegrained-gpus-{os.getuid()}"
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return base
    step = environ.get("SLURM_STEP_ID")
    return base / (f"slurm-{job}" + (f".{step}" if step else ""))


def _private_dir(path: Path) -> None:
    """Create ``path`` (and any missing parent) 0700, or check that it is ours: a real
    directory, owned by this user, writable by no one else."""
    if not os.path.lexists(path):
        if not os.path.lexists(path.parent):
            _private_dir(path.parent)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise LeaseError(f"GPU lock directory {path} is not a directory (a symbolic link?): "
                         f"refused; remove it or set {LOCK_DIR_VAR}")
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise LeaseError(f"GPU lock directory {path} belongs to uid {info.st_uid} with mode "
                         f"{stat.filemode(info.st_mode)}: others could plant locks there; "
                         f"refused; set {LOCK_DIR_VAR} to a folder of your own")


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LeaseError(f"GPU lock file {path} is a symbolic link: refused") from None
        raise


def lock_name(slot: int, device_id: str) -> str:
    """The lock file of one id slot. A device id may hold characters a file name cannot (a
    MIG instance ``MIG-GPU-<uuid>/1/0`` holds '/'): each such character is written ``%XX``,
    so distinct ids keep distinct names."""
    safe = re.sub(r"[^A-Za-z0-9._-]", lambda m: "".join(f"%{b:02X}" for b in m[0].encode()),
                  device_id)
    return f"slot{slot}-gpu{safe}.lock"


def try_lease(ids: Sequence[str], count: int, lock_dir: Path) -> tuple[list[str], list[int]]:
    """Lock ``count`` free slots (distinct devices first); ``([], [])`` when too few are free.
    Returns the leased ids and the open, locked file descriptors that hold them."""
    _private_dir(lock_dir)
    chosen: list[str] = []
    fds: list[int] = []
    order = sorted(range(len(ids)), key=lambda slot: ids[:slot].count(ids[slot]))
    for slot in order:
        if len(chosen) == count:
            break
        if ids[slot] in chosen:
            continue
        fd = _open_lock(lock_dir / lock_name(slot, ids[slot]))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())   # for a curious human: who holds it
        chosen.append(ids[slot])
        fds.append(fd)
    if len(chosen) < count:
        for fd in fds:
            os.close(fd)
        return [], []
    return chosen, fds


def lease(ids: Sequence[str], count: int, lock_dir: Path, *, poll_s: float = 2.0,
          timeout_s: float | None = None, log=None) -> tuple[list[str], list[int]]:
    """Wait until ``count`` of ``ids`` are free and lease them (see :func:`try_lease`)."""
    if count > len(set(ids)):
        raise LeaseError(f"a job asks for {count} GPUs, the machine has {len(set(ids))} "
                         f"({IDS_VAR}={','.join(ids)})")
    start = time.monotonic()
    waited = False
    while True:
        chosen, fds = try_lease(ids, count, lock_dir)
        if chosen:
            return chosen, fds
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no {count} free GPU(s) among {ids} after {timeout_s} s")
        if log and not waited:
            log(f"waiting for {count} free GPU(s) among {','.join(ids)} (locks in {lock_dir})")
            waited = True
        time.sleep(poll_s)


def memory_env(mem_fraction: float | None) -> dict[str, str]:
    """JAX's GPU memory policy: allocate on demand, or preallocate a fraction."""
    if mem_fraction is None:
        return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "true",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{mem_fraction:g}"}


def cache_env(directory: str | os.PathLike) -> dict[str, str]:
    """JAX's persistent compilation cache in ``directory`` (made absolute: jobs of a cluster
    run may start elsewhere), every compilation kept, reads and writes under its lock."""
    return {"JAX_COMPILATION_CACHE_DIR": os.path.abspath(directory),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
            "JAX_COMPILATION_CACHE_MAX_SIZE": str(CACHE_MAX_BYTES)}


def job_environment(count: int, *, mem_fraction: float | None = None,
                    environ: Mapping[str, str] = os.environ, lock_dir: Path | None = None,
                    poll_s: float = 2.0, log=None) -> tuple[dict[str, str], list[int]]:
    """The environment of a job that uses ``count`` GPUs, and the lock descriptors to keep
    open for its lifetime."""
    env = dict(environ)
    env.update(memory_env(mem_fraction))
    env[GPUS_VAR] = str(count)
    if count == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
        return env, []
    ids = machine_gpu_ids(environ)
    if not ids:
        if log:
            log(f"no GPU ids on this machine ({IDS_VAR} unset, no nvidia-smi): running without")
        return env, []
    lock_dir = lock_dir or default_lock_dir(environ)
    chosen, fds = lease(ids, count, lock_dir, poll_s=poll_s, log=log)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    if log:
        where = (f"SLURM job {environ['SLURM_JOB_ID']}'s GPUs {','.join(ids)}"
                 if environ.get("SLURM_JOB_ID") else f"GPUs {','.join(ids)}")
        log(f"GPU(s) {env['CUDA_VISIBLE_DEVICES']} of {where} leased for pid {os.getpid()}")
    return env, fds


# ---------------------------------------------------------------------------- several tasks

COORDINATOR_VAR, NUM_PROCESSES_VAR, PROCESS_ID_VAR = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
LOCAL_DEVICE_IDS_VAR = "JAX_LOCAL_DEVICE_IDS"
#: Seconds the other tasks have to end by themselves once one has failed, before they are
#: killed (after a SIGTERM the launcher passed on: while they may still checkpoint).
FAILED_GRACE_S, STOPPING_GRACE_S = 2.0, 120.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def task_route(nodes: int, per_node: int, environ: Mapping[str, str] = os.environ) -> str:
    """How a job of ``nodes x per_node`` tasks starts here: ``"one"`` (a single task),
    ``"srun"`` (in a SLURM allocation, outside a step: start the tasks with srun), ``"task"``
    (one of the tasks srun started), ``"local"`` (start them on this machine). Raises
    :class:`LeaseError` for several nodes outside SLURM."""
    total = nodes * per_node
    if total == 1:
        return "one"
    if environ.get("SLURM_JOB_ID"):
        if "SLURM_STEP_ID" not in environ:
            return "srun"
        if environ.get("SLURM_NTASKS") == str(total):
            return "task"
    if nodes > 1:
        raise LeaseError(f"this job spans {nodes} nodes (resources.train.nodes: {nodes}), which "
                         f"needs SLURM: run Snakemake with --profile profiles/slurm, or inside "
                         f"an allocation of {nodes} nodes; on one machine set "
                         f"resources.train.nodes: 1")
    return "local"


def srun_command(nodes: int, per_node: int, gpus: int, cpus_per_task: int | None,
                 argv: Sequence[str]) -> list[str]:
    """srun of this launcher (``argv``: its own arguments) as ``nodes x per_node`` tasks, with
    ``gpus x per_node`` GPUs per node (by ``--gres``, which every SLURM knows), one failing
    task ending the step."""
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes * per_node}",
            f"--ntasks-per-node={per_node}", "--kill-on-bad-exit=1",
            *([f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []),
            *([f"--gres=gpu:{gpus * per_node}"] if gpus else []),
            sys.executable, "-m", "finegrained.launch", *argv]


def free_port() -> int:
    """A TCP port of this machine no one listens on now (for the local coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def task_environments(tasks: int, count: int, **kwargs) -> list[tuple[dict[str, str], list[int]]]:
    """The environment and lease descriptors of each of ``tasks`` local tasks of ``count``
    GPUs: the ``tasks x count`` GPUs leased at once (two jobs never each hold a part of what
    both wait for), then split in order. ``kwargs``: those of :func:`job_environment`."""
    env, fds = job_environment(tasks * count, **kwargs)
    ids = _split_ids(env.get("CUDA_VISIBLE_DEVICES", "")) if count else []
    out = []
    for i in range(tasks):
        task = dict(env)
        task[GPUS_VAR] = str(count)
        if ids:
            task["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i * count:(i + 1) * count])
        out.append((task, fds[i * count:(i + 1) * count] if ids else []))
    return out


def local_device_ids(env: Mapping[str, str]) -> dict[str, str]:
    """``JAX_LOCAL_DEVICE_IDS`` for a task's leased GPUs (all that ``CUDA_VISIBLE_DEVICES``
    shows it), so that no cluster detection of JAX narrows them to one; nothing without."""
    visible = _split_ids(env.get("CUDA_VISIBLE_DEVICES", ""))
    return {LOCAL_DEVICE_IDS_VAR: ",".join(map(str, range(len(visible))))} if visible else {}


def _end_with_parent() -> None:     # pragma: no cover - runs in the child before exec
    """In a task, before exec: the kernel kills it when the launcher dies (Linux)."""
    parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def exit_code(returncode: int) -> int:
    """A child's ``returncode`` as a shell reports it (128 + N for a signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def run_local_tasks(command: Sequence[str], envs: Sequence[tuple[dict[str, str], list[int]]],
                    log) -> int:
    """Start one process of ``command`` per ``(environment, lease descriptors)``, joined by
    the explicit coordinator variables; wait for all; return the job's exit code (see the
    module docstring)."""
    address = f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):     # every task checkpoints and stops (SIGTERM)
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        for i, (env, fds) in enumerate(envs):
            env = {**env, **local_device_ids(env), COORDINATOR_VAR: address,
                   NUM_PROCESSES_VAR: str(len(envs)), PROCESS_ID_VAR: str(i)}
            procs.append(subprocess.Popen(list(command), env=env, pass_fds=fds,
                                          preexec_fn=_end_with_parent))
            for fd in fds:
                os.close(fd)   # the task holds its lease now
        log(f"{len(procs)} tasks on this machine (coordinator {address}): pids "
            f"{', '.join(str(p.pid) for p in procs)}")
        return _supervise(procs, received, log)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _supervise(procs: Sequence[subprocess.Popen], received: list[int], log) -> int:
    failed: tuple[int, int] | None = None
    deadline = None
    while [p.poll() for p in procs].count(None):
        if failed is None:
            failed = next(((i, p.returncode) for i, p in enumerate(procs)
                           if p.returncode not in (None, 0)), None)
            if failed is not None:
                grace = STOPPING_GRACE_S if received else FAILED_GRACE_S
                deadline = time.monotonic() + grace
                log(f"task {failed[0]} of {len(procs)} ended with exit code "
                    f"{exit_code(failed[1])}: the others end too")
        if deadline is not None and time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            break
        time.sleep(0.1)
    for proc in procs:
        proc.wait()
    if failed is None:
        failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    return 0 if failed is None else exit_code(failed[1])


def job_name(command: Sequence[str]) -> str:
    """What the job's messages call it: its script (``train.py``), else its program."""
    script = next((arg for arg in command if arg.endswith(".py")), command[0])
    return Path(script).name


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> None:
    env_default = environ.get
    p = argparse.ArgumentParser(prog="python -m finegrained.launch",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, required=True, help="GPUs the job uses (0: none)")
    p.add_argument("--allow-cpu", action="store_true", default=env_default(ALLOW_CPU_VAR) == "1",
                   help=f"a job that asks for GPUs may run on the CPU (${ALLOW_CPU_VAR}=1)")
    p.add_argument("--mem-fraction", type=float,
                   default=float(env_default(MEM_FRACTION_VAR) or 0) or None,
                   help=f"preallocate this fraction of each GPU (${MEM_FRACTION_VAR}; "
                        f"default: no preallocation)")
    p.add_argument("--compilation-cache", default=env_default(CACHE_VAR) or None,
                   help=f"JAX's persistent compilation cache folder (${CACHE_VAR}; default: none)")
    p.add_argument("--xla-flags", default=env_default(XLA_FLAGS_VAR, ""),
                   help=f"added to XLA_FLAGS (${XLA_FLAGS_VAR})")
    p.add_argument("--nodes", type=int, default=1,
                   help="machines the job's tasks span (above 1: in a SLURM allocation only)")
    p.add_argument("--tasks-per-node", type=int, default=1,
                   help="processes per machine, joined into one run; each leases --gpus GPUs")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs of each task started by srun")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the job's command line")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given after --")
    if min(args.nodes, args.tasks_per_node) < 1:
        p.error("--nodes and --tasks-per-node count from 1")

    def log(message):
        print(f"[finegrained.launch] {message}", file=sys.stderr, flush=True)

    try:
        route = task_route(args.nodes, args.tasks_per_node, environ)
        if route == "srun":
            srun = srun_command(args.nodes, args.tasks_per_node, args.gpus, args.cpus_per_task,
                                argv)
            log(" ".join(srun[:srun.index(sys.executable)]) + " ...")
            try:
                os.execvpe(srun[0], srun, dict(environ))
            except OSError as exc:
                raise LeaseError(f"cannot start the job's {args.nodes * args.tasks_per_node} "
                                 f"tasks with srun in SLURM job {environ['SLURM_JOB_ID']}: "
                                 f"{exc.strerror}") from None
        tasks = args.tasks_per_node if route == "local" else 1
        envs = task_environments(tasks, args.gpus, mem_fraction=args.mem_fraction, log=log,
                                 environ=environ)
    except LeaseError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    for env, _ in envs:
        env.update({JOB_VAR: job_name(command), ALLOW_CPU_VAR: "1" if args.allow_cpu else "0"})
        if args.compilation_cache:
            env.update(cache_env(args.compilation_cache))
        if args.xla_flags:
            env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), args.xla_flags]))
        if route == "task":
            env.update(local_device_ids(env))
    if route == "local":
        sys.exit(run_local_tasks(command, envs, log))
    [(env, fds)] = envs
    for fd in fds:
        os.set_inheritable(fd, True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
