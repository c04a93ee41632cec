"""The environments agree: conda envs pin the lock files' versions, and `make` installs the
JAX build the machine can use (CUDA 12 where nvidia-smi lists a GPU) and says so."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).strip().lower().replace("_", "-")] = version.strip()
    return pins


def _env_pins(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return _pins_of(pip)


def _pins_of(requirements) -> dict[str, str]:
    out = {}
    for requirement in requirements:
        name, _, version = str(requirement).partition("==")
        out[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = version
    return out


def test_conda_envs_pin_the_versions_of_the_lock_files():
    cpu = _pins(REPO / "envs/requirements.lock")
    cuda = {**cpu, **_pins(REPO / "envs/requirements-cuda12.lock")}
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert {p.name for p in envs} >= {"data.yaml", "jax.yaml", "jax-cuda12.yaml", "report.yaml"}
    for path in envs:
        lock = cuda if path.name == "jax-cuda12.yaml" else cpu
        for name, version in _env_pins(path).items():
            assert version == lock.get(name), f"{path.name}: {name}=={version} (lock: {lock.get(name)})"
    # The GPU env has every package of the CUDA build, the CPU env none.
    gpu_only = set(_pins(REPO / "envs/requirements-cuda12.lock"))
    assert {"jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cudnn-cu12"} <= gpu_only
    assert gpu_only <= set(_env_pins(REPO / "envs/jax-cuda12.yaml"))
    assert not gpu_only & set(_env_pins(REPO / "envs/jax.yaml"))
    assert "-r requirements.lock" in (REPO / "envs/requirements-cuda12.lock").read_text()


def _make_install(tmp_path, *args, nvidia_smi=None):
    """``make -n install`` with a venv that does not exist yet, and a fake nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    if nvidia_smi is not None:
        fake.write_text(f"#!/bin/sh\necho '{nvidia_smi}'\n")
        fake.chmod(0o755)
    elif fake.exists():
        fake.unlink()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return subprocess.run(["make", "-n", "-C", str(REPO), "install", f"VENV={tmp_path}/venv",
                           *args], env=env, capture_output=True, text=True, timeout=60)


def test_make_installs_the_cuda_build_where_a_gpu_is_listed_and_says_which(tmp_path):
    gpu = _make_install(tmp_path, nvidia_smi="GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)")
    assert "JAX build: cuda12 (nvidia-smi lists a GPU); for the cpu build: make <target> GPU=cpu" \
        in gpu.stdout
    assert "pip install -q -r envs/requirements-cuda12.lock" in gpu.stdout
    cpu = _make_install(tmp_path)
    assert "JAX build: cpu (no NVIDIA GPU found by nvidia-smi); for the cuda12 build" in cpu.stdout
    assert "pip install -q -r envs/requirements.lock" in cpu.stdout
    assert "uninstall -q -y jax-cuda12-plugin" in cpu.stdout   # a CUDA venv turned back
    chosen = _make_install(tmp_path, "GPU=cuda12")
    assert "JAX build: cuda12 (as GPU=cuda12 asks)" in chosen.stdout
    assert "requirements-cuda12.lock" in chosen.stdout
    wrong = _make_install(tmp_path, "GPU=rocm")
    assert wrong.returncode != 0 and "choose GPU=cpu or GPU=cuda12" in wrong.stderr


def _declared(requirements) -> set[str]:
    return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def test_every_package_the_library_imports_is_declared():
    """pyproject.toml names every third-party import of src/ (the report's in its extra),
    with a range the lock satisfies."""
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = _declared(project["dependencies"])
    report = core | _declared(project["optional-dependencies"]["report"])
    distributions = packages_distributions()
    missing = []
    for path in sorted((REPO / "src" / "finegrained").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "finegrained":
                    continue
                dists = {d.lower() for d in distributions.get(top, [top])}
                allowed = report if "report" in path.parts else core
                if not dists & allowed:
                    missing.append(f"{path.relative_to(REPO)}: {name} ({', '.join(dists)})")
    assert not missing, "undeclared imports:\n" + "\n".join(missing)
    from packaging.requirements import Requirement
    lock = _pins(REPO / "envs/requirements.lock")
    for requirement in project["dependencies"] + project["optional-dependencies"]["report"]:
        req = Requirement(requirement)
        assert req.specifier.contains(lock[req.name.lower()]), (requirement, lock[req.name.lower()])
