# Fine-grained bird classification by transfer learning: table of contents.
# Default configuration: config/config.yaml (real NABirds); the demo: --configfile config/demo.yaml.
# Also a module of another workflow (`module finegrained: snakefile: "<clone>/Snakefile"`):
# everything read from this workflow's own tree comes from FINEGRAINED_DIR, not from the
# host's folder (workflow.basedir there), and config/README.md shows the host's lines.

import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9")

FINEGRAINED_DIR = Path(str(workflow.current_basedir))
# The rule files and every job import the library from this checkout (first on the path),
# so any Snakemake loads the workflow: one without the package installed too (it needs only
# numpy, pyyaml and jsonschema, no JAX). Two checkouts (or a checkout and an installed copy)
# must not mix: another `finegrained` imported first stops the run.
sys.path.insert(0, str(FINEGRAINED_DIR / "src"))
import finegrained  # noqa: E402

if (
    Path(finegrained.__file__).resolve().parent
    != (FINEGRAINED_DIR / "src" / "finegrained").resolve()
):
    raise WorkflowError(
        f"the finegrained library imported is {Path(finegrained.__file__).parent}, not this "
        f"workflow's {FINEGRAINED_DIR / 'src' / 'finegrained'}: another checkout or an installed "
        f"copy was imported first (two modules from different clones?); use one clone per run"
    )


# Skipped when a host passes its own config to the module.
configfile: FINEGRAINED_DIR / "config" / "config.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    dataset="|".join(DATASETS),
    split="|".join(SPLITS),
    shard=r"\d{5}",
    regime="|".join(REGIMES),
    variant=VARIANT_PATTERN,


include: "workflow/rules/data.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


# Light rules run by Snakemake itself, also under a cluster profile (with these: the weights
# download, compute nodes often having no internet; the shard indexes).
localrules:
    data,
    weights,
    train,
    select_sweep,
    evaluate,
    summarize,
    figures,
    all,


rule all:
    default_target: True
    input:
        rules.data.input,
        rules.weights.input,
        rules.train.input,
        rules.evaluate.input,
        rules.summarize.output,
        rules.figures.input,
