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

Standard library only: it runs in any of the workflow's environments before JAX exists.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import re
import shutil
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
    """The user's own lock directory; inside a SLURM allocation, that allocation's."""
    if environ.get(LOCK_DIR_VAR):
        base = Path(environ[LOCK_DIR_VAR])
    else:
        base = Path(tempfile.gettempdir()) / f"finegrained-gpus-{os.getuid()}"
    job = environ.get("SLURM_JOB_ID")
    return base / f"slurm-{job}" if job else base


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
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the job's command line")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given after --")

    def log(message):
        print(f"[finegrained.launch] {message}", file=sys.stderr, flush=True)

    try:
        env, fds = job_environment(args.gpus, mem_fraction=args.mem_fraction, log=log,
                                   environ=environ)
    except LeaseError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    env.update({JOB_VAR: job_name(command), ALLOW_CPU_VAR: "1" if args.allow_cpu else "0"})
    if args.compilation_cache:
        env.update(cache_env(args.compilation_cache))
    if args.xla_flags:
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), args.xla_flags]))
    for fd in fds:
        os.set_inheritable(fd, True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
