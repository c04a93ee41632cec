"""Shared fixtures. Real data lives in ../shared beside the project root when available;
tests that need it skip cleanly on a user's fresh clone where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FINEGRAINED_SHARED", REPO_ROOT.parent / "shared"))


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
