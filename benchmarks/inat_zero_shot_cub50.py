"""Zero-shot "lucky break" figure: the iNat-birds MobileNetV2 with its classifier rows
matched to cub50 species by name (the pipeline's init_target_model, no training at all),
evaluated on every cub50 TEST photo of a matched species. Predictions are restricted to
the matched classes (unmatched rows are fresh random initialisations, not a classifier).

    python benchmarks/inat_zero_shot_cub50.py [--shared ../shared]

Writes benchmarks/results/inat_zero_shot_cub50.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from _common import RESULTS, SHARED, shared_path, write_result
from finegrained.data.readers import read_dataset
from finegrained.models.transfer import init_target_model


def main(argv=None):
    started = time.time()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS / "inat_zero_shot_cub50.json")
    args = p.parse_args(argv)
    cub = shared_path("data", "cub50", base=args.shared)
    weights = shared_path("weights", base=args.shared)
    if cub is None or weights is None:
        return 0

    dataset = read_dataset("cub", cub)
    names = dataset.classes["common_name"].to_pylist()
    model, report = init_target_model(
        arch="mobilenet_v2", class_names=names,
        weights=weights / "mobilenet_v2_1.0_224_inat_birds.npz",
        source_names_file=weights / "inat_bird_labels.txt", init_from_source_names=True)
    matched = sorted(p["target_index"] for p in report["head_init"]["matched"])

    images = dataset.images.to_pydict()
    test = [(path, label) for path, label, is_train in
            zip(images["path"], images["label"], images["is_train"])
            if not is_train and label in set(matched)]
    graph, state = nnx.split(model)
    allowed = jnp.asarray(np.isin(np.arange(len(names)), matched))

    @jax.jit
    def predict(state, x):
        logits = nnx.merge(graph, state)(x)
        return jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)

    start = time.perf_counter()
    predictions = []
    for i in range(0, len(test), args.batch_size):
        chunk = test[i:i + args.batch_size]
        pixels = np.stack([np.asarray(Image.open(cub / path).convert("RGB").resize(
            (224, 224), Image.Resampling.BILINEAR), np.uint8) for path, _ in chunk])
        pad = args.batch_size - len(chunk)  # one compiled shape
        pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), np.uint8)])
        predictions.extend(np.asarray(predict(state, pixels))[:len(chunk)].tolist())
    seconds = time.perf_counter() - start

    labels = np.array([label for _, label in test])
    predictions = np.array(predictions)
    per_class = {names[c]: float(np.mean(predictions[labels == c] == c)) for c in matched}
    result = {
        "what": "top-1 of the iNat MobileNetV2 with name-matched head rows, no training",
        "num_test_images": int(len(labels)),
        "num_matched_species": len(matched),
        "num_species": len(names),
        "top1": float(np.mean(predictions == labels)),
        "chance": 1 / len(matched),
        "mean_per_class_top1": float(np.mean(list(per_class.values()))),
        "per_class_top1": per_class,
        "unmatched_species": report["head_init"]["unmatched_targets"],
        "seconds": seconds,
        "device": str(jax.devices()[0]),
    }
    write_result("inat_zero_shot_cub50", "Zero-shot iNat MobileNetV2 on cub50", result,
                 argv=argv, started=started, out=args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "per_class_top1"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
