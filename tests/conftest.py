"""Shared fixtures. Real data lives in ../shared beside the project root when available;
tests that need it skip cleanly on a user's fresh clone where it is absent."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FINEGRAINED_SHARED", REPO_ROOT.parent / "shared"))

# --- one persistent compilation cache for the whole session ------------------------------
# Compiling dominates most tests on a CPU, and many compile the same programs (the same tiny
# networks at the same shapes, a training run and its resumed rerun, the workflow's jobs).
# JAX's persistent compilation cache, set here through the environment before JAX is first
# imported, serves them all: this process, every subprocess the tests start (training
# scripts, Snakemake jobs that set no cache of their own) and the pytest-xdist workers,
# which inherit it from the controller. A cache entry is keyed by the program, the
# compile options (the cache's own path among them) and the JAX version, so a hit is the
# program the test would have compiled. The folder is new and removed with the session
# unless FINEGRAINED_TEST_JAX_CACHE names one to keep between sessions.
TEST_CACHE_VAR = "FINEGRAINED_TEST_JAX_CACHE"
if "jax" in sys.modules:      # pragma: no cover - a plugin imported JAX before this file
    raise RuntimeError("tests/conftest.py must set the compilation cache before JAX starts")
if not os.environ.get(TEST_CACHE_VAR):
    _session_cache = tempfile.mkdtemp(prefix="finegrained-test-jax-cache-")
    os.environ[TEST_CACHE_VAR] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)
from finegrained.launch import cache_env  # noqa: E402  (standard library only: no JAX)
# Programs that compile in under a second are not written: most tests compile hundreds of
# small ones that no other test repeats, and writing each costs more than it could save.
for _k, _v in {**cache_env(os.environ[TEST_CACHE_VAR]),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}.items():
    os.environ.setdefault(_k, _v)

# --- XLA's CPU backend at optimisation level 0 in every process of the suite -------------
# (tests/helpers/xla.py says why; FINEGRAINED_TEST_XLA_FLAGS= runs at the default level).
from helpers.xla import TEST_FLAGS_VAR, test_flags  # noqa: E402
os.environ[TEST_FLAGS_VAR] = test_flags()
if test_flags() not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), test_flags()]))


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _shared_path()


@pytest.fixture(scope="session")
def nabirds_annotations() -> Path:
    return _shared_path("data", "nabirds_annotations")


@pytest.fixture(scope="session")
def cub50() -> Path:
    return _shared_path("data", "cub50")


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    return _shared_path("weights")


def _random_model(arch: str, num_classes: int = 5, *, seed: int = 0, **kw):
    """``build_model(arch, ...)`` with random numpy values in every tensor, built abstractly
    and filled as weight loading does (eager random initialisation compiles one program per
    tensor shape, which dominates small tests on a CPU). Kernels are He-normal; biases,
    BatchNorm scales and running statistics are non-trivial too, so a change to any of
    them shows."""
    from flax import nnx

    from finegrained.models import assign_state, build_model

    model = nnx.eval_shape(lambda: build_model(arch, num_classes, rngs=nnx.Rngs(0), **kw))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        name, shape = "/".join(map(str, path)), variable.get_value().shape
        if name.endswith("/kernel"):
            flat[name] = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name.endswith(("/scale", "/var")):
            flat[name] = rng.uniform(0.5, 1.5, shape)
        else:   # biases, running means
            flat[name] = rng.normal(0.0, 0.1, shape)
    assign_state(model, flat)
    return model


@pytest.fixture(scope="session")
def random_model():
    """A factory: ``random_model("resnet18", width=8, stage_depths=[1, 1, 1, 1], seed=0)``."""
    return _random_model


def pytest_collection_modifyitems(session, config, items):
    """Test files holding a test marked ``slow`` run first, the longest first (a mark's
    ``seconds``, as `make test`'s list of the slowest tests gives them; 30 unless said):
    with pytest-xdist (`make test`: ``-n 2 --dist loadfile --no-loadscope-reorder``) each
    file goes whole to one worker in this order, so the long files start early and the short
    ones fill in beside them, instead of one long file running alone at the end."""
    cost: dict[Path, float] = {}
    for item in items:
        for mark in item.iter_markers("slow"):
            cost[item.path] = max(cost.get(item.path, 0), mark.kwargs.get("seconds", 30))
    items.sort(key=lambda item: -cost.get(item.path, 0))
