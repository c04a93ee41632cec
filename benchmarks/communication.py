"""Communication that local SGD saves over synchronous training, per step: one process of 4
CPU devices against two processes of 2 (CPU figures; gloo over this machine's loopback).

The model and batch of docs/results-systems.md's demo comparison: ResNet-18 of width 16 at
64 px, batch 32 (8 per device), float32, the pipeline's own jitted steps
(``finegrained.train.loop.prepare``) for ``sync``, ``local_sgd_h4`` and ``local_sgd_h16``.
Each layout runs as the workflow runs a training job: ``python -m finegrained.launch --gpus
0 --tasks-per-node N`` (the two processes joined by the launcher's coordinator).

Per layout:

- ``step_seconds``: seconds per step of each system, over blocks of 16 steps (a block holds
  4 averages of H = 4 and one of H = 16), after one untimed block (compilation);
- ``allreduce_gradients_seconds``: one all-reduce of a gradient-sized tree (the trainable
  parameters, one copy per device, averaged into a replicated result): what synchronous
  training exchanges every step;
- ``average_copies_seconds``: one average of the local SGD copies (parameters, BatchNorm
  statistics and momentum), what local SGD exchanges every H steps;
- ``saved_per_step_seconds``: sync's step time minus local SGD's.

Then ``cross_process_seconds_per_step``: each system's step time on two processes less on
one (the same 4 devices and batch): what its exchanges cost once they cross processes, sync's
every step (the gradient all-reduce, and the BatchNorm statistics it reduces over the whole
batch, layer by layer), local SGD's every H steps (plus each step's loss and accuracy); and
``cross_process_saved_per_step_seconds``: sync's less local SGD's.

Between processes the exchanges cross a TCP socket (gloo); in one process they are copies in
shared memory. Both processes share this machine's cores, so these are CPU figures, not a
network's: the two-process column shows what crossing a process boundary costs here.

    python benchmarks/communication.py [--blocks 3] [--calls 20]

Writes ``benchmarks/results/communication.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, summary, write_result

TITLE = "Communication per step: local SGD against sync, 1 and 2 processes (CPU)"
DEVICES = 4
BATCH, IMAGE, WIDTH, CLASSES = 32, 64, 16, 10
BLOCK = 16
SYSTEMS = {"sync": ("sync", 1), "local_sgd_h4": ("local_sgd", 4),
           "local_sgd_h16": ("local_sgd", 16)}


def worker(blocks: int, calls: int, out: Path) -> None:
    """One process of a layout: every system's step time, then the two exchanges."""
    sys.path.insert(0, str(REPO / "src"))
    from finegrained import distributed
    distributed.initialize()
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from finegrained.models import build_model
    from finegrained.train.augment import Augmentation
    from finegrained.train.local_sgd import Parallel
    from finegrained.train.loop import prepare
    from finegrained.train.precision import nbytes
    from finegrained.train.settings import default_settings
    from finegrained.train.sharding import DATA_AXIS, local_rows, shard_batch

    assert jax.device_count() == DEVICES, jax.devices()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, IMAGE, IMAGE, 3), np.uint8)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    result: dict = {"step_seconds": {}}
    for name, (mode, every) in SYSTEMS.items():
        model = build_model("resnet18", CLASSES, width=WIDTH, rngs=nnx.Rngs(0))
        settings = default_settings(
            epochs=1, batch_size=BATCH, image_size=IMAGE, compute_dtype="float32",
            augment=Augmentation.none(), parallel=Parallel(mode, every, True))
        training = prepare(model, BATCH * BLOCK * (blocks + 1), settings)
        rows = local_rows(BATCH, training.mesh)
        batch = shard_batch({"image": images[rows], "label": labels[rows]}, training.mesh,
                            BATCH)
        state, key, step = training.state, jax.random.key(0), 0
        seconds = []
        for block in range(blocks + 1):
            start = time.perf_counter()
            for _ in range(BLOCK):
                state, metrics = training.train_step(state, batch, jax.random.fold_in(key, step))
                step += 1
            jax.block_until_ready((state, metrics))
            if block:                       # the first block compiles
                seconds.append((time.perf_counter() - start) / BLOCK)
        result["step_seconds"][name] = summary(seconds)
        if mode == "sync":
            one_copy = (state.params,)
            copies = (state.params, state.stats, state.opt_state)
        del training, state, batch

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    local = len(jax.local_devices())

    def per_device(tree):
        """A copy of every leaf on each device, stacked along the data axis."""
        def stack(x):
            value = np.asarray(x.addressable_shards[0].data)
            return jax.make_array_from_process_local_data(
                NamedSharding(mesh, P(DATA_AXIS)), np.stack([value] * local),
                (DEVICES, *value.shape))
        return jax.tree_util.tree_map(stack, tree)

    average = jax.jit(lambda tree: jax.tree_util.tree_map(lambda x: x.mean(0), tree),
                      out_shardings=NamedSharding(mesh, P()))

    def exchange_seconds(tree) -> list[float]:
        stacked = per_device(tree)
        jax.block_until_ready(average(stacked))
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            jax.block_until_ready(average(stacked))
            times.append(time.perf_counter() - start)
        return times

    result["gradient_bytes"] = int(nbytes(one_copy))
    result["copies_bytes"] = int(nbytes(copies))
    result["allreduce_gradients_seconds"] = summary(exchange_seconds(one_copy))
    result["average_copies_seconds"] = summary(exchange_seconds(copies))
    result["devices"] = f"{jax.process_count()} process(es) x {local} {jax.devices()[0].platform}"
    if jax.process_index() == 0:
        out.write_text(json.dumps(result))


def run_layout(tasks: int, blocks: int, calls: int, folder: Path) -> dict:
    """One layout through the workflow's launcher: ``tasks`` processes of 4 / tasks CPU
    devices each."""
    out = folder / f"tasks{tasks}.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "FINEGRAINED_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // tasks}",
               PYTHONPATH=str(REPO / "src"), FINEGRAINED_GPU_LOCK_DIR=str(folder / "locks"))
    proc = subprocess.run(
        [sys.executable, "-m", "finegrained.launch", "--gpus", "0", "--tasks-per-node",
         str(tasks), "--", sys.executable, __file__, "--worker", "--blocks", str(blocks),
         "--calls", str(calls), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"the {tasks}-process layout failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def per_step(layouts: dict) -> dict:
    """What crossing a process boundary costs each system per step (its step time on two
    processes less on one, the same 4 devices), and what local SGD saves of it: sync's cost
    less local SGD's. Within each layout, ``saved_per_step_seconds``: sync's step time less
    local SGD's."""
    medians = []
    for layout in layouts.values():
        t = {name: s["median"] for name, s in layout["step_seconds"].items()}
        layout["saved_per_step_seconds"] = {name: round(t["sync"] - t[name], 4) for name in t
                                            if name != "sync"}
        medians.append(t)
    one, two = medians
    cross = {name: round(two[name] - one[name], 4) for name in one}
    return {"cross_process_seconds_per_step": cross,
            "cross_process_saved_per_step_seconds": {
                name: round(cross["sync"] - cross[name], 4) for name in cross if name != "sync"}}


def main(argv=None) -> int:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks of 16 steps")
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each exchange")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.blocks, args.calls, args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        layouts = {f"{tasks} x {DEVICES // tasks}": run_layout(tasks, args.blocks, args.calls,
                                                               Path(tmp))
                   for tasks in (1, 2)}
    payload = {
        "model": f"resnet18 width {WIDTH}, {IMAGE} px, batch {BATCH} ({BATCH // DEVICES} per "
                 f"device), float32, {CLASSES} classes",
        "cpu_figures": True, "block_steps": BLOCK, "layouts": layouts, **per_step(layouts),
        "notes": ["CPU figures: both processes share this machine's cores and exchange over "
                  "loopback TCP (gloo); no network and no GPU are measured",
                  "the exchanges are timed alone (a mean over the data axis into a replicated "
                  "result, as XLA all-reduces gradients); the step times include them"]}
    argv = list(sys.argv[1:] if argv is None else argv)
    out = write_result("communication", TITLE, payload, argv=argv, started=started,
                       out=args.out)
    for name, layout in layouts.items():
        print(f"{name}: step s {json.dumps({k: v['median'] for k, v in layout['step_seconds'].items()})}; "
              f"all-reduce {layout['allreduce_gradients_seconds']['median']} s, average "
              f"{layout['average_copies_seconds']['median']} s", file=sys.stderr)
    print(f"crossing processes, s per step: {json.dumps(payload['cross_process_seconds_per_step'])}; "
          f"saved by local SGD: {json.dumps(payload['cross_process_saved_per_step_seconds'])}",
          file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
