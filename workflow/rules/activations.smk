rule dump_activations:
    input:
        tokenized="results/tokenized/{model}/{condition}.sae.npz",
        model=get_model_files,
    output:
        acts="results/activations/{model}/{condition}/layer{layer}.npy",
        rows="results/activations/{model}/{condition}/layer{layer}.rows.parquet",
    log:
        "results/logs/dump_activations/{model}/{condition}/layer{layer}.log",
    benchmark:
        "results/benchmarks/dump_activations/{model}/{condition}/layer{layer}.tsv"
    conda:
        "../envs/ctrace.yaml"
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        model=get_model_args,
        runtime=get_runtime_args,
        batch_size=get_batch_size,
        positions=config["activations"]["positions_per_cell"],
        seed=get_condition_seed,
    shell:
        "ctrace --threads {threads} dump-activations {params.model} {params.runtime} --batch-size {params.batch_size}"
        " --tokenized {input.tokenized}"
        " --layer {wildcards.layer} --positions-per-cell {params.positions} --seed {params.seed}"
        " --out-stem results/activations/{wildcards.model}/{wildcards.condition}/layer{wildcards.layer}"
        " > {log} 2>&1"
