"""The resolved settings of one evaluate job, from the config (no JAX: the Snakefile imports it)."""

from __future__ import annotations

from typing import Mapping

from finegrained.protocol import uses_refit
from finegrained.train.regimes import parse_variant

AVERAGES = ("softmax", "logits")
#: The test-time views, in reading order (see ``finegrained.evaluate.views``).
VIEWS = ("center", "ten_crop", "multi_scale")


def evaluation_settings(config: Mapping, regime: str, variant: str = "") -> dict:
    """What ``evaluate`` needs besides its files: the view geometry of the run (the same
    ``image_size`` and ``eval_crop_fraction`` as validation), the ``evaluation`` block, and
    the protocol the model it reads was chosen and trained under."""
    parse_variant(variant)      # a malformed variant fails here, before any job runs
    run, block = config["train"], config["evaluation"]
    return {"regime": regime, "variant": variant, "image_size": run["image_size"],
            "eval_crop_fraction": run["eval_crop_fraction"],
            "multi_scale_fractions": list(block["multi_scale_fractions"]),
            "average": block["average"], "batch_size": block["batch_size"],
            "verify_shards": config["shards"].get("verify", True),
            "protocol": {"select_by": config["protocol"]["select_by"],
                         "refit": uses_refit(config, regime, variant)}}
