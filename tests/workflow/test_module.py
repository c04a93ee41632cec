"""The workflow as a Snakemake module of another workflow, with a prefix: it reads its own
files from its clone (not the host's folder), every file it writes lands under the prefix,
and a second copy of the library on the path is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())

HOST = f"""\
configfile: "host.yaml"


module finegrained:
    snakefile: "{REPO}/Snakefile"
    config: config
    prefix: "birds"


use rule * from finegrained as finegrained_*


rule host_all:
    default_target: True
    input:
        rules.finegrained_all.input,
"""


def _snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   **(env or {}))
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args],
                          cwd=workdir, env=environ, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A host workflow in a folder of its own, the tiny run (two regimes) as its module's
    config, run to the end (the module's `all`: evaluations, figures, report notebooks)."""
    workdir = tmp_path_factory.mktemp("host")
    (workdir / "Snakefile").write_text(HOST)
    config = {**TINY, "regimes": ["linear_probe", "full_finetune"]}
    (workdir / "host.yaml").write_text(yaml.safe_dump(config))
    proc = _snakemake(workdir)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir


@pytest.mark.slow(seconds=90)
def test_every_file_of_the_module_lands_under_the_prefix(host):
    written = {p.relative_to(host).parts[0] for p in host.iterdir()}
    # The host's own files, Snakemake's metadata, the module's outputs, and the compilation
    # cache shared by every run (resources.train.compilation_cache, a path of the config).
    assert written == {"Snakefile", "host.yaml", ".snakemake", "birds", "resources"}, written
    assert [p.name for p in (host / "resources").iterdir()] == ["jax_cache"]
    run = host / "birds" / "results" / "tiny"
    for name in ("train/linear_probe/summary.json", "train/full_finetune/weights.safetensors",
                 "eval/full_finetune/metrics.json", "features/train/index.json",
                 "logs/train/full_finetune.log", "benchmarks/pretrain.tsv",
                 "report/notebooks/results.ipynb", "report/figures/regime_views.png",
                 "report/figures/confused_pairs.png", "report/tables/throughput.md"):
        assert (run / name).is_file(), name
    assert not (host / "results").exists() and not list((host / "birds").glob("*.log"))
    # The jobs were told prefixed paths (checkpoints, cache, report benchmarks included).
    log = (run / "logs" / "train" / "full_finetune.log").read_text()
    assert "Traceback" not in log
    assert not (host / "results").exists()


def test_a_second_copy_of_the_library_is_refused(tmp_path):
    """Another finegrained imported first (another clone's module, an installed copy): the
    workflow stops at once rather than mixing two versions of the code."""
    other = tmp_path / "other" / "finegrained"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (tmp_path / "Snakefile").write_text(
        f"import sys\nsys.path.insert(0, {str(other.parent)!r})\nimport finegrained\n\n" + HOST)
    (tmp_path / "host.yaml").write_text(yaml.safe_dump(TINY))
    proc = _snakemake(tmp_path, "-n")
    assert proc.returncode != 0
    assert "the finegrained library imported is" in proc.stdout + proc.stderr
    assert str(other) in proc.stdout + proc.stderr
