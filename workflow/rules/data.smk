# Phase 1 (CPU, once): dataset -> per-split manifests -> cropped shards -> colour statistics.


rule demo_dataset:
    input:
        script=script_path("make_demo_dataset.py"),
    output:
        annotations=expand(
            results("demo_data/{{dataset}}/{name}"),
            name=[name for name, _ in DATASET_FORMATS["nabirds"].annotation_names()],
        ),
        images=directory(results("demo_data/{dataset}/images")),
    log:
        results("logs/demo_dataset/{dataset}.log"),
    benchmark:
        results("benchmarks/demo_dataset/{dataset}.tsv")
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        **rule_resources(config, "data"),
    params:
        settings=lambda wc: job_json(jobs.dataset_block(config, wc.dataset)["demo"]),
        out_dir=lambda wc, output: Path(output.images).parent,
    shell:
        "python {input.script:q} --settings {params.settings:q} --out {params.out_dir:q}"
        " --variant {wildcards.dataset} > {log:q} 2>&1"


rule manifests:
    input:
        script=script_path("prepare_manifests.py"),
        annotations=annotation_inputs,
    output:
        train=results("data/{dataset}/manifest/train.parquet"),
        val=results("data/{dataset}/manifest/val.parquet"),
        test=results("data/{dataset}/manifest/test.parquet"),
        classes=results("data/{dataset}/manifest/classes.parquet"),
        taxonomy=results("data/{dataset}/manifest/taxonomy.parquet"),
        skipped=results("data/{dataset}/manifest/skipped.json"),
        report=results("data/{dataset}/manifest/report.json"),
    log:
        results("logs/manifests/{dataset}.log"),
    benchmark:
        results("benchmarks/manifests/{dataset}.tsv")
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        **rule_resources(config, "data"),
    params:
        settings=lambda wc: job_json(jobs.manifests(config, wc.dataset)),
        root=dataset_root,
        out_dir=lambda wc, output: Path(output.train).parent,
    shell:
        "python {input.script:q} --settings {params.settings:q} --root {params.root:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule crop_shard:
    input:
        script=script_path("crop_shard.py"),
        manifest=results("data/{dataset}/manifest/{split}.parquet"),
        annotations=annotation_inputs,
    output:
        **shard_outputs(),
    log:
        results("logs/crop_shard/{dataset}/{split}/{shard}.log"),
    benchmark:
        results("benchmarks/crop_shard/{dataset}/{split}/{shard}.tsv")
    conda:
        "../../envs/data.yaml"
    threads: family_threads(config, "data")
    resources:
        **rule_resources(config, "data"),
    params:
        settings=lambda wc: job_json(jobs.crop_shard(config, wc.dataset, wc.split)),
        root=dataset_root,
        images=lambda wc, output: (
            f"--out-images {shlex.quote(output.images)}"
            if "images" in output.keys()
            else ""
        ),
    shell:
        "python {input.script:q} --settings {params.settings:q} --manifest {input.manifest:q}"
        " --root {params.root:q} --shard {wildcards.shard} --out-meta {output.meta:q}"
        " {params.images} --out-skipped {output.skipped:q} > {log:q} 2>&1"


localrules:
    shard_index,


rule shard_index:
    input:
        script=script_path("index_shards.py"),
        metas=split_shard_files("meta"),
        skipped=split_shard_files("skipped"),
        records=split_shard_files("record"),
        images=split_shard_files("images"),
    output:
        results("data/{dataset}/shards/{split}/index.json"),
    log:
        results("logs/shard_index/{dataset}/{split}.log"),
    benchmark:
        results("benchmarks/shard_index/{dataset}/{split}.tsv")
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        **rule_resources(config, "light"),
    shell:
        "python {input.script:q} --split {wildcards.split} --out {output:q} {input.metas:q}"
        " > {log:q} 2>&1"


rule channel_stats:
    input:
        script=script_path("channel_stats.py"),
        index=results("data/{dataset}/shards/train/index.json"),
    output:
        results("data/{dataset}/stats.json"),
    log:
        results("logs/channel_stats/{dataset}.log"),
    benchmark:
        results("benchmarks/channel_stats/{dataset}.tsv")
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        **rule_resources(config, "data"),
    shell:
        "python {input.script:q} --index {input.index:q} --out {output:q} > {log:q} 2>&1"


rule data:
    input:
        expand(results("data/target/shards/{split}/index.json"), split=SPLITS),
        results("data/target/stats.json"),
