"""The table of architectures: a new backbone is one model module and one entry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from finegrained.errors import ConfigError
from finegrained.plan import archs, regimes
from finegrained.plan.schema import load_config
from helpers.tiny_arch_entry import TINY

REPO = Path(__file__).resolve().parents[2]
# Registers the entry, then runs Snakemake in the same process (the Snakefile imports this
# finegrained, whose table now has the entry).
REGISTERED_SNAKEMAKE = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from finegrained.plan import archs
from helpers.tiny_arch_entry import TINY
archs.register(TINY)
sys.argv = ["snakemake", *sys.argv[1:]]
from snakemake.cli import main
main()
"""


@pytest.fixture
def tiny():
    archs.register(TINY)
    yield TINY
    del archs.ARCHITECTURES[TINY.name]


def test_the_entry_is_all_the_planning_knows(tiny):
    config = load_config(overrides={"backbone": {"arch": "tiny_test", "width": 16},
                                    "regime_settings": {"partial_finetune": {
                                        "freeze_up_to": "stride2"}}})
    partial = regimes.job_settings(config, "partial_finetune")["phases"][0]
    assert partial["input"] == {"kind": "cache", "layer": "stem:map", "start": "stem",
                                "cut": None}
    assert partial["train_settings"]["param_groups"][0] == ["(stem)/.*", 0.0]
    assert regimes.job_settings(config, "linear_probe")["phases"][0]["input"]["layer"] == "stage1"
    with pytest.raises(ConfigError, match=r"regime_settings.partial_finetune.freeze_up_to: "
                                          r"'block1' is not a choice of tiny_test"):
        load_config(overrides={"backbone": {"arch": "tiny_test"},
                               "regime_settings": {"partial_finetune": {"freeze_up_to": "block1"}}})
    with pytest.raises(ConfigError, match="backbone.stage_depths: tiny_test takes 1"):
        load_config(overrides={"backbone": {"arch": "tiny_test", "stage_depths": [1, 1]}})


def test_the_model_module_builds_from_the_entry(tiny):
    from flax import nnx

    from finegrained.models import build_model
    model = build_model("tiny_test", 3, width=16, rngs=nnx.Rngs(0))
    x = np.zeros((2, 16, 16, 3), np.uint8)
    stem = model.forward(x, stop="stem")
    assert stem.shape == (2, 8, 8, 2)
    np.testing.assert_allclose(np.asarray(model.forward(stem, start="stem")),
                               np.asarray(model(x)), rtol=1e-6)


def test_snakemake_plans_every_regime_of_a_registered_architecture(tmp_path):
    """The test-only entry, registered in the process that runs Snakemake: the demo's whole
    DAG plans for it, every regime with its settings, and no other file knows its name."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"backbone": {"arch": "tiny_test", "width": 16},
                                      "regime_settings": {"partial_finetune": {
                                          "freeze_up_to": "stride2"}}}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", REGISTERED_SNAKEMAKE, "-s", str(REPO / "Snakefile"), "all", "-n",
         "-p", "--configfile", str(REPO / "config" / "demo.yaml"), str(config), "--cores", "1",
         "-d", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1].split("\n\n")[0],
                            re.M))
    assert stats["train_regime"] == "5" and stats["evaluate_regime"] == "5", stats
    assert stats["feature_map"] == "2", stats          # stem:map of train and val
    settings = [json.loads(m) for m in re.findall(r"--settings '(\{.*?\})'", out)
                if '"regime"' in m and '"phases"' in m]
    assert {s["regime"] for s in settings} == set(regimes.REGIMES)
    assert all(s["model"]["arch"] == "tiny_test" for s in settings)
    assert subprocess.run(["grep", "-rq", "tiny_test", str(REPO / "src"),
                           str(REPO / "workflow")]).returncode == 1     # named nowhere else
