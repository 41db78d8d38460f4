rule fit_sae:
    input:
        unpack(get_sae_training_dumps),
    output:
        weights=protected("results/sae/{model}/{sae_set}/layer{layer}.safetensors"),
        sidecar=protected("results/sae/{model}/{sae_set}/layer{layer}.json"),
        metrics="results/sae/{model}/{sae_set}/layer{layer}.metrics.json",
    log:
        "results/logs/fit_sae/{model}/{sae_set}/layer{layer}.log",
    benchmark:
        "results/benchmarks/fit_sae/{model}/{sae_set}/layer{layer}.tsv"
    conda:
        "../envs/ctrace.yaml"
    resources:
        gpu=1,
        device=DEVICE,
        mem_mb=16000,
        runtime=240,
    params:
        dumps=get_sae_training_stems,
        sae=get_sae_args,
        seed=SEED,
    shell:
        "ctrace --threads {threads} fit-sae --dumps {params.dumps} --model {wildcards.model}"
        " --sae-set {wildcards.sae_set} --layer {wildcards.layer} {params.sae} --seed {params.seed}"
        " --device {resources.device} --out-stem results/sae/{wildcards.model}/{wildcards.sae_set}/layer{wildcards.layer}"
        " --metrics {output.metrics} > {log} 2>&1"


rule sae_quality:
    input:
        get_all_sae_metrics,
    output:
        "results/sae/quality.tsv",
    log:
        "results/logs/sae_quality.log",
    conda:
        "../envs/ctrace.yaml"
    shell:
        "ctrace sae-quality --metrics {input} --out {output} > {log} 2>&1"


rule annotate_features:
    input:
        unpack(get_sae_training_dumps),
        sae="results/sae/{model}/{sae_set}/layer{layer}.safetensors",
        tokenized=get_sae_training_tokenized,
        model=get_model_files,
    output:
        features="results/annotation/{model}/{sae_set}/layer{layer}.features.parquet",
        significant="results/annotation/{model}/{sae_set}/layer{layer}.significant.parquet",
    log:
        "results/logs/annotate/{model}/{sae_set}/layer{layer}.log",
    benchmark:
        "results/benchmarks/annotate/{model}/{sae_set}/layer{layer}.tsv"
    conda:
        "../envs/ctrace.yaml"
    resources:
        gpu=1,
        device=DEVICE,
        mem_mb=8000,
        runtime=60,
    params:
        model=get_model_args,
        dumps=get_sae_training_stems,
        annotation=get_annotation_args,
    shell:
        "ctrace --threads {threads} annotate {params.model} --device {resources.device}"
        " --sae results/sae/{wildcards.model}/{wildcards.sae_set}/layer{wildcards.layer}"
        " --layer {wildcards.layer} --dumps {params.dumps} --tokenized {input.tokenized}"
        " {params.annotation} --out-features {output.features}"
        " --out-significant {output.significant} > {log} 2>&1"
