"""What the planning code needs to know about an augmentation without importing JAX.

The Snakefile resolves every job's settings when it loads, on whatever Python runs
Snakemake (often a head node's, without JAX); the one question it asks of an augmentation,
"does it draw anything at random?", is answered here on the plain config values. The
augmentation's keys are the schema's (``$defs/augment``), which ``train.augment.Augmentation``
mirrors field for field (a test holds the two together), so a new setting is known here by
being added there.
"""

from __future__ import annotations

from typing import Any, Mapping

from finegrained.plan.schema import SCHEMA

_KEYS = SCHEMA["$defs"]["augment"]["properties"]
#: Ranges of the random-resized crop; (1, 1) for both keeps the whole image.
CROP_RANGES = tuple(k for k, spec in _KEYS.items() if spec.get("type") == "array")
#: Magnitudes (and the flip probability) whose zero value disables a random change.
RANDOM_MAGNITUDES = tuple(k for k in _KEYS if k not in CROP_RANGES)


def is_augmented(augmentation: Any) -> bool:
    """Whether ``augmentation`` (an ``Augmentation`` or a config ``augment`` block) draws
    anything at random. A training view that is not augmented is the evaluation view
    (``center_crop`` at ``eval_crop_fraction``), which is what the feature cache stores, so
    a cached and an online run see the same inputs."""
    if isinstance(augmentation, Mapping):
        get = augmentation.get
    else:
        def get(name, default=None):
            return getattr(augmentation, name, default)
    whole = all(get(name) is not None and tuple(get(name)) == (1.0, 1.0) for name in CROP_RANGES)
    return not (whole and all(get(name, 0.0) == 0 for name in RANDOM_MAGNITUDES))
