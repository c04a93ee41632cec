"""Synthetic fine-grained bird datasets in exact NABirds format, for the embedded demo.

Demo-only code, kept out of the real data package and split by concern:
:mod:`~finegrained.demo.taxonomy` (the species and their class tree),
:mod:`~finegrained.demo.draw` (one photo: scene + species -> pixels + box) and
:mod:`~finegrained.demo.dataset` (writing a whole dataset folder).
"""

from finegrained.demo.dataset import generate_demo_dataset
from finegrained.demo.draw import Scene, render_image, sample_scene
from finegrained.demo.taxonomy import (DEFAULTS, FEATURES, VARIANTS, Species, Taxonomy,
                                       design_taxonomy)

__all__ = ["DEFAULTS", "FEATURES", "VARIANTS", "Scene", "Species", "Taxonomy",
           "design_taxonomy", "generate_demo_dataset", "render_image", "sample_scene"]
