"""What the workflow needs to know about an augmentation without importing JAX.

The Snakefile resolves every job's settings when it loads (``regimes.job_settings``), on
whatever Python runs Snakemake, often a head node's without JAX; so the one question it
asks of an augmentation, "does it draw anything at random?", is answered here on the plain
config values.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Magnitudes whose zero value disables a random change.
RANDOM_MAGNITUDES = ("scale_jitter", "brightness", "contrast", "saturation", "pca_lighting",
                     "rotation", "hue")


def is_augmented(augmentation: Any) -> bool:
    """Whether ``augmentation`` (an ``Augmentation`` or a config ``augment`` block) draws anything at
    random. A training view that is not augmented is the evaluation view (``center_crop``
    at ``eval_crop_fraction``), which is what the feature cache stores, so a cached and an
    online run see the same inputs."""
    if isinstance(augmentation, Mapping):
        get = augmentation.get
    else:
        def get(name, default=None):
            return getattr(augmentation, name, default)
    crop_area, aspect_ratio = get("crop_area"), get("aspect_ratio")
    fixed = (crop_area is not None and tuple(crop_area) == (1.0, 1.0)
             and aspect_ratio is not None and tuple(aspect_ratio) == (1.0, 1.0)
             and get("flip") == 0)
    return not (fixed and all(get(name, 0.0) == 0 for name in RANDOM_MAGNITUDES))
