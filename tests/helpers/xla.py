"""The XLA flags of every process the test suite starts.

The suite compiles with XLA's CPU backend at LLVM optimisation level 0
(``--xla_backend_optimization_level=0``): compiling dominates almost every test on a CPU, and
at level 0 it takes about a third less CPU time (tests/train/test_job.py: 97 -> 64 s of CPU),
while the programs stay the same programs (the HLO, its fusions and its results within
floating-point rounding). No test compares a number with one compiled elsewhere except within
a tolerance; runs compared bit for bit (a resumed run, 2 processes against 1) are compiled
alike, since every process of the suite gets these flags. ``make test-demo``, whose figures are
the documented demo's, and ``make demo`` compile at XLA's default level.
``FINEGRAINED_TEST_XLA_FLAGS=`` (empty) runs the suite at the default level too."""

from __future__ import annotations

import os

TEST_FLAGS_VAR = "FINEGRAINED_TEST_XLA_FLAGS"
DEFAULT_TEST_FLAGS = "--xla_backend_optimization_level=0"


def test_flags() -> str:
    return os.environ.get(TEST_FLAGS_VAR, DEFAULT_TEST_FLAGS)


def xla_flags(devices: int | None = None) -> str:
    """The suite's flags, with ``devices`` CPU devices when given."""
    count = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    return " ".join(filter(None, [test_flags(), count]))
