rule select_source_features:
    input:
        metrics="results/sae/{model}/{sae_set}/layer{layer}.metrics.json",
        annotation="results/annotation/{model}/{sae_set}/layer{layer}.features.parquet",
    output:
        "results/sources/{model}/{sae_set}/layer{layer}.tsv",
    log:
        "results/logs/select_source_features/{model}/{sae_set}/layer{layer}.log",
    conda:
        "../envs/ctrace.yaml"
    params:
        selection=get_selection_args,
        seed=SEED,
    shell:
        "ctrace select-features --metrics {input.metrics} --annotation {input.annotation}"
        " {params.selection} --seed {params.seed} --out {output} > {log} 2>&1"


rule ablation_sweep:
    input:
        tokenized="results/tokenized/{model}/{condition}.trace.npz",
        saes=get_sweep_sae_files,
        sources=get_sweep_sources,
        model=get_model_files,
    output:
        temp("results/sweep/{model}/{condition}/layer{layer}.shard{shard}.npz"),
    log:
        "results/logs/ablation_sweep/{model}/{condition}/layer{layer}.shard{shard}.log",
    benchmark:
        "results/benchmarks/ablation_sweep/{model}/{condition}/layer{layer}.shard{shard}.tsv"
    conda:
        "../envs/ctrace.yaml"
    resources:
        gpu=1,
        device=DEVICE,
        mem_mb=16000,
        runtime=get_sweep_runtime,
        ablations_per_batch=config["sweep"]["ablations_per_batch"],
        cells_per_clean_pass=config["sweep"]["cells_per_clean_pass"],
    params:
        model=get_model_args,
        dtype=get_model_dtype,
        saes=get_sweep_sae_stems,
        sweep=get_sweep_args,
        seed=SEED,
    shell:
        "ctrace --threads {threads} sweep {params.model} --device {resources.device} --dtype {params.dtype}"
        " --tokenized {input.tokenized} --saes {params.saes} --layer {wildcards.layer} --sources {input.sources}"
        " --shard {wildcards.shard} {params.sweep} --ablations-per-batch {resources.ablations_per_batch}"
        " --cells-per-clean-pass {resources.cells_per_clean_pass} --seed {params.seed} --out {output} > {log} 2>&1"


rule merge_sweep:
    input:
        get_sweep_shards,
    output:
        "results/sweep/{model}/{condition}/layer{layer}.stats.npz",
    log:
        "results/logs/merge_sweep/{model}/{condition}/layer{layer}.log",
    conda:
        "../envs/ctrace.yaml"
    shell:
        "ctrace merge-sweep --shards {input} --out {output} > {log} 2>&1"
