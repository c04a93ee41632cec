#!/usr/bin/env python
"""Input pipeline: the fraction of training step time spent waiting for input.

Writes a 224-pixel split of 5,000 images as npy shards (random pixels: the content does not
change the cost of reading), reads it once so it is in the page cache, then

1. trains with ``fit`` for one epoch and reads the per-epoch ``input_wait_fraction`` (time
   the training thread spent blocked on the background input thread / epoch time), for a
   small ResNet-18 (fast steps: the hardest case for the loader) at 224 pixels;
2. times the loader alone: shuffled batches gathered from the memory-mapped shards and put
   on the device by the prefetch thread, nothing else, in images/s and MB/s.

Results: benchmarks/results/input_pipeline.json. Usage: python benchmarks/input_pipeline.py
[--images 5000] [--batch-size 64] [--workdir DIR].
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "input_pipeline.json"


def write_split(root: Path, n: int, size: int, shards: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from finegrained.fileio import sha256_file
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for s in range(shards):
        count = n // shards + (s < n % shards)
        images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, 100, count).astype(np.int32)
        meta, npy = root / f"shard-{s:05d}.parquet", root / f"shard-{s:05d}.npy"
        pq.write_table(pa.table({"label": labels}), meta)
        np.save(npy, images)
        entries.append({"meta": meta.name, "meta_sha256": sha256_file(meta),
                        "images": npy.name, "images_sha256": sha256_file(npy), "count": count})
    index = root / "index.json"
    index.write_text(json.dumps({"split": "train", "image_size": size, "format": "npy",
                                 "count": n, "shards": entries}))
    return index


def loader_only(reader, batch_size: int, batches: int) -> dict:
    from finegrained.train.loop import Prefetcher, epoch_batches
    from finegrained.train.sharding import make_mesh, shard_batch
    mesh = make_mesh(1)
    labels = reader.labels
    order = epoch_batches(len(reader), batch_size, seed=0, epoch=0)[:batches]

    def load(idx):
        return shard_batch({"image": reader.gather(idx), "label": labels[idx]}, mesh)

    t0 = time.perf_counter()
    for batch in Prefetcher(order, load, depth=3):
        jax.block_until_ready(batch)
    seconds = time.perf_counter() - t0
    images = batches * batch_size
    nbytes = images * reader.image_size ** 2 * 3
    return {"images_per_second": images / seconds, "mb_per_second": nbytes / seconds / 1e6,
            "batches": batches, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    from flax import nnx
    from finegrained.data.shards import ShardReader
    from finegrained.models import build_model
    from finegrained.train.augment import AugmentConfig
    from finegrained.train.loop import TrainConfig, fit

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        index = write_split(Path(tmp) / "train", args.images, 256)
        reader = ShardReader(index)
        reader.gather(np.arange(len(reader)))          # into the page cache
        loader = loader_only(reader, args.batch_size, batches=len(reader) // args.batch_size)
        model = build_model("resnet18", 100, width=16, rngs=nnx.Rngs(0))
        cfg = TrainConfig(epochs=2, batch_size=args.batch_size, image_size=224,
                          compute_dtype="float32", warmup_epochs=0, log_every_steps=0,
                          augment=AugmentConfig(flip=0.5, brightness=0.2))
        history = fit(model, reader, None, cfg, log_fn=print).history
    epoch = history[-1]                                   # the first includes compilation
    result = {
        "benchmark": "input_pipeline", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}",
        "cpu_count": __import__("os").cpu_count(),
        "split": {"images": args.images, "stored_size": 256, "train_size": 224, "format": "npy"},
        "training": {"model": "resnet18 width 16", "batch_size": args.batch_size,
                     "images_per_second": epoch["images_per_second"],
                     "input_wait_fraction": epoch["input_wait_fraction"],
                     "epoch_seconds": epoch["seconds"]},
        "loader_only": loader,
        "command": "python benchmarks/input_pipeline.py",
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
