# Phase 2 (GPU): the feature cache and the transfer regimes, one train job per regime.
# Checkpoints go to results/<run>/checkpoints/<job>/, which is not a declared output, so
# Snakemake keeps it when a job dies and the rerun resumes from it.


rule features:
    input:
        script=script_path("features.py"),
        index=results("data/target/shards/{split}/index.json"),
        init=results("weights/init.safetensors"),
        stats=results("data/target/stats.json"),
        classes=results("data/target/manifest/classes.parquet"),
    output:
        index=results("features/{split}/index.json"),
    log:
        results("logs/features/{split}.log"),
    benchmark:
        results("benchmarks/features/{split}.tsv")
    conda:
        jax_conda_env(config)
    threads: family_threads(config, "train")
    resources:
        **rule_resources(config, "train"),
    params:
        settings=lambda wc: job_json(jobs.features(config, wc.split)),
        out_dir=lambda wc, output: Path(output.index).parent,
    shell:
        on_devices(
            "python {input.script:q} --settings {params.settings:q} --index {input.index:q}"
            " --init-weights {input.init:q} --stats {input.stats:q} --classes {input.classes:q}"
            " --out-dir {params.out_dir:q} > {log:q} 2>&1"
        )


# One boundary activation (the output of a frozen lower part) that a cached regime reads:
# a job of its own, so listing or dropping that regime touches no other cache.
use rule features as feature_map with:
    output:
        index=results("features/{split}/{stage}.map/index.json"),
    log:
        results("logs/features/{split}/{stage}.map.log"),
    benchmark:
        results("benchmarks/features/{split}/{stage}.map.tsv")
    wildcard_constraints:
        stage=r"[a-z]+\d*",
    params:
        settings=lambda wc: job_json(jobs.features(config, wc.split, f"{wc.stage}:map")),
        out_dir=lambda wc, output: Path(output.index).parent,


rule train_regime:
    input:
        unpack(train_inputs),
        script=script_path("train.py"),
        train=results("data/target/shards/train/index.json"),
        val=results("data/target/shards/val/index.json"),
        stats=results("data/target/stats.json"),
        classes=results("data/target/manifest/classes.parquet"),
    output:
        weights=results("train/{regime}{variant}/weights.safetensors"),
        history=results("train/{regime}{variant}/history.parquet"),
        summary=results("train/{regime}{variant}/summary.json"),
    log:
        results("logs/train/{regime}{variant}.log"),
    benchmark:
        results("benchmarks/train/{regime}{variant}.tsv")
    conda:
        jax_conda_env(config)
    threads: family_threads(config, "train", distributed=True)
    resources:
        **rule_resources(config, "train", distributed=True),
    params:
        settings=lambda wc: job_json(jobs.train_regime(config, wc.regime, wc.variant)),
        chosen="",
        init=optional_flag("--init-weights", "init"),
        features=feature_args,
        probe=probe_args,
        checkpoints=lambda wc, output: checkpoint_dir(
            output.weights,
            f"train/{wc.regime}{wc.variant}/weights.safetensors",
            f"{wc.regime}{wc.variant}",
        ),
        out_dir=lambda wc, output: Path(output.weights).parent,
    shell:
        on_devices(
            "python {input.script:q} --settings {params.settings:q} {params.chosen}"
            " --train-index {input.train:q} --val-index {input.val:q} --stats {input.stats:q}"
            " --classes {input.classes:q} {params.init} {params.features} {params.probe}"
            " --checkpoint-dir {params.checkpoints:q} --out-dir {params.out_dir:q} > {log:q} 2>&1",
            distributed=True,
        )


# A sweep's choice on validation; the evaluation of each replicate opens the chosen point.
rule select_sweep:
    input:
        unpack(
            lambda wc: {
                f"c{i}": paths for i, paths in enumerate(sweep_candidates(wc).values())
            }
        ),
        script=script_path("select_sweep.py"),
    output:
        selection=results("select/{regime}.json"),
    log:
        results("logs/select/{regime}.log"),
    conda:
        "../../envs/report.yaml"
    resources:
        **rule_resources(config, "light"),
    params:
        candidates=lambda wc: json.dumps(sweep_candidates(wc)),
        settings=job_json(jobs.select_sweep(config)),
    shell:
        "python {input.script:q} --regime {wildcards.regime} --candidates {params.candidates:q}"
        " --settings {params.settings:q} --out {output.selection:q} > {log:q} 2>&1"


# protocol.refit: the recipe and epochs chosen on validation, trained once more on train +
# validation (the train job's script, given the chosen job's summary); the evaluation reads
# this model.
use rule train_regime as refit_regime with:
    input:
        unpack(refit_inputs),
        script=script_path("train.py"),
        train=results("data/target/shards/train/index.json"),
        val=results("data/target/shards/val/index.json"),
        stats=results("data/target/stats.json"),
        classes=results("data/target/manifest/classes.parquet"),
    output:
        weights=results("refit/{regime}{variant}/weights.safetensors"),
        history=results("refit/{regime}{variant}/history.parquet"),
        summary=results("refit/{regime}{variant}/summary.json"),
    log:
        results("logs/refit/{regime}{variant}.log"),
    benchmark:
        results("benchmarks/refit/{regime}{variant}.tsv")
    params:
        settings=lambda wc: job_json(jobs.refit_regime(config, wc.regime, wc.variant)),
        chosen=model_args,
        checkpoints=lambda wc, output: checkpoint_dir(
            output.weights,
            f"refit/{wc.regime}{wc.variant}/weights.safetensors",
            f"refit-{wc.regime}{wc.variant}",
        ),


rule train:
    input:
        train_targets(),
        selection_targets(),
        refit_targets(),
