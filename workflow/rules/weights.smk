# Backbone weights: download (URL, sha256 pinned or trusted on first use), or pretrain on
# the source dataset, then initialise the target model (new head, optionally name-matched
# rows) from them.


# Only the file the config names: a user's own files in resources/weights/ are never outputs.
if paths.is_url(config["backbone"]["weights"]):

    # On the head node under a cluster profile: compute nodes often have no internet.
    localrules:
        fetch_weights,

    rule fetch_weights:
        input:
            script=script_path("fetch_weights.py"),
        output:
            weights=backbone_weights_file(),
            sha256=backbone_weights_record(),
        log:
            f"resources/logs/fetch_weights/{Path(backbone_weights_file()).relative_to(paths.WEIGHTS_DIR)}.log",
        benchmark:
            f"resources/benchmarks/fetch_weights/{Path(backbone_weights_file()).relative_to(paths.WEIGHTS_DIR)}.tsv"
        conda:
            "../../envs/data.yaml"
        threads: 1
        resources:
            **rule_resources(config, "light"),
        params:
            settings=job_json(jobs.fetch_weights(config)),
        shell:
            "python {input.script:q} --settings {params.settings:q} --out {output.weights:q}"
            " > {log:q} 2>&1"


rule pretrain:
    input:
        script=script_path("pretrain.py"),
        train=results("data/source/shards/train/index.json"),
        val=results("data/source/shards/val/index.json"),
        stats=results("data/source/stats.json"),
        classes=results("data/source/manifest/classes.parquet"),
    output:
        weights=results("pretrain/weights.safetensors"),
        metrics=results("pretrain/metrics.json"),
    log:
        results("logs/pretrain.log"),
    benchmark:
        results("benchmarks/pretrain.tsv")
    conda:
        jax_conda_env(config)
    threads: family_threads(config, "train", distributed=True)
    resources:
        **rule_resources(config, "train", distributed=True),
    params:
        settings=job_json(jobs.pretrain(config)),
        checkpoints=lambda wc, output: checkpoint_dir(
            output.weights, "pretrain/weights.safetensors", "pretrain"
        ),
    shell:
        on_devices(
            "python {input.script:q} --settings {params.settings:q} --train-index {input.train:q}"
            " --val-index {input.val:q} --stats {input.stats:q} --classes {input.classes:q}"
            " --checkpoint-dir {params.checkpoints:q} --out-weights {output.weights:q}"
            " --out-metrics {output.metrics:q} > {log:q} 2>&1",
            distributed=True,
        )


rule init_target_model:
    input:
        script=script_path("init_model.py"),
        classes=results("data/target/manifest/classes.parquet"),
        weights=lambda wc: backbone_weights_file() or [],
        weights_sha256=lambda wc: backbone_weights_record() or [],
        source_names=lambda wc: source_class_names() or [],
    output:
        weights=results("weights/init.safetensors"),
        report=results("weights/init_report.json"),
    log:
        results("logs/init_target_model.log"),
    benchmark:
        results("benchmarks/init_target_model.tsv")
    conda:
        jax_conda_env(config, 0)
    threads: 1
    resources:
        **rule_resources(config, "train", gpu=0),
    params:
        settings=job_json(jobs.init_target_model(config)),
        weights=optional_flag("--weights", "weights"),
        names=optional_flag("--source-class-names", "source_names"),
    shell:
        on_devices(
            "python {input.script:q} --settings {params.settings:q} --classes {input.classes:q}"
            " {params.weights} {params.names} --out-weights {output.weights:q}"
            " --out-report {output.report:q} > {log:q} 2>&1"
        )


rule weights:
    input:
        results("weights/init.safetensors"),
