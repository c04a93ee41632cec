"""The ViT demo (config/examples/demo-vit.yaml) end to end at a smaller size: a ViT-Ti/8 of 4
blocks pretrained on the demo's source task, the five regimes on its target with the ViT
presets (the partial fine-tune on cached tokens, layer-wise decay, LP-FT), their evaluation
and the report's figures. Marker `demo` (`make test-demo`, which CI runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
REGIMES = ["linear_probe", "partial_finetune", "full_finetune", "two_stage", "scratch"]
#: Smaller datasets and crops (48 px: a 6 x 6 patch grid), fewer epochs: the same jobs in
#: a fraction of the demo's time.
SMALLER = {"dataset": {"demo": {"num_classes": 6, "train_per_class": 24, "test_per_class": 10}},
           "crop": {"size": 54}, "train": {"image_size": 48},
           "pretrain": {"epochs": 20, "image_size": 48, "dataset": {"demo": {
               "num_classes": 12, "train_per_class": 30, "test_per_class": 5}}},
           "regime_settings": {"partial_finetune": {"epochs": 6}, "full_finetune": {"epochs": 6},
                               "two_stage": {"epochs": 4}, "scratch": {"epochs": 6}}}


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo_vit")
    smaller = workdir / "smaller.yaml"
    smaller.write_text(yaml.safe_dump(SMALLER))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
         "--configfile", str(REPO / "config" / "demo.yaml"),
         str(REPO / "config" / "examples" / "demo-vit.yaml"), str(smaller), "--cores", "2",
         "all"], cwd=workdir, env=env, capture_output=True, text=True, timeout=2400)
    if proc.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}"
                         for p in sorted((workdir / "results").rglob("*.log")))
        pytest.fail(f"workflow failed:\n{proc.stderr[-5000:]}\n{logs}")
    return workdir / "results" / "demo_vit"


@pytest.mark.demo
def test_the_vit_demo_runs_every_regime_to_the_report(vit_run):
    summary = json.loads((vit_run / "report" / "summary.json").read_text())
    assert sorted(summary["regimes"]) == sorted(REGIMES)
    for figure in ("regime_views", "learning_curves", "tta_gain", "taxonomy_levels",
                   "confused_pairs", "augmentation"):
        assert (vit_run / "report" / "figures" / f"{figure}.png").stat().st_size > 0
    top1 = {}
    for regime in REGIMES:
        metrics = json.loads((vit_run / "eval" / regime / "metrics.json").read_text())
        top1[regime] = metrics["views"]["center"]["top1"]
    # 6 species: chance 1/6; the pretrained ViT's frozen features already carry the task,
    # and what it learned on the source beats learning the target alone
    assert top1["linear_probe"] >= 1.5 / 6, top1         # 0.40 on the 2-core Xeon
    assert max(top1[r] for r in REGIMES if r != "scratch") > top1["scratch"], top1


@pytest.mark.demo
def test_the_vit_regimes_train_as_their_presets_say(vit_run):
    def settings(regime):
        return json.loads((vit_run / "train" / regime / "summary.json").read_text())["settings"]

    full = settings("full_finetune")
    assert full["model"]["arch"] == "vit_tiny_patch8" and full["model"]["stage_depths"] == [4]
    main = full["phases"][-1]["train_settings"]
    assert main["optimizer"] == "adamw" and main["weight_decay"] == 0.05
    assert [g[0] for g in main["param_groups"]] == [
        "stem/.*", "block0/.*", "block1/.*", "block2/.*", "block3/.*", "norm/.*"]
    assert main["param_groups"][1][1] == pytest.approx(0.75 ** 4)       # layer_decay 0.75
    partial = settings("partial_finetune")["phases"][0]
    assert partial["input"] == {"kind": "cache", "layer": "block1:map", "start": "block1",
                                "cut": None}
    tokens = json.loads((vit_run / "features" / "train" / "block1.map" / "index.json").read_text())
    assert tokens["layers"]["block1:map"]["shape"][1:] == [1 + 6 * 6, 96]   # class token + 36
    assert settings("two_stage")["phases"][0]["kind"] == "probe_head"        # LP-FT
