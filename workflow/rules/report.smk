# Phase 4 (CPU): the figures and tables of a run, drawn by papermill notebooks from the
# summary (report/summary.json, the summarize rule) and the files it names. The executed
# notebooks are kept beside the figures; `snakemake --report` collects what report() marks.


rule report_results:
    input:
        notebook=notebook_path("results.ipynb"),
        summary=results("report/summary.json"),
    output:
        notebook=results("report/notebooks/results.ipynb"),
        learning_curves=report_figure("learning_curves", "learning_curves", "Training"),
        learning_curves_svg=results("report/figures/learning_curves.svg"),
        regime_views=report_figure("regime_views", "regime_views", "Test accuracy"),
        regime_views_svg=results("report/figures/regime_views.svg"),
        tta_gain=report_figure("tta_gain", "tta_gain", "Test accuracy"),
        tta_gain_svg=results("report/figures/tta_gain.svg"),
        taxonomy_levels=report_figure(
            "taxonomy_levels", "taxonomy_levels", "Test accuracy"
        ),
        taxonomy_levels_svg=results("report/figures/taxonomy_levels.svg"),
        throughput=report(
            results("report/tables/throughput.csv"),
            caption="../report/throughput.rst",
            category="Tables",
        ),
        throughput_md=results("report/tables/throughput.md"),
    log:
        results("logs/report/results.log"),
    benchmark:
        results("benchmarks/report/results.tsv")
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        **rule_resources(config, "light"),
    params:
        figures=lambda wc, output: Path(output.learning_curves).parent,
        tables=lambda wc, output: Path(output.throughput).parent,
        benchmarks=lambda wc, output: run_folder(
            output.notebook, "report/notebooks/results.ipynb"
        )
        / "benchmarks",
    shell:
        "python -m papermill --no-progress-bar --log-output -k python3"
        " {input.notebook:q} {output.notebook:q} -r summary {input.summary:q}"
        " -r figures_dir {params.figures:q} -r tables_dir {params.tables:q}"
        " -r benchmarks_dir {params.benchmarks:q} > {log:q} 2>&1"


rule report_examples:
    input:
        notebook=notebook_path("examples.ipynb"),
        summary=results("report/summary.json"),
        test=results("data/target/shards/test/index.json"),
        train=results("data/target/shards/train/index.json"),
        classes=results("data/target/manifest/classes.parquet"),
        stats=results("data/target/stats.json"),
    output:
        notebook=results("report/notebooks/examples.ipynb"),
        confused_pairs=report_figure("confused_pairs", "confused_pairs", "Examples"),
        confused_pairs_svg=results("report/figures/confused_pairs.svg"),
        augmentation=report_figure("augmentation", "augmentation", "Examples"),
        augmentation_svg=results("report/figures/augmentation.svg"),
    log:
        results("logs/report/examples.log"),
    benchmark:
        results("benchmarks/report/examples.tsv")
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        **rule_resources(config, "light"),
    params:
        figures=lambda wc, output: Path(output.augmentation).parent,
    shell:
        "python -m papermill --no-progress-bar --log-output -k python3"
        " {input.notebook:q} {output.notebook:q} -r summary {input.summary:q}"
        " -r test_index {input.test:q} -r train_index {input.train:q}"
        " -r classes {input.classes:q} -r stats {input.stats:q}"
        " -r figures_dir {params.figures:q} > {log:q} 2>&1"


rule figures:
    input:
        rules.report_results.output,
        rules.report_examples.output,
        systems_report_targets(),


rule report_systems:
    input:
        notebook=notebook_path("systems.ipynb"),
        histories=systems_histories(),
    output:
        notebook=results("report/notebooks/systems.ipynb"),
        systems=report_figure("systems", "systems", "Training systems"),
        systems_svg=results("report/figures/systems.svg"),
        table=results("report/tables/systems.md"),
    log:
        results("logs/report/systems.log"),
    benchmark:
        results("benchmarks/report/systems.tsv")
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        **rule_resources(config, "light"),
    params:
        train_root=lambda wc, output: run_folder(
            output.notebook, "report/notebooks/systems.ipynb"
        )
        / "train",
        figures=lambda wc, output: Path(output.systems).parent,
        tables=lambda wc, output: Path(output.table).parent,
        comparison=json.dumps(protocol.systems_comparison(config)),
    shell:
        "python -m papermill --no-progress-bar --log-output -k python3"
        " {input.notebook:q} {output.notebook:q} -r train_root {params.train_root:q}"
        " -r figures_dir {params.figures:q} -r tables_dir {params.tables:q}"
        " -y {params.comparison:q} > {log:q} 2>&1"
