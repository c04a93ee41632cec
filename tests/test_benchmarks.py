"""The benchmarks' pure helpers: statistics, the renderer, Snakemake's benchmark and dry-run
output. Nothing here is timed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import end_to_end  # noqa: E402
import render  # noqa: E402


def test_summary_is_median_min_max_of_the_repetitions():
    s = _common.summary([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4, "values": [3.0, 1.0, 2.0, 10.0]}
    assert _common.summary([0.00123456, 5.0, 12345.678])["values"] == [0.001235, 5.0, 12346.0]
    with pytest.raises(ValueError):
        _common.summary([])


def test_ratios_pair_repetitions_and_rates_invert_seconds():
    r = _common.ratios([10.0, 30.0, 20.0], [5.0, 10.0, 10.0])
    assert r["values"] == [2.0, 3.0, 2.0] and r["median"] == 2.0 and r["max"] == 3.0
    with pytest.raises(ValueError):
        _common.ratios([1.0], [1.0, 2.0])
    assert _common.rates([2.0, 4.0], 100)["values"] == [50.0, 25.0]


def test_write_result_wraps_the_payload_in_the_envelope(tmp_path):
    out = _common.write_result("fake", "A fake", {"x": 1}, argv=["--n", "3"], started=0.0,
                               out=tmp_path / "fake.json")
    report = json.loads(out.read_text())
    assert report["benchmark"] == "fake" and report["x"] == 1
    assert report["command"] == "python benchmarks/fake.py --n 3"
    assert report["machine"]["cores"] >= 1 and "cpu" in report["machine"]


def test_render_lays_out_known_unknown_and_outdated_results(tmp_path):
    envelope = {"date": "2026-01-01 00:00 UTC", "command": "python benchmarks/x.py",
                "machine": {"cpu": "Test CPU", "cores": 2, "load_average": [1.0, 2.0, 3.0]},
                "wall_seconds": 12.0}
    ratio = _common.summary([40.0, 25.0, 30.0])
    (tmp_path / "input_pipeline.json").write_text(json.dumps({
        **envelope, "benchmark": "input_pipeline", "images": 8, "batch_size": 4, "repeats": 3,
        "images_per_s": {"ours": _common.summary([900.0, 1000.0, 1100.0]),
                         "photos_1_process": _common.summary([30.0, 40.0, 35.0])},
        "ratio_ours_over": {"photos_1_process": ratio}, "target_ratio": 20.0,
        "target_met_vs_photos_1_process": True,
        "ours_mb_per_s": _common.summary([200.0, 190.0, 210.0]),
        "memcpy": {"array_mb": 64, "mb_per_s": _common.summary([4000.0, 4100.0, 3900.0])},
        "ours_fraction_of_memcpy": 0.05, "training": None, "notes": ["a note"]}))
    (tmp_path / "new_thing.json").write_text(json.dumps({
        **envelope, "benchmark": "new_thing", "title": "A new thing", "speed": 1.5,
        "timing": _common.summary([1.0, 2.0, 3.0]), "nested": {"skip": 1}}))
    (tmp_path / "linear_probe.json").write_text(json.dumps({**envelope, "old_key": 3}))
    text = render.render(tmp_path)
    assert text.startswith("# Benchmarks")
    assert "| 2 | shard loader / JPEG folder (photos, 1 process) | 30 [25 - 40] | >= 20x | **met** |" in text
    assert "## 2. Loader" in text and "Test CPU, 2 cores" in text and "load average 1.00 / 2.00 / 3.00" in text
    assert "Command: `python benchmarks/x.py` (12 s)." in text
    assert "## A new thing" in text and "| speed | 1.5 |" in text and "| timing | 2 [1 - 3] |" in text
    assert "## 4. Linear probe" in text and "predates the current layout" in text
    assert "not measured" in text
    assert text.index("## 2. Loader") < text.index("## 4. Linear probe") < text.index("## A new thing")


def test_stat_formats_median_and_spread():
    assert render.stat(_common.summary([1.0, 2.0, 4.0]), " s") == "2 s [1 - 4]"
    assert render.stat(None) == "n/a"
    assert render.stat(_common.summary([12000.0, 13000.0, 14000.0])) == "13,000 [12,000 - 14,000]"


def test_parse_job_stats_reads_the_dry_run_table():
    text = ("Building DAG of jobs...\nJob stats:\njob                  count\n"
            "-----------------  -------\nmanifests                1\ncrop_shard              34\n"
            "all                      1\ntotal                   36\n\n[Mon]\nrule manifests:\n")
    assert end_to_end.parse_job_stats(text) == {"manifests": 1, "crop_shard": 34, "all": 1,
                                                "total": 36}
    with pytest.raises(ValueError):
        end_to_end.parse_job_stats("nothing to do")


def test_read_benchmarks_sums_jobs_per_rule(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    files = {"crop_shard/target/train/00000.tsv": "2.0\t0:00:02\t100\t1\t1\t1\t0\t0\t0\t1.5\n",
             "crop_shard/target/train/00001.tsv": "3.0\t0:00:03\t120\t1\t1\t1\t0\t0\t0\t2.5\n",
             "pretrain.tsv": "10.0\t0:00:10\t900\t1\t1\t1\t0\t0\t0\tNA\n"}
    for rel, row in files.items():
        path = tmp_path / "benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + row)
    out = end_to_end.read_benchmarks(tmp_path)
    crop = out["rules"]["crop_shard"]
    assert (crop["jobs"], crop["seconds"], crop["max_job_seconds"]) == (2, 5.0, 3.0)
    assert (crop["cpu_seconds"], crop["max_rss_mb"]) == (4.0, 120.0)
    assert crop["by_job"] == {"target/train/00000": 2.0, "target/train/00001": 3.0}
    assert out["rules"]["pretrain"]["seconds"] == 10.0
    assert list(out["rules"]) == ["crop_shard", "pretrain"]       # pipeline order
    assert out["job_seconds_total"] == 15.0 and "features" in out["missing_rules"]


@pytest.mark.slow(seconds=110)
def test_the_device_check_runs_every_section_at_toy_sizes(tmp_path, repo_root):
    """The GPU device check's smoke mode on this machine's CPU: the same code path as on
    a GPU (children per section, the loop on disk shards, the shared compilation cache),
    so the script cannot rot before a GPU is lent."""
    import subprocess

    import device_check

    bundle = tmp_path / "bundle"
    weights = repo_root.parent / "shared" / "weights"
    if (weights / "expected_outputs.json").exists():
        bundle.mkdir()
        (bundle / "weights").symlink_to(weights)
    out = tmp_path / "device_check.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "device_check.py"), "--smoke",
                           "--bundle", str(bundle), "--out", str(out), "--budget", "900"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    expected = {"environment", "train", "ten_crop", "features", "compile_cache", "batch_memory",
                "xla_flags"}
    if bundle.exists():
        expected.add("mobilenet_reference")
        reference = result["sections"]["mobilenet_reference"]["result"]
        imagenet = reference["mobilenet_v2_1.0_224_imagenet"]
        assert imagenet["shifted/float32"]["top5_matches"]
        assert imagenet["shifted/float32"]["max_abs_logit_diff"] < 1e-4
        assert imagenet["shifted_vs_grouped_float32_max_abs_diff"] < 1e-4
        assert imagenet["grouped/bfloat16"]["top1_matches"]
    assert set(result["sections"]) == expected, result["skipped"]
    text = json.dumps(result["sections"])
    assert '"error"' not in text, text[:3000]
    train = result["sections"]["train"]["result"]
    assert all(row["images_per_second"] > 0 and 0 <= row["input_wait_fraction"] < 1
               for row in train.values())
    cache = result["sections"]["compile_cache"]["result"]
    assert cache["cold_first_step_s"] > cache["warm_first_step_s"] > 0
    assert "vit_small_patch14/bfloat16" in train                     # the ViT rows (#27)
    features = result["sections"]["features"]["result"]
    assert set(features) == set(device_check.VITS)
    assert all(row["images_per_second"] > 0 and row["layer"] == "norm"
               for row in features.values())
    assert result["verdict"]["resnet50_target_met"] is None          # toy sizes judge nothing
    assert result["verdict"]["vit_small_patch14_features_target_met"] is None
    section = render.device_check_section(result)
    assert "Smoke run" in section and "Compilation cache" in section
    assert "Feature extraction" in section and "ViT-B/16 bf16 train step" in section


def test_the_device_check_measures_the_batch_sizes_of_the_gpu_config(repo_root):
    import device_check
    import yaml
    gpu = yaml.safe_load((repo_root / "config/examples/gpu.yaml").read_text())
    assert device_check.GPU_BATCH[("resnet50", "bfloat16")] == \
        gpu["regime_settings"]["full_finetune"]["batch_size"]


def test_the_device_bundle_brings_every_dependency_the_gpu_machine_may_lack(repo_root):
    """`make device-bundle` downloads a wheel of each core dependency beyond the GPU
    machine's stack (JAX+CUDA, flax, optax, orbax, pyarrow, pillow); snakemake runs no job
    there."""
    import re
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name.lower() for r in project["dependencies"]}
    machine = {"numpy", "pillow", "pyarrow", "jax", "flax", "optax", "orbax-checkpoint",
               "snakemake"}
    line = re.search(r"^DEVICE_WHEELS := (.*)$", (repo_root / "Makefile").read_text(), re.M)
    assert core - machine == set(line.group(1).lower().split())


def test_the_device_check_unpacks_only_the_wheels_the_machine_lacks(tmp_path):
    import subprocess
    import zipfile

    import device_check
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist, body in [("fg_absent_probe", "VALUE = 7\n"),
                       ("numpy", "raise ImportError('shadowed')\n")]:     # installed here
        with zipfile.ZipFile(wheels / f"{dist}-1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(f"{dist}/__init__.py", body)
            archive.writestr(f"{dist}-1.0.dist-info/METADATA",
                             f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    site = tmp_path / "site"
    assert device_check.unpack_missing(wheels, site) == ["fg_absent_probe"]
    assert sorted(p.name for p in site.iterdir()) == ["fg_absent_probe",
                                                      "fg_absent_probe-1.0.dist-info"]
    proc = subprocess.run([sys.executable, "-c", "import fg_absent_probe, numpy; "
                           "print(fg_absent_probe.VALUE)"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(site)})
    assert proc.stdout.strip() == "7", proc.stderr
