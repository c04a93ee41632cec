"""The workflow's contract: config validation, schema documentation, dry-run and lint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finegrained.plan.schema import load_config, load_schema, validate_config
from finegrained.plan.reference import render_reference
from finegrained.demo import generate_demo_dataset
from finegrained.data.readers import annotation_files
from finegrained.errors import ConfigError
from finegrained.plan.paths import download_path

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _snakemake(*args, cwd=REPO, check=True):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _walk(schema, node, prefix=""):
    for name, prop in node.get("properties", {}).items():
        if "$ref" in prop:
            ref = schema["$defs"][prop["$ref"].split("/")[-1]]
            prop = {**ref, **{k: v for k, v in prop.items() if k != "$ref"}}
        yield prefix + name, prop
        yield from _walk(schema, prop, prefix + name + ".")


def test_every_config_key_is_described_and_has_a_default():
    schema = load_schema()
    keys = list(_walk(schema, schema))
    assert len(keys) > 40
    for key, prop in keys:
        assert prop.get("description", "").strip(), f"{key} has no description"
        assert "default" in prop, f"{key} has no default"


def test_configuration_reference_matches_schema():
    text = (REPO / "docs" / "configuration.md").read_text()
    assert text == render_reference(), (
        "docs/configuration.md is stale: regenerate it with "
        "`python scripts/config_reference.py --update docs/configuration.md`")
    # Each shared block once: the regime keys are not repeated per regime.
    assert text.count("| `head_lr` |") == 2            # the regime keys table + the presets
    assert text.count("| `crop_area` |") == 1 and "`regime_settings.full_finetune.lr`" not in text


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml", "examples/gpu.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / "config" / "config.yaml", REPO / "config" / name)
    assert config["crop"]["size"] >= 16
    assert set(config["shards"]["num_shards"]) == {"train", "val", "test"}


def test_defaults_are_filled_in():
    config = validate_config({"dataset": {"demo": {}}})
    assert config["dataset"]["demo"]["num_classes"] == 10
    assert config["dataset"]["val_fraction"] == 0.1
    assert config["shards"]["num_shards"]["train"] == 16
    assert config["pretrain"]["dataset"]["demo"] is None


def test_wrong_key_and_wrong_value_are_named():
    with pytest.raises(ConfigError) as err:
        validate_config({"dataset": {"fromat": "cub"}, "crop": {"aspect": "round"}})
    text = str(err.value)
    assert "fromat" in text and "dataset" in text
    assert "crop.aspect" in text and "round" in text


def test_url_weights_trusted_on_first_use_unless_strict():
    url = "https://example.org/w.safetensors"
    assert validate_config({"backbone": {"weights": url}})["backbone"]["weights_sha256"] is None
    with pytest.raises(ConfigError, match="weights_sha256"):
        validate_config({"backbone": {"weights": url, "weights_require_sha256": True}})


UNRUNNABLE = [
    # (config, the key path and the reason the message must name)
    ({"sweep": {"full_finetune": {"batch_size": [0]}}}, "sweep.full_finetune.batch_size.0",
     "less than the minimum of 1"),
    ({"sweep": {"full_finetune": {"batch_size": [32.5]}}}, "sweep.full_finetune.batch_size.0",
     "not of type 'integer'"),
    ({"sweep": {"full_finetune": {"epochs": [3, 0.5]}}}, "sweep.full_finetune.epochs.1",
     "not of type 'integer'"),
    ({"sweep": {"full_finetune": {"backbone_lr_mult": [None]}}},
     "sweep.full_finetune.backbone_lr_mult.0", "not of type 'number'"),
    ({"regime_settings": {"full_finetune": {"lr": 0}}}, "regime_settings.full_finetune.lr",
     "less than or equal to the minimum of 0"),
    ({"regime_settings": {"two_stage": {"head_lr": 0}}}, "regime_settings.two_stage.head_lr",
     "less than or equal to the minimum of 0"),
    ({"regime_settings": {"full_finetune": {"param_groups": [["stage(1/.*", 0.0]]}}},
     "regime_settings.full_finetune.param_groups.0", "not a regular expression"),
    ({"pretrain": {"param_groups": [["*", 1.0]]}}, "pretrain.param_groups.0",
     "not a regular expression"),
    ({"dataset": {"val_fraction": 0}, "regimes": ["full_finetune"]}, "dataset.val_fraction",
     "validation split is empty"),
    ({"backbone": {"weights": "https://h.org/../../../x.safetensors"}}, "backbone.weights",
     "'..'"),
    ({"backbone": {"weights": "https://h.org/w/%2e%2e/x.safetensors"}}, "backbone.weights",
     "percent escapes"),
    ({"backbone": {"weights": "https:///x.safetensors"}}, "backbone.weights", "host"),
    ({"backbone": {"weights": "http://h.org/x.safetensors"}}, "backbone.weights_allow_http",
     "plain http"),
    ({"resources": {"train": {"nodes": 0}}}, "resources.train.nodes",
     "less than the minimum of 1"),
    ({"resources": {"train": {"gpu": 3, "tasks_per_node": 2}}}, "resources.train.tasks_per_node",
     "does not divide resources.train.gpu 3"),
    ({"resources": {"train": {"gpu": 1, "tasks_per_node": 2}}}, "resources.train.tasks_per_node",
     "each task leases gpu / tasks_per_node"),
    ({"resources": {"train": {"nodes": 2}}, "train": {"num_devices": 4}}, "train.num_devices",
     "a training job runs as 2 tasks (resources.train.nodes 2 x tasks_per_node 1)"),
    ({"resources": {"train": {"gpu": 0, "tasks_per_node": 2}}, "pretrain": {"num_devices": 1}},
     "pretrain.num_devices", "whose mesh spans every device of every task"),
]


@pytest.mark.parametrize("config, key, reason", UNRUNNABLE,
                         ids=[f"{key}:{reason}" for _, key, reason in UNRUNNABLE])
def test_values_that_cannot_run_are_refused_naming_the_key(config, key, reason):
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert key in str(caught.value) and reason in str(caught.value)


def test_a_sweep_of_integral_floats_keeps_integer_paths():
    config = validate_config({"sweep": {"full_finetune": {"batch_size": [32.0, 64]}}})
    assert config["sweep"]["full_finetune"]["batch_size"] == [32, 64]
    assert all(isinstance(v, int) for v in config["sweep"]["full_finetune"]["batch_size"])


def test_numbers_in_a_nested_command_line_config_are_read_as_numbers():
    """``--config 'resources={train: {gpu: 1}}'`` gives Snakemake's text '1': read as 1 where
    the schema wants an integer, and the same for numbers, booleans and null."""
    config = validate_config({"resources": {"train": {"gpu": "1", "gpu_memory_fraction": "null",
                                                      "mem_mb": "64000"}},
                              "dataset": {"val_fraction": "0.2", "check_files": "false"},
                              "sweep": {"full_finetune": {"lr": ["0.01", "1e-3"]}},
                              "run_name": "2024"})
    assert config["resources"]["train"]["gpu"] == 1
    assert config["resources"]["train"]["gpu_memory_fraction"] is None
    assert config["resources"]["train"]["mem_mb"] == 64000
    assert config["dataset"]["val_fraction"] == 0.2 and config["dataset"]["check_files"] is False
    assert config["sweep"]["full_finetune"]["lr"] == [0.01, 0.001]
    assert config["run_name"] == "2024"                     # a string stays a string
    with pytest.raises(ConfigError, match="resources.train.gpu: 'one' is not of type"):
        validate_config({"resources": {"train": {"gpu": "one"}}})


def test_url_paths_stay_under_resources_weights():
    assert download_path("https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/"
                         "model.safetensors") == ("resources/weights/huggingface.co/timm/"
                                                  "resnet50.a1_in1k/resolve/main/model.safetensors")
    with_port = download_path("https://h.org:8443/w.safetensors")
    with_query = download_path("https://h.org/w.safetensors?rev=2")
    assert with_port != with_query and "8443" not in with_port and "rev" not in with_query
    assert with_port.startswith("resources/weights/h.org-") and with_port.endswith("/w.safetensors")


#: A YAML alias bomb in `seeds:`, under 1 KB: 9^8 values once its aliases are expanded.
BOMB = "seeds:\n" + "".join(
    f"  - &{name} [{', '.join([f'*{below}' if below else '1'] * 9)}]\n"
    for below, name in zip([None, *"abcdefg"], "abcdefgh"))


def test_unrunnable_values_stop_the_dry_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    for config, key in [({"dataset": {"val_fraction": 0}}, "dataset.val_fraction"),
                        ({"backbone": {"weights": "https://h.org/../../x.safetensors"}},
                         "backbone.weights"),
                        ("regime_settings: {linear_probe: {l2_grid: [.nan, .inf]}}",
                         "regime_settings.linear_probe.l2_grid.0: nan is not a finite"),
                        ({"train": {"image_size": 300}}, "train.image_size 300 is larger "
                                                          "than crop.size 72"),
                        (BOMB, "seeds: holds more than 100,000 values")]:
        bad.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        proc = _snakemake("all", "-n", "--configfile", "config/demo.yaml", str(bad), check=False)
        assert proc.returncode != 0 and key in proc.stdout + proc.stderr
        assert "rule " not in proc.stdout            # no job planned


def test_a_missing_dataset_root_is_named_at_the_dry_run(tmp_path):
    proc = _snakemake("all", "-n", "--config", f"dataset={{root: {tmp_path / 'nabirds'}}}",
                      check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"dataset.root: '{tmp_path / 'nabirds'}'" in text and "does not exist" in text
    assert "docs/nabirds.md" in text
    (tmp_path / "nabirds").mkdir()
    (tmp_path / "nabirds" / "images.txt").write_text("")
    proc = _snakemake("all", "-n", "--config", f"dataset={{root: {tmp_path / 'nabirds'}}}",
                      check=False)
    assert "has no image_class_labels.txt" in proc.stdout + proc.stderr


def test_an_image_path_leaving_the_dataset_root_stops_the_dry_run(tmp_path):
    """A `..` in images.txt is refused when the DAG is built, naming the file and line."""
    root = tmp_path / "cub"
    root.mkdir()
    (root / "images.txt").write_text("1 001.A/a.jpg\n2 ../../etc/b.jpg\n")
    for name in ("image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        (root / name).write_text("")
    proc = _snakemake("all", "-n", "--config", f"dataset={{root: {root}, format: cub}}",
                      check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "image path leaves the dataset root" in text
    assert f"{root / 'images.txt'}:2: " in text and "'../../etc/b.jpg'" in text
    assert "rule crop_shard:" not in proc.stdout


def test_the_catalog_entry_point_plans_the_smoke_test(tmp_path):
    """The catalog's usage: `workflow/Snakefile` with `.test/config/config.yaml` (its smoke
    test, which the test suite trains in tests/workflow/test_pipeline.py) plans every regime,
    its evaluation and the report, in a working folder of its own."""
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True
    flags = catalog["usage"]["mandatory-flags"]["flags"]
    proc = _snakemake("-s", "workflow/Snakefile", "all", "-n", "--configfile",
                      ".test/config/config.yaml", "--directory", str(tmp_path), *flags.split())
    stats = proc.stdout.split("Job stats:")[1].split("\n\n")[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", stats, re.M))
    assert counts["train_regime"] == counts["evaluate_regime"] == "5", counts
    assert counts["report_results"] == counts["report_examples"] == "1", counts
    assert "results/tiny/report/notebooks/results.ipynb" in proc.stdout


def test_default_config_starts_from_public_imagenet_weights():
    config = load_config(REPO / "config" / "config.yaml")
    assert config["backbone"]["weights"].startswith("https://")
    assert config["backbone"]["arch"] == "resnet50"


def test_pretrain_needs_a_source_dataset_other_than_the_target():
    with pytest.raises(ConfigError, match="pretrain.dataset is not set"):
        validate_config({"backbone": {"weights": "pretrain"}})
    with pytest.raises(ConfigError, match="pretrain.dataset.root is the target dataset"):
        validate_config({"backbone": {"weights": "pretrain"}, "dataset": {"root": "data/x"},
                         "pretrain": {"dataset": {"root": "data/x/"}}})
    validate_config({"backbone": {"weights": "pretrain"},
                     "pretrain": {"dataset": {"root": "data/inat_birds"}}})


def test_dry_run_demo():
    proc = _snakemake("all", "-n", "--forceall", "--configfile", "config/demo.yaml", "--cores", "2")
    out = proc.stdout
    for rule in ["demo_dataset", "manifests", "crop_shard", "shard_index", "channel_stats",
                 "pretrain", "init_target_model"]:
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
    # Target: 2 train + 1 val + 2 test shards; source: only train (2) + val (1) feed pretraining.
    assert out.count("rule crop_shard:") == 8


def test_random_init_passes_no_weights_file():
    """`backbone.weights: none` (the schema's default) gave the init job `--weights ''`,
    which failed with `error: : weights file not found`: no option is passed for an input
    the rule does not have."""
    proc = _snakemake("weights", "-n", "--forceall", "-p", "--configfile", "config/demo.yaml",
                      "--config", "backbone={weights: none}")
    [command] = [line for line in proc.stdout.splitlines()
                 if "init_model.py" in line and line.startswith("Shell command")][:1]
    assert "--weights" not in command and "--source-class-names" not in command, command
    assert "''" not in command, command


def test_dry_run_default_config(tmp_path):
    # The real config reads dataset.root; a directory with the annotation files is enough
    # for planning the jobs.
    root = tmp_path / "nabirds"
    root.mkdir()
    for path in annotation_files("nabirds", root):
        path.touch()
    proc = _snakemake("all", "-n", "--forceall", "--cores", "32", "--config", f"dataset={{root: {root}}}",
                      "--resources", "gpu=4")
    assert proc.stdout.count("rule crop_shard:") == 16 + 2 + 16
    assert "rule pretrain:" not in proc.stdout


def test_bad_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"crop": {"size": "big"}}))
    proc = _snakemake("all", "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    assert "crop.size" in proc.stdout + proc.stderr


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/demo.yaml"])
def test_lint_is_clean(configfile):
    proc = _snakemake("--lint", "--configfile", configfile)
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_shell_prefix_keeps_strict_mode(tmp_path):
    """The workflow's shell.prefix replaces Snakemake's `set -euo pipefail;`: it must keep it."""
    for name in ("workflow", "src", "config"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "Snakefile").write_text(
        'import sys\n'
        'from pathlib import Path\n'
        'FINEGRAINED_DIR = Path(str(workflow.current_basedir))\n'
        'sys.path.insert(0, str(FINEGRAINED_DIR / "src"))\n'
        'configfile: "config/demo.yaml"\n'
        'include: "workflow/rules/common.smk"\n'
        'rule probe:\n'
        '    output: "{name}.txt"\n'
        '    params: pipe=lambda wc: "false | true" if wc.name == "failing" else "true | true"\n'
        '    shell: "{params.pipe}; echo $PYTHONPATH > {output}"\n')

    def probe(name):
        return _snakemake("-s", str(tmp_path / "Snakefile"), "-d", str(tmp_path), "--cores", "1",
                          f"{name}.txt", cwd=tmp_path, check=False)

    assert probe("passing").returncode == 0
    assert f"{tmp_path}/src" in (tmp_path / "passing.txt").read_text()  # the rest of the prefix
    assert probe("failing").returncode != 0, "a failing pipe element must fail the job (pipefail)"
    assert not (tmp_path / "failing.txt").exists()


# --------------------------------------------------------------------------- rerun triggers


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """The data phase, run once on a small dataset folder given as dataset.root."""
    work = tmp_path_factory.mktemp("rerun")
    root = work / "birds"
    generate_demo_dataset(root, variant="target", num_classes=2, train_per_class=4,
                          test_per_class=2, min_side=64, max_side=80, seed=2)
    config = {"run_name": "r", "dataset": {"root": str(root), "val_fraction": 0.25},
              "crop": {"size": 32}, "train": {"image_size": 32},
              "shards": {"num_shards": {"train": 2, "val": 1, "test": 2}}}
    (work / "c.yaml").write_text(yaml.safe_dump(config))
    config["shards"]["num_shards"]["test"] = 3
    (work / "c3.yaml").write_text(yaml.safe_dump(config))
    _snakemake("-s", str(REPO / "Snakefile"), "-d", str(work), "data", "--configfile",
               str(work / "c.yaml"), "--cores", "2", cwd=work)
    return work, root


def _planned(work: Path, configfile: str = "c.yaml") -> list[str]:
    """``rule wildcards`` of every job a dry run of the data phase would run."""
    proc = _snakemake("-s", str(REPO / "Snakefile"), "-d", str(work), "data", "-n",
                      "--configfile", str(work / configfile), "--cores", "2", cwd=work)
    jobs, rule = [], None
    for line in proc.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
            jobs.append(rule)
        elif line.strip().startswith("wildcards:") and rule:
            jobs[-1] = f"{rule} {line.split(':', 1)[1].strip()}"
    return jobs


def test_rerun_triggers_follow_the_files_and_settings_a_job_uses(data_run):
    work, root = data_run
    assert _planned(work) == []
    # An unrelated file in the dataset folder is not an input of anything.
    (root / "notes.txt").write_text("my notes\n")
    assert _planned(work) == []
    # More test shards: the test split is re-cut; the train and val shards stay.
    planned = _planned(work, "c3.yaml")
    assert sorted(j for j in planned if j.startswith("crop_shard")) == [
        f"crop_shard dataset=target, split=test, shard={i:05d}" for i in range(3)]
    # shard_index reads the skipped reports and the .npy files: they are its inputs.
    skipped = work / "results/r/data/target/shards/val/shard-00000.skipped.json"
    skipped.write_text(skipped.read_text() + "\n")
    assert _planned(work) == ["shard_index dataset=target, split=val", "data"]
    # Editing an annotation file in place reruns the manifests (and what follows from them).
    boxes = root / "bounding_boxes.txt"
    lines = boxes.read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 5"
    boxes.write_text("\n".join(lines) + "\n")
    planned = _planned(work)
    assert "manifests dataset=target" in planned
    assert sum(j.startswith("crop_shard") for j in planned) == 5
