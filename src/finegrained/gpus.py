"""One GPU per job on a local multi-GPU box: ``python -m finegrained.gpus --count N -- CMD``.

Snakemake counts the ``gpu`` resource (``--resources gpu=4``) but never tells a job which
device is its own, and JAX in every job would see, and preallocate most of, every GPU. This
launcher leases ``N`` device ids for the lifetime of ``CMD``, sets ``CUDA_VISIBLE_DEVICES``
to them before JAX starts, and ``exec``s ``CMD`` in its own process.

A lease is an exclusive ``flock`` on one file per id slot under the lock directory. The
file descriptors are inherited through ``exec``, so the lock lasts exactly as long as the
job's process (and any child it forks): normal exit, crash or ``kill -9``, the kernel
releases it; there is no stale lock to clean up.

- The machine's ids: ``$FINEGRAINED_GPU_IDS`` (comma-separated; an id listed twice gives
  two jobs a share of that GPU each), else ``$CUDA_VISIBLE_DEVICES`` as Snakemake was started
  with, else one per GPU that ``nvidia-smi -L`` lists. None (a CPU-only machine): the job
  runs as it is.
- Under SLURM (``$SLURM_JOB_ID``) the scheduler has already chosen the job's GPUs: the ids
  it set are kept and nothing is locked.
- ``--count 0`` hides every GPU (``CUDA_VISIBLE_DEVICES=``), so a CPU job of a CUDA JAX
  install takes no GPU memory.
- Memory: ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (allocate as needed, so jobs sharing a GPU
  still run), or ``--mem-fraction F`` preallocates that fraction of each visible GPU.

Standard library only: it runs in any of the workflow's environments before JAX exists.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

IDS_VAR = "FINEGRAINED_GPU_IDS"
LOCK_DIR_VAR = "FINEGRAINED_GPU_LOCK_DIR"


def _split_ids(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def machine_gpu_ids(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The device ids jobs on this machine share (see the module docstring)."""
    if IDS_VAR in environ:
        return _split_ids(environ[IDS_VAR])
    if "CUDA_VISIBLE_DEVICES" in environ:
        return _split_ids(environ["CUDA_VISIBLE_DEVICES"])
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def default_lock_dir() -> Path:
    """Shared by every user and run on the machine, so two Snakemake runs do not collide."""
    return Path(os.environ.get(LOCK_DIR_VAR) or Path(tempfile.gettempdir()) / "finegrained-gpus")


def _open_lock_dir(lock_dir: Path) -> None:
    if not lock_dir.is_dir():
        lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock_dir.chmod(0o1777)      # other users' jobs lock here too
        except OSError:
            pass


def try_lease(ids: Sequence[str], count: int, lock_dir: Path) -> tuple[list[str], list[int]]:
    """Lock ``count`` free slots (distinct devices first); ``([], [])`` when too few are free.
    Returns the leased ids and the open, locked file descriptors that hold them."""
    _open_lock_dir(lock_dir)
    chosen: list[str] = []
    fds: list[int] = []
    order = sorted(range(len(ids)), key=lambda slot: ids[:slot].count(ids[slot]))
    for slot in order:
        if len(chosen) == count:
            break
        if ids[slot] in chosen:
            continue
        path = lock_dir / f"slot{slot}-gpu{ids[slot]}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
        raise ValueError(f"a job asks for {count} GPUs, the machine has {len(set(ids))} "
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


def job_environment(count: int, *, mem_fraction: float | None = None,
                    environ: Mapping[str, str] = os.environ, lock_dir: Path | None = None,
                    poll_s: float = 2.0, log=None) -> tuple[dict[str, str], list[int]]:
    """The environment of a job that uses ``count`` GPUs, and the lock descriptors to keep
    open for its lifetime."""
    env = dict(environ)
    env.update(memory_env(mem_fraction))
    if count == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
        return env, []
    if "SLURM_JOB_ID" in environ:
        if log:
            log(f"SLURM job {environ['SLURM_JOB_ID']}: GPU(s) "
                f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '')!r} as SLURM set them")
        return env, []
    ids = machine_gpu_ids(environ)
    if not ids:
        if log:
            log(f"no GPU ids on this machine ({IDS_VAR} unset, no nvidia-smi): running without")
        return env, []
    chosen, fds = lease(ids, count, lock_dir or default_lock_dir(), poll_s=poll_s, log=log)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    if log:
        log(f"GPU(s) {env['CUDA_VISIBLE_DEVICES']} leased for pid {os.getpid()}")
    return env, fds


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m finegrained.gpus", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, required=True, help="GPUs the job uses (0: none)")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="preallocate this fraction of each GPU (default: no preallocation)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the job's command line")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given after --")

    def log(message):
        print(f"[finegrained.gpus] {message}", file=sys.stderr, flush=True)

    env, fds = job_environment(args.count, mem_fraction=args.mem_fraction, log=log)
    for fd in fds:
        os.set_inheritable(fd, True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
