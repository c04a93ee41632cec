"""The planning layer: from the config to each job's settings and paths, without JAX.

The Snakefile, the docs generator and the tests load it cheaply, on any Python that runs
Snakemake; the library below it (``data``, ``models``, ``train``, ``evaluate``) reads what
it resolved. It imports nothing from them (only ``errors``, ``fileio``, ``provenance``), and
loads no JAX, Flax or Optax (``tests/plan/test_layers.py`` holds it to that).

- :mod:`~finegrained.plan.schema`: the config schema and its loader (every default lives
  in ``workflow/schemas/config.schema.yaml``).
- :mod:`~finegrained.plan.archs`: the table of architectures.
- :mod:`~finegrained.plan.regimes`: a regime's preset -> the phases of its job.
- :mod:`~finegrained.plan.variants`: ``+seed=1+lr=0.003``, written and read.
- :mod:`~finegrained.plan.protocol`: replicates, sweeps, the choice on validation, refit
  (:mod:`~finegrained.plan.selection`: the one comparison).
- :mod:`~finegrained.plan.jobs`: one resolver per rule, the JSON each job is given.
- :mod:`~finegrained.plan.paths` and :mod:`~finegrained.plan.targets`: the layout of
  ``results/<run>/`` and which files a run has.
- :mod:`~finegrained.plan.resources`: what each rule asks a scheduler for.
- :mod:`~finegrained.plan.augment`: whether an augmentation draws anything at random.
- :mod:`~finegrained.plan.reference`: docs/configuration.md from the schema.
"""
