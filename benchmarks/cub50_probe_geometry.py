"""Why the pipeline's cub50 probe is where it is: the same L-BFGS probe on pooled MobileNetV2
features of other views of the stored crops (the whole photo vs the central 87.5 %), fitted
on train (L2 chosen on validation, as the pipeline does) and on train + validation.

    python benchmarks/cub50_probe_geometry.py [--shards results/cub50_inat/data/target/shards]
        [--fractions 1.0 0.875] [--weights inat_birds imagenet]

Reads the shards of a finished cub50 run (config/examples/cub50.yaml); writes
benchmarks/results/cub50_probe_geometry.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from finegrained.data.shards import ShardReader
from finegrained.fileio import write_json
from finegrained.models import assign_state, build_model, to_flat
from finegrained.models.weights import read_tensors
from finegrained.train.augment import center_crop
from finegrained.train.probe import fit_probe

REPO = Path(__file__).resolve().parents[1]
L2_GRID = [1e-4, 1e-3, 1e-2, 1e-1]     # the cub50 config's grid


def pooled_features(weights_file, readers, fraction, image_size, batch=64):
    tensors = to_flat(read_tensors(weights_file), "mobilenet_v2")
    model = nnx.eval_shape(lambda: build_model("mobilenet_v2", tensors["head/bias"].shape[0],
                                               rngs=nnx.Rngs(0)))
    assign_state(model, tensors)
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, images):
        return nnx.merge(graphdef, state).pooled_features(
            center_crop(images, image_size, fraction))

    out = {}
    for split, reader in readers.items():
        rows = []
        for start in range(0, len(reader), batch):
            idx = np.arange(start, min(start + batch, len(reader)))
            images = reader.gather(idx)
            pad = batch - len(idx)
            if pad:
                images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
            rows.append(np.asarray(pooled(state, images))[:len(idx)])
        out[split] = np.concatenate(rows)
    return out


def top1(probe, x, y):
    return float(np.mean(np.argmax(x @ probe["kernel"] + probe["bias"], -1) == y))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=REPO / "results/cub50_inat/data/target/shards")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.875])
    p.add_argument("--weights", nargs="+", default=["inat_birds", "imagenet"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", type=Path,
                   default=REPO / "benchmarks/results/cub50_probe_geometry.json")
    args = p.parse_args()
    readers = {s: ShardReader(args.shards / s / "index.json") for s in ("train", "val", "test")}
    labels = {s: np.asarray(r.labels) for s, r in readers.items()}
    results = []
    for weights in args.weights:
        file = args.shared / "weights" / f"mobilenet_v2_1.0_224_{weights}.npz"
        for fraction in args.fractions:
            t0 = time.perf_counter()
            feats = pooled_features(file, readers, fraction, args.image_size)
            probe = fit_probe(feats["train"], labels["train"], feats["val"], labels["val"],
                              50, l2_grid=L2_GRID)
            both_x = np.concatenate([feats["train"], feats["val"]])
            both_y = np.concatenate([labels["train"], labels["val"]])
            refit = fit_probe(both_x, both_y, both_x, both_y, 50, l2_grid=[probe["l2"]])
            row = {"weights": weights, "fraction": fraction, "image_size": args.image_size,
                   "l2": probe["l2"], "val_top1": probe["best"]["val_top1"],
                   "test_top1": top1(probe, feats["test"], labels["test"]),
                   "test_top1_train_plus_val": top1(refit, feats["test"], labels["test"]),
                   "seconds": time.perf_counter() - t0}
            print(json.dumps(row), flush=True)
            results.append(row)
    write_json(args.out, {"what": "L-BFGS probe on pooled MobileNetV2 features, cub50 test "
                                  "top-1 by view (fraction of the stored crop)",
                          "shards": str(args.shards), "device": str(jax.devices()[0]),
                          "results": results})


if __name__ == "__main__":
    main()
