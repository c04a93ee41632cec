"""The pipeline on a real SLURM: `make test-slurm` (about 40 minutes on a busy 2-core machine).

Needs the one-node test cluster of tests/workflow/slurm/cluster.sh (four fake GPUs, accounting off)
and snakemake-executor-plugin-slurm; `make test-slurm` starts both, then runs this file with
FINEGRAINED_SLURM_TEST=1. Otherwise (`make test`) it skips.

The shortened demo (config/demo.yaml + tests/workflow/slurm/short.yaml) runs twice: locally
(run_name slurm_local) and with --profile profiles/slurm (run_name slurm_cluster). While the
SLURM run trains full_finetune, the test waits for its first checkpoint and scancels the job;
the profile's retry must resume from that checkpoint. Then:

- every non-local Snakemake job was submitted to SLURM and has its SLURM log, every local
  rule ran on the submitting node;
- the GPU rules asked SLURM for one GPU (TresPerJob gres:gpu:1) and their jobs leased it
  (logged by finegrained.launch), the others asked for none;
- with `cluster.gpu_request: gres` the pretraining job asks by `--gres=gpu:1` instead
  (TresPerNode gres:gpu:1), on the same one-node cluster (Gres=gpu:4);
- the retry of the cancelled job resumed from its checkpoint;
- the results equal the local run's (pretrain, training summaries, test metrics).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
CONFIG = ["config/demo.yaml", "tests/workflow/slurm/short.yaml"]
LOCAL, CLUSTER = "slurm_local", "slurm_cluster"
GPU_RULES = {"pretrain", "features", "feature_map", "train_regime", "evaluate_regime"}
CANCELLED_JOB = "full_finetune"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("FINEGRAINED_SLURM_TEST") != "1",
                       reason="the SLURM integration test runs with `make test-slurm`"),
]


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _snakemake(run_name: str, *extra: str, log: Path, target: str = "all") -> subprocess.Popen:
    """Snakemake on the shortened demo; ``extra`` items with ``=`` before the first option
    are more --config values."""
    config = [e for e in extra if "=" in e and not e.startswith("-")]
    options = [e for e in extra if e not in config]
    cmd = [str(SNAKEMAKE), target, "--configfile", *CONFIG, "--config", f"run_name={run_name}",
           *config, *options]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


def _jobs(console: str) -> list[dict]:
    """The job blocks Snakemake printed: rule, local or not, jobid, log (not those of the
    failed jobs' logs it shows, `show-failed-logs`)."""
    console = re.sub(r"^Logfile .*:\n={40,}\n.*?^={40,}\n", "", console, flags=re.M | re.S)
    jobs = []
    for m in re.finditer(r"^(local)?rule (\w+):\n((?:    .*\n)+)", console, re.M):
        fields = dict(re.findall(r"^    (\w+): (.*)$", m.group(3), re.M))
        jobs.append({"rule": m.group(2), "local": bool(m.group(1)),
                     "jobid": int(fields["jobid"]), "log": fields.get("log")})
    return jobs


def _slurm_jobs(ids) -> dict[str, dict]:
    """scontrol's record of each SLURM job (MinJobAge keeps finished ones)."""
    out = {}
    for jid in ids:
        line = _sh("scontrol", "show", "job", "-o", str(jid))
        out[str(jid)] = dict(re.findall(r"(\w+)=(\S*)", line))
    return out


class Canceller(threading.Thread):
    """Waits for the SLURM job of train job ``name`` (regime and variant) to run and write a
    checkpoint, then scancels it."""

    def __init__(self, run_dir: Path, name: str = CANCELLED_JOB, variant: str = ""):
        super().__init__(daemon=True)
        self.run_dir, self.done = run_dir, threading.Event()
        self.comment = f"rule_train_regime_wildcards_{name}_{variant}"
        self.folder = f"{name}{variant}"
        self.cancelled: dict | None = None

    def run(self):
        while not self.done.is_set():
            try:
                queue = _sh("squeue", "-h", "-t", "RUNNING", "-o", "%i|%k")
            except subprocess.CalledProcessError:    # a busy controller: ask again
                time.sleep(1)
                continue
            running = [line.split("|") for line in queue.splitlines()]
            job = next((jid for jid, comment in running if comment == self.comment), None)
            steps = sorted(int(p.name) for p in
                           self.run_dir.glob(f"checkpoints/{glob.escape(self.folder)}/*/*")
                           if p.name.isdigit())
            if job and steps:
                subprocess.run(["scancel", job], check=True)
                self.cancelled = {"slurm_jobid": job, "checkpoint_step": steps[-1]}
                return
            time.sleep(0.5)


def _numbers(tree, prefix=""):
    """Flatten the numeric leaves of a JSON tree, leaving out timing and provenance."""
    skip = ("seconds", "wall", "images_per_second", "input_wait", "provenance", "time",
            "settings", "config", "sha256", "devices")
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if not any(s in k for s in skip):
                out.update(_numbers(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, list):
        out = {}
        for i, v in enumerate(tree):
            out.update(_numbers(v, f"{prefix}/{i}"))
        return out
    return {prefix: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    try:
        _sh("sinfo", "-h")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"no SLURM cluster reachable (tests/workflow/slurm/cluster.sh start): {exc}")
    logs = tmp_path_factory.mktemp("slurm")
    # The local reference is left to Snakemake (rerun if code or config changed), the SLURM
    # run starts from nothing.
    shutil.rmtree(REPO / "results" / CLUSTER, ignore_errors=True)
    shutil.rmtree(REPO / ".snakemake" / "slurm_logs", ignore_errors=True)

    t0 = time.monotonic()
    local = _snakemake(LOCAL, "--cores", "2", log=logs / "local.log")
    assert local.wait() == 0, (logs / "local.log").read_text()[-5000:]
    local_s = time.monotonic() - t0

    canceller = Canceller(REPO / "results" / CLUSTER)
    canceller.start()
    t0 = time.monotonic()
    cluster = _snakemake(CLUSTER, "--profile", "profiles/slurm",
                         "--slurm-status-command", "squeue", "--slurm-no-account",
                         "--slurm-keep-successful-logs",
                         "--slurm-init-seconds-before-status-checks", "5",
                         log=logs / "cluster.log")
    code = cluster.wait()
    canceller.done.set()
    console = (logs / "cluster.log").read_text()
    assert code == 0, console[-5000:]
    print(f"local run {local_s:.0f} s, SLURM run {time.monotonic() - t0:.0f} s; "
          f"console logs in {logs}")
    return {"console": console, "cancelled": canceller.cancelled}


def test_every_non_local_job_ran_as_a_slurm_job(runs):
    console = runs["console"]
    jobs = _jobs(console)
    submitted = {int(a): b for a, b in
                 re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", console)}
    remote = {j["jobid"]: j for j in jobs if not j["local"]}
    local = {j["jobid"]: j for j in jobs if j["local"]}
    assert remote and local
    assert set(remote) == set(submitted), (sorted(remote), sorted(submitted))
    assert not set(local) & set(submitted)
    # the Snakefile's localrules (light rules) and the weights download
    assert {j["rule"] for j in local.values()} <= {
        "shard_index", "all", "data", "weights", "train", "select_sweep", "evaluate",
        "summarize", "figures", "fetch_weights"}
    assert {j["rule"] for j in remote.values()} == {
        "demo_dataset", "manifests", "crop_shard", "channel_stats", "pretrain",
        "init_target_model", "features", "train_regime", "evaluate_regime", "report_results",
        "report_examples"}
    # every SLURM job (retries included) left its log, named by rule and job id
    slurm_ids = re.findall(r"submitted with SLURM jobid (\d+)", console)
    logs = {p.stem: p for p in (REPO / ".snakemake" / "slurm_logs").rglob("*.log")}
    for jid in slurm_ids:
        assert jid in logs, f"no SLURM log for job {jid}"
    print(f"{len(remote)} Snakemake jobs as {len(slurm_ids)} SLURM jobs, {len(local)} local")


def test_gpu_rules_got_one_gpu_each(runs):
    console = runs["console"]
    slurm_ids = re.findall(r"submitted with SLURM jobid (\d+)", console)
    records = _slurm_jobs(slurm_ids)
    for jid, rec in records.items():
        rule = re.match(r"rule_(\w+?)(_wildcards_|$)", rec["Comment"]).group(1)
        gpus = rec.get("TresPerJob", "")
        if rule in GPU_RULES:
            assert gpus == "gres:gpu:1", (jid, rule, gpus)
        else:
            assert "gpu" not in gpus, (jid, rule, gpus)
        expected = "CANCELLED" if runs["cancelled"] and jid == runs["cancelled"]["slurm_jobid"] \
            else "COMPLETED"
        assert rec["JobState"] == expected, (jid, rule, rec["JobState"])
    gpu_logs = [j["log"] for j in _jobs(console) if j["rule"] in GPU_RULES and not j["local"]]
    assert gpu_logs
    for log in set(gpu_logs):
        text = (REPO / log).read_text()
        assert re.search(r"\[finegrained\.launch\] GPU\(s\) \d of SLURM job \d+'s GPUs \d "
                         r"leased", text), (log, text[:500])


def test_the_gres_route_asks_by_gres(tmp_path):
    """`cluster.gpu_request: gres`: the GPU job's sbatch asks `--gres=gpu:1` (SLURM records
    it per node), not `--gpus`; a CPU job asks for no GPU either way."""
    name = "slurm_gres"
    shutil.rmtree(REPO / "results" / name, ignore_errors=True)
    log = tmp_path / "gres.log"
    proc = _snakemake(name, "cluster={gpu_request: gres}", "pretrain={epochs: 1}",
                      "--profile", "profiles/slurm", "--slurm-status-command", "squeue",
                      "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "5",
                      target=f"results/{name}/pretrain/weights.safetensors", log=log)
    console = log.read_text() if proc.wait() == 0 else pytest.fail(log.read_text()[-5000:])
    records = _slurm_jobs(re.findall(r"submitted with SLURM jobid (\d+)", console))
    by_rule = {re.match(r"rule_(\w+?)(_wildcards_|$)", r["Comment"]).group(1): r
               for r in records.values()}
    assert by_rule["pretrain"].get("TresPerNode") == "gres:gpu:1", by_rule["pretrain"]
    assert "gpu" not in by_rule["pretrain"].get("TresPerJob", ""), by_rule["pretrain"]
    assert "gpu" not in by_rule["crop_shard"].get("TresPerNode", "") + by_rule[
        "crop_shard"].get("TresPerJob", "")
    assert by_rule["pretrain"]["JobState"] == "COMPLETED"


def test_cancelled_training_job_resumed_from_its_checkpoint(runs):
    cancelled = runs["cancelled"]
    assert cancelled, "the full_finetune job was never caught running with a checkpoint"
    log = REPO / "results" / CLUSTER / "logs"
    texts = [p.read_text() for p in log.rglob(f"*{CANCELLED_JOB}*")]
    resumed = [int(s) for t in texts for s in re.findall(r"resumed from checkpoint at step (\d+)", t)]
    assert resumed and resumed[0] >= cancelled["checkpoint_step"], (resumed, cancelled)
    print(f"cancelled SLURM job {cancelled['slurm_jobid']} after checkpoint step "
          f"{cancelled['checkpoint_step']}; the retry resumed at step {resumed[0]}")


def test_results_equal_the_local_run(runs):
    local, cluster = REPO / "results" / LOCAL, REPO / "results" / CLUSTER
    files = ["pretrain/metrics.json"]
    for regime in ("linear_probe", CANCELLED_JOB):
        files += [f"train/{regime}/summary.json", f"eval/{regime}/metrics.json"]
    for name in files:
        a = _numbers(json.loads((local / name).read_text()))
        b = _numbers(json.loads((cluster / name).read_text()))
        assert a and a == b, (name, {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                                     if a.get(k) != b.get(k)})
    same = [(local / f"train/{r}/weights.safetensors").read_bytes()
            == (cluster / f"train/{r}/weights.safetensors").read_bytes()
            for r in ("linear_probe", CANCELLED_JOB)]
    print(f"metrics equal; trained weights byte-identical: {same}")


@pytest.mark.parametrize("mode", ["sync", "local_sgd"])
def test_two_srun_tasks_train_like_one_process(tmp_path, mode):
    """Two SLURM tasks (2 CPU devices each) join through jax's SLURM detection and train
    like one process with 4 devices (tests/test_distributed.py's worker and comparison),
    with synchronous data parallelism and with local SGD."""
    from test_distributed import WORKER, _env, compare_runs

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests_dir = str(Path(__file__).resolve().parents[1])
    single = subprocess.run(
        [sys.executable, str(script), tests_dir, str(tmp_path / "single.json"),
         str(tmp_path / "ckpt-single"), mode],
        env=_env(4), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr

    env = _env(2)
    env.update({k: v for k, v in os.environ.items() if k.startswith("SLURM_CONF")})
    task = (f"{sys.executable} {script} {tests_dir} {tmp_path}/multi$SLURM_PROCID.json "
            f"{tmp_path}/ckpt-multi {mode}")
    proc = subprocess.run(
        ["sbatch", "--wait", "--ntasks=2", "--cpus-per-task=1", "--mem=4000",
         f"--output={tmp_path}/slurm-%j.out", "--wrap", f"srun sh -c '{task}'"],
        env=env, capture_output=True, text=True, timeout=900)
    outputs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + outputs
    diff = compare_runs(tmp_path / "single.json", [tmp_path / f"multi{i}.json" for i in range(2)])
    print(f"two srun tasks vs one process: max train-loss difference {diff:.3g}")


TASKS_VARIANT = "+seed=1"
#: One training job (full_finetune, seed 1) run as two SLURM tasks of one CPU device each,
#: and as its reference, one local process of two CPU devices; small enough for the node.
TASKS = "resources={train: {gpu: 2, tasks_per_node: 2, threads: 1, mem_mb: 2000, allow_cpu: true}}"
ONE_PROCESS = ("resources={train: {gpu: 1, threads: 1, mem_mb: 2000, allow_cpu: true, "
               "xla_flags: '--xla_force_host_platform_device_count=2'}}")


def test_a_training_job_of_two_tasks_is_one_slurm_job_and_trains_like_one_process(runs, tmp_path):
    """`resources.train.tasks_per_node: 2` with two GPUs: the profile submits one SLURM job of
    2 tasks (one node, --gpus=2), its launcher starts them with srun and each leases one of
    the job's GPUs; scancelled after its first checkpoint, the retry (again 2 tasks) resumes
    from it; its history equals one local process with the same two (CPU) devices. The
    data, pretraining and init are the main runs' (a new seed adds only this job)."""
    name = f"{CANCELLED_JOB}{TASKS_VARIANT}"
    local = _snakemake(LOCAL, "seeds=[0, 1]", ONE_PROCESS, "--cores", "2",
                       target=f"results/{LOCAL}/train/{name}/summary.json",
                       log=tmp_path / "one.log")
    assert local.wait() == 0, (tmp_path / "one.log").read_text()[-5000:]

    canceller = Canceller(REPO / "results" / CLUSTER, CANCELLED_JOB, TASKS_VARIANT)
    canceller.start()
    cluster = _snakemake(CLUSTER, "seeds=[0, 1]", TASKS, "--profile", "profiles/slurm",
                         "--slurm-status-command", "squeue", "--slurm-no-account",
                         "--slurm-keep-successful-logs",
                         "--slurm-init-seconds-before-status-checks", "5",
                         target=f"results/{CLUSTER}/train/{name}/summary.json",
                         log=tmp_path / "tasks.log")
    code = cluster.wait()
    canceller.done.set()
    console = (tmp_path / "tasks.log").read_text()
    assert code == 0, console[-5000:]
    assert canceller.cancelled, "the two-task job was never caught running with a checkpoint"

    # One Snakemake job, two SLURM jobs (the cancelled one and its retry), 2 tasks each.
    assert {j["rule"] for j in _jobs(console) if not j["local"]} == {"train_regime"}
    records = _slurm_jobs(re.findall(r"submitted with SLURM jobid (\d+)", console))
    assert len(records) == 2 and canceller.cancelled["slurm_jobid"] in records
    for jid, rec in records.items():
        assert (rec["NumNodes"], rec["NumTasks"], rec.get("TresPerJob")) == (
            "1", "2", "gres:gpu:2"), rec
        assert rec["JobState"] == ("CANCELLED" if jid == canceller.cancelled["slurm_jobid"]
                                   else "COMPLETED"), rec
    log = (REPO / "results" / CLUSTER / "logs" / "train" / f"{name}.log").read_text()
    assert "[finegrained.launch] srun --nodes=1 --ntasks=2 --ntasks-per-node=2" in log, log[:3000]
    leased = re.findall(r"\[finegrained\.launch\] GPU\(s\) (\d) of SLURM job \d+'s GPUs 0,1 "
                        r"leased", log)
    assert sorted(leased) == ["0", "1"], log[:3000]
    resumed = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", log)]
    assert resumed and resumed[0] >= canceller.cancelled["checkpoint_step"], (resumed, log[:3000])
    assert [line for line in log.splitlines() if line.startswith("error:")] == []

    one, two = (_rows(REPO / "results" / run / "train" / name) for run in (LOCAL, CLUSTER))
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 2
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
        assert (a["train_top1"], a["val_top1"]) == (b["train_top1"], b["val_top1"]), (a, b)
    summaries = [json.loads((REPO / "results" / run / "train" / name / "summary.json")
                            .read_text()) for run in (LOCAL, CLUSTER)]
    assert [(s["devices"], s["processes"]) for s in summaries] == [("2 x cpu", 1), ("2 x cpu", 2)]
    print(f"two SLURM tasks vs one process of 2 devices: max train-loss difference "
          f"{max(abs(a['train_loss'] - b['train_loss']) for a, b in zip(one, two)):.3g}; "
          f"cancelled SLURM job {canceller.cancelled['slurm_jobid']} after checkpoint step "
          f"{canceller.cancelled['checkpoint_step']}, the retry resumed at step {resumed[0]}")


def _rows(run_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.read_table(run_dir / "history.parquet").to_pylist()
