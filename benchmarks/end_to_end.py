"""End to end: the wall time of every ``make demo`` stage, and the NABirds-scale DAG.

1. Reads the benchmark files Snakemake wrote for a finished demo run
   (``<results>/benchmarks/<rule>/**/*.tsv``, one per job: seconds, max RSS, CPU time) and
   sums them per rule; the run's wall span is estimated from the files' modification times
   (each is written when its job ends: first end - its seconds .. last end).
2. Dry-runs the real configuration (``config/config.yaml``) with ``dataset.root`` pointed at
   a stand-in folder holding the real NABirds annotation files from ``../shared`` (no
   photos: a dry run reads none) and reports Snakemake's job counts per rule.

    python benchmarks/end_to_end.py [--results results/demo] [--shared ../shared]

Writes ``benchmarks/results/end_to_end.json``.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, RESULTS, SHARED, shared_path, write_result

TITLE = "End to end: the demo's stages and the NABirds DAG"
#: The demo's rules in pipeline order (the ones that write a benchmark file).
DEMO_RULES = ("demo_dataset", "manifests", "crop_shard", "shard_index", "channel_stats",
              "pretrain", "init_target_model", "features", "train", "evaluate")


def read_benchmarks(results: Path) -> dict:
    """Per rule: jobs, summed/max seconds, CPU seconds, max RSS (MB), and the job rows."""
    rules: dict[str, dict] = {}
    ends, starts = [], []
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows:
            continue
        row = rows[-1]
        rel = path.relative_to(results / "benchmarks")
        if len(rel.parts) == 1:            # one job per run: benchmarks/<rule>.tsv
            rule, job = rel.stem, rel.stem
        else:
            rule, job = rel.parts[0], str(rel.with_suffix("").relative_to(rel.parts[0]))
        seconds = float(row["s"])
        entry = rules.setdefault(rule, {"jobs": 0, "seconds": 0.0, "max_job_seconds": 0.0,
                                        "cpu_seconds": 0.0, "max_rss_mb": 0.0, "by_job": {}})
        entry["jobs"] += 1
        entry["seconds"] += seconds
        entry["max_job_seconds"] = max(entry["max_job_seconds"], seconds)
        entry["cpu_seconds"] += _number(row.get("cpu_time"))
        entry["max_rss_mb"] = max(entry["max_rss_mb"], _number(row.get("max_rss")))
        entry["by_job"][job] = round(seconds, 2)
        end = path.stat().st_mtime
        ends.append(end)
        starts.append(end - seconds)
    for entry in rules.values():
        for key in ("seconds", "max_job_seconds", "cpu_seconds", "max_rss_mb"):
            entry[key] = round(entry[key], 2)
    order = {rule: i for i, rule in enumerate(DEMO_RULES)}
    rules = dict(sorted(rules.items(), key=lambda kv: order.get(kv[0], len(order))))
    total = round(sum(e["seconds"] for e in rules.values()), 1)
    return {"rules": rules, "job_seconds_total": total,
            "wall_span_seconds": round(max(ends) - min(starts), 1) if ends else None,
            "first_job_start": _utc(min(starts)) if ends else None,
            "last_job_end": _utc(max(ends)) if ends else None,
            "missing_rules": [r for r in DEMO_RULES if r not in rules]}


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def parse_job_stats(text: str) -> dict[str, int]:
    """The ``Job stats:`` table of a Snakemake dry run: ``{rule: count}`` and ``total``."""
    counts = {}
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Job stats:")
    except StopIteration:
        raise ValueError("no 'Job stats:' table in the dry-run output") from None
    for line in lines[start + 1:]:
        match = re.fullmatch(r"\s*([A-Za-z_][\w]*)\s+(\d+)\s*", line)
        if match:
            counts[match.group(1)] = int(match.group(2))
            if match.group(1) == "total":
                break
    return counts


def nabirds_dry_run(annotations: Path, configfile: Path) -> dict:
    """Job counts of ``snakemake -n all`` on the real config over a stand-in root."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "nabirds"
        (root / "images").mkdir(parents=True)
        for path in annotations.glob("*.txt"):
            shutil.copy(path, root / path.name)
        extra = Path(tmp) / "standin.yaml"
        extra.write_text(f"dataset:\n  root: {root}\n")
        command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                   "--configfile", str(configfile), str(extra), "-n", "all",
                   "--cores", "32", "--resources", "gpu=4", "-d", str(Path(tmp) / "run")]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dry run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    counts = parse_job_stats(proc.stdout + proc.stderr)
    return {"config": str(configfile.relative_to(REPO)), "jobs": counts,
            "total_jobs": counts.get("total"), "dry_run_seconds": round(seconds, 1),
            "command": "snakemake -n all --cores 32 --resources gpu=4 --configfile "
                       "config/config.yaml <dataset.root: stand-in with the real annotations>"}


def main(argv=None) -> int:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "results" / "demo")
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--configfile", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--out", type=Path, default=RESULTS / "end_to_end.json")
    args = parser.parse_args(argv)

    demo = None
    if (args.results / "benchmarks").is_dir():
        demo = {"results": str(args.results), **read_benchmarks(args.results)}
        demo["complete"] = not demo["missing_rules"]
    else:
        print(f"no demo run at {args.results} (run `make demo`); stage times skipped",
              file=sys.stderr)
    annotations = shared_path("data", "nabirds_annotations", base=args.shared)
    dag = nabirds_dry_run(annotations, args.configfile.resolve()) if annotations else None
    if demo is None and dag is None:
        return 0
    out = write_result("end_to_end", TITLE, {"demo": demo, "nabirds_dag": dag}, argv=argv,
                       started=started, out=args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
