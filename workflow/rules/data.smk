rule select_cells:
    input:
        get_h5ad,
    output:
        "results/cells/{condition}.tsv",
    log:
        "results/logs/select_cells/{condition}.log",
    conda:
        "../envs/ctrace.yaml"
    params:
        obs_filter=get_obs_filter_arg,
        sizes=get_cell_counts_args,
        seed=get_condition_seed,
    shell:
        "ctrace select-cells --condition {wildcards.condition} --h5ad {input} {params.obs_filter}"
        " {params.sizes} --seed {params.seed} --out {output} > {log} 2>&1"


rule tokenize:
    input:
        h5ad=get_h5ad,
        cells="results/cells/{condition}.tsv",
        model=get_model_files,
    output:
        trace="results/tokenized/{model}/{condition}.trace.npz",
        sae="results/tokenized/{model}/{condition}.sae.npz",
        report="results/tokenized/{model}/{condition}.report.json",
    log:
        "results/logs/tokenize/{model}/{condition}.log",
    benchmark:
        "results/benchmarks/tokenize/{model}/{condition}.tsv"
    conda:
        "../envs/ctrace.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        model=get_model_args,
        data=get_condition_data_args,
        seed=get_condition_seed,
    shell:
        "ctrace --threads {threads} tokenize {params.model} --condition {wildcards.condition} --h5ad {input.h5ad}"
        " --cells {input.cells} {params.data} --seed {params.seed} --out-trace {output.trace}"
        " --out-sae {output.sae} --report {output.report} > {log} 2>&1"
