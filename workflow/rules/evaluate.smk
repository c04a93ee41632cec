# Phase 3 (GPU): each trained regime on the test split, which no other rule reads.


rule evaluate_regime:
    input:
        unpack(evaluate_inputs),
        script=script_path("evaluate.py"),
        test=results("data/target/shards/test/index.json"),
        classes=results("data/target/manifest/classes.parquet"),
    output:
        metrics=results("eval/{regime}{variant}/metrics.json"),
        predictions=results("eval/{regime}{variant}/predictions.parquet"),
    log:
        results("logs/evaluate/{regime}{variant}.log"),
    benchmark:
        results("benchmarks/evaluate/{regime}{variant}.tsv")
    conda:
        jax_conda_env(config)
    threads: family_threads(config, "train")
    resources:
        **rule_resources(config, "train"),
    params:
        settings=lambda wc: job_json(
            jobs.evaluate_regime(config, wc.regime, wc.variant)
        ),
        model=model_args,
        out_dir=lambda wc, output: Path(output.metrics).parent,
    shell:
        on_devices(
            "python {input.script:q} --settings {params.settings:q} --test-index {input.test:q}"
            " {params.model} --classes {input.classes:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
        )


rule evaluate:
    input:
        eval_targets(),


# The run's summary: every replicate, the sweep choices, the regime x view table over seeds.
rule summarize:
    input:
        script=script_path("summarize.py"),
        metrics=eval_targets(),
        selections=selection_targets(),
    output:
        summary=results("report/summary.json"),
        csv=report(
            results("report/tables/regime_views.csv"),
            caption="../report/regime_views_table.rst",
            category="Tables",
        ),
        md=results("report/tables/regime_views.md"),
    log:
        results("logs/summarize.log"),
    conda:
        "../../envs/report.yaml"
    resources:
        **rule_resources(config, "light"),
    params:
        run_name=config["run_name"],
        results_dir=lambda wc, output: Path(output.summary).parents[1],
        out_dir=lambda wc, output: Path(output.summary).parent,
    shell:
        "python {input.script:q} --run-name {params.run_name:q} --results-dir {params.results_dir:q}"
        " --metrics {input.metrics:q} --selections {input.selections:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
