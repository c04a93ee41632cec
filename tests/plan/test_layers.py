"""The planning layer sits below the library: it loads no JAX, Flax or Optax, and imports
nothing from train, models, data or evaluate (only errors, fileio, provenance)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PLAN = Path(__file__).resolve().parents[2] / "src" / "finegrained" / "plan"
ALLOWED = ("finegrained.plan", "finegrained.errors", "finegrained.fileio",
           "finegrained.provenance")


def test_importing_every_planning_module_loads_no_jax():
    modules = [f"finegrained.plan.{p.stem}" for p in sorted(PLAN.glob("*.py"))
               if p.stem != "__init__"]
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules\n"
            "                        if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax',"
            " 'orbax'))))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    assert json.loads(out) == []
    assert len(modules) >= 10


def test_the_planning_layer_imports_only_below_itself():
    for path in sorted(PLAN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.module != "finegrained" else [
                    f"finegrained.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "finegrained":
                    assert name.startswith(ALLOWED), f"{path.name} imports {name}"
