"""Where the cub50 fine-tunes lose their ~2 points to the linear probe: the classifier alone,
fitted two ways on the same frozen pooled features (iNat-birds MobileNetV2, the 112-px
centre view of config/examples/cub50-112px.yaml).

- L-BFGS softmax regression to convergence, one fit per L2 strength of a grid (the
  pipeline's `linear_probe`);
- minibatch SGD with the head recipe of the 112-px fine-tunes (momentum 0.9, batch 32, lr
  0.01 with one linear warm-up epoch then cosine to zero, weight decay 1e-4 on the kernel,
  10 epochs, a fresh zero head), several data-order seeds, test top-1 after every epoch;
  on the raw pooled features (what a fine-tuned head sees) and standardised ones (what the
  L-BFGS probe fits).

If the SGD head ends where the probe is, SGD fitting costs nothing and the fine-tunes' gap
comes from their backbone updates or from the choice of epoch on 150 validation photos; if
it ends where the fine-tunes are, the gap is in how the classifier is fitted.

    python benchmarks/cub50_head_fit.py [--shards results/cub50_inat_112px/data/target/shards]

Writes benchmarks/results/cub50_head_fit.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from finegrained.data.shards import ShardReader
from finegrained.fileio import write_json
from finegrained.train.probe import fit_probe
from cub50_probe_geometry import pooled_features, top1

REPO = Path(__file__).resolve().parents[1]
L2_GRID = [1e-4, 1e-3, 1e-2, 1e-1]


def sgd_head(x, y, evals, num_classes, *, seed, epochs=10, batch=32, lr=0.01, warmup=1,
             weight_decay=1e-4, momentum=0.9):
    """Softmax regression by minibatch SGD; per epoch: top-1 and mean loss on each of
    ``evals`` ({name: (x, y)})."""
    steps_per_epoch = len(x) // batch
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup * steps_per_epoch, epochs * steps_per_epoch, end_value=0.0)
    tx = optax.chain(optax.masked(optax.add_decayed_weights(weight_decay),
                                  {"kernel": True, "bias": False}),
                     optax.sgd(schedule, momentum=momentum))
    params = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros(num_classes)}
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        logits = xb @ p["kernel"] + p["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(p, s, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))[:steps_per_epoch * batch].reshape(steps_per_epoch, batch)
        for rows in order:
            params, opt_state, _ = step(params, opt_state, x[rows], y[rows])
        row = {"epoch": epoch}
        probe = {k: np.asarray(v) for k, v in params.items()}
        for name, (ex, ey) in evals.items():
            row[f"{name}_top1"] = top1(probe, ex, ey)
            row[f"{name}_loss"] = float(loss_fn(params, ex, ey))
        history.append(row)
    return history


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path,
                   default=REPO / "results/cub50_inat_112px/data/target/shards")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--weights", default="inat_birds")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--fraction", type=float, default=0.875)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cub50_head_fit.json")
    args = p.parse_args()
    readers = {s: ShardReader(args.shards / s / "index.json") for s in ("train", "val", "test")}
    labels = {s: np.asarray(r.labels) for s, r in readers.items()}
    t0 = time.perf_counter()
    feats = pooled_features(args.shared / "weights" / f"mobilenet_v2_1.0_224_{args.weights}.npz",
                            readers, args.fraction, args.image_size)
    feats = {k: v.astype(np.float32) for k, v in feats.items()}
    num_classes = int(max(labels["train"].max(), labels["test"].max())) + 1

    lbfgs = []
    for l2 in L2_GRID:
        probe = fit_probe(feats["train"], labels["train"], feats["val"], labels["val"],
                          num_classes, l2_grid=[l2])
        lbfgs.append({"l2": l2, "val_top1": top1(probe, feats["val"], labels["val"]),
                      "test_top1": top1(probe, feats["test"], labels["test"])})
        print("lbfgs", lbfgs[-1], flush=True)
    # the fine-tunes' head sees the raw pooled features; the L-BFGS probe standardises them
    mean, std = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    inputs = {"raw": feats, "standardised": {k: (v - mean) / std for k, v in feats.items()}}
    sgd = []
    for features, x in inputs.items():
        evals = {s: (x[s], labels[s]) for s in ("train", "val", "test")}
        for seed in args.seeds:
            history = sgd_head(x["train"], labels["train"], evals, num_classes, seed=seed)
            best = max(history, key=lambda r: r["val_top1"])   # first max, as the trainer keeps
            sgd.append({"features": features, "seed": seed, "history": history,
                        "chosen_by_val_top1": best})
            print("sgd", features, seed, [(r["epoch"], round(r["val_top1"], 3),
                                           round(r["test_top1"], 4)) for r in history], flush=True)
    write_json(args.out, {
        "what": "cub50 classifier on frozen pooled MobileNetV2 features: L-BFGS per L2 vs "
                "minibatch SGD with the fine-tunes' head recipe; top-1 as fractions",
        "weights": args.weights, "image_size": args.image_size, "fraction": args.fraction,
        "shards": str(args.shards), "device": str(jax.devices()[0]),
        "seconds": time.perf_counter() - t0, "lbfgs": lbfgs, "sgd": sgd})


if __name__ == "__main__":
    main()
