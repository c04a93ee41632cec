# Fine-grained bird classification by transfer learning: table of contents.
# Default configuration: config/config.yaml (real NABirds); the demo: --configfile config/demo.yaml.

import sys
from pathlib import Path

# The rule files import the library from this checkout, so any Snakemake loads the workflow
# (one without the package installed too: it needs only numpy, pyyaml and jsonschema, no JAX).
sys.path.insert(0, str(Path(workflow.basedir) / "src"))


# Found beside this file, so `snakemake -s <repo>/Snakefile -d <elsewhere>` works too.
configfile: f"{workflow.basedir}/config/config.yaml"


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
