"""What every benchmark script shares: repeated timing, summary statistics, the machine,
the JSON envelope, and finding ``../shared``.

A result file is one JSON object::

    {"benchmark": name, "title": ..., "date": ..., "command": ..., "machine": {...},
     "wall_seconds": ..., ...the script's own figures...}

``benchmarks/render.py`` turns every such file under ``benchmarks/results/`` into
``docs/benchmarks.md``. Figures are the median over repetitions with min and max: the
machines are shared and noisy, so a single timing (or a best-of) is not reported.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("FINEGRAINED_SHARED", REPO.parent / "shared"))


def summary(values: Sequence[float], digits: int | None = 4) -> dict:
    """``{"median", "min", "max", "n", "values"}`` of repeated measurements."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no measurements")
    out = {"median": statistics.median(values), "min": min(values), "max": max(values),
           "n": len(values), "values": values}
    if digits is not None:
        out = {k: (_round(v, digits) if k != "n" else v) for k, v in out.items()}
    return out


def _round(value, digits: int):
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    if value == 0 or not isinstance(value, float):
        return value
    # significant digits (whole units always kept): 0.001235 s, 12346 images/s
    from math import floor, log10
    return round(value, max(0, digits - 1 - int(floor(log10(abs(value))))))


def rates(seconds: Sequence[float], count: float) -> dict:
    """Throughput ``count / seconds`` of each repetition, summarised."""
    return summary([count / s for s in seconds])


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """Per-repetition ratios ``numerator[i] / denominator[i]`` (measured side by side in the
    same repetition, so load noise that hits both cancels), summarised."""
    if len(numerator) != len(denominator):
        raise ValueError("ratios need paired repetitions")
    return summary([a / b for a, b in zip(numerator, denominator)], digits=3)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.
    ``fn`` must block until its work is done (``jax.block_until_ready``)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine a result was measured on, with the load at the time (other jobs share
    the cores: a load average above the core count means the figures are depressed)."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count())
    info = {"cpu": cpu_name(), "cores": cores, "arch": platform.machine(),
            "python": platform.python_version(),
            "load_average": [round(v, 2) for v in os.getloadavg()]
            if hasattr(os, "getloadavg") else None}
    for module in ("numpy", "PIL", "jax"):
        if module in sys.modules:
            info[module if module != "PIL" else "pillow"] = sys.modules[module].__version__
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        info["device"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    return info


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces a result (``argv`` as given, None: no arguments)."""
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, argv or [])])


def write_result(name: str, title: str, payload: dict, *, argv: Sequence[str] | None,
                 started: float, out: Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json``: the envelope, then ``payload``.

    ``started`` is the ``time.time()`` at which the script began (the wall time shown in
    the rendered page). The load average is read at the end of the run."""
    out = out or RESULTS / f"{name}.json"
    report = {"benchmark": name, "title": title,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": command(f"{name}.py", argv), "machine": machine(),
              "wall_seconds": round(time.time() - started, 1), **payload}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


def shared_path(*parts: str, base: Path | None = None) -> Path | None:
    """``../shared/<parts>`` (or under ``base``) if it exists; else print why and return
    None, so the script can exit 0 (``make bench`` on a fresh clone skips it)."""
    path = (base or SHARED).joinpath(*parts)
    if not path.exists():
        print(f"skipping: {path} not found (the benchmark needs ../shared)", file=sys.stderr)
        return None
    return path
