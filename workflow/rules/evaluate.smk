# Phase 3 (GPU): each trained regime on the test split, which no other rule reads.


rule evaluate_regime:
    input:
        script=script_path("evaluate.py"),
        weights=results("train/{regime}{variant}/weights.safetensors"),
        summary=results("train/{regime}{variant}/summary.json"),
        test=results("data/target/shards/test/index.json"),
        classes=results("data/target/manifest/classes.parquet"),
    output:
        metrics=results("eval/{regime}{variant}/metrics.json"),
        predictions=results("eval/{regime}{variant}/predictions.parquet"),
    params:
        settings=evaluate_job_settings,
        launch=device_launcher(),
        out_dir=lambda wc, output: Path(output.metrics).parent,
    log:
        results("logs/evaluate/{regime}{variant}.log"),
    benchmark:
        results("benchmarks/evaluate/{regime}{variant}.tsv")
    threads: job_threads("train")
    resources:
        **job_resources("train"),
    conda:
        jax_env()
    shell:
        "{params.launch} {resources.gpu} -- python {input.script:q} --settings {params.settings:q}"
        " --test-index {input.test:q} --weights {input.weights:q}"
        " --train-summary {input.summary:q} --classes {input.classes:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule evaluate:
    input:
        expand(results("eval/{regime}/metrics.json"), regime=config["regimes"]),
