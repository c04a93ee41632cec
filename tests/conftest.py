"""Shared fixtures. Real data lives in ../shared beside the project root when available;
tests that need it skip cleanly on a user's fresh clone where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

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
