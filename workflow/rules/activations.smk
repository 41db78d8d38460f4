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
        device=DEVICE,
        mem_mb=8000,
        runtime=120,
        batch_size=get_batch_size,
    params:
        model=get_model_args,
        dtype=get_model_dtype,
        positions=config["activations"]["positions_per_cell"],
        seed=get_condition_seed,
    shell:
        "ctrace --threads {threads} dump-activations {params.model}"
        " --device {resources.device} --dtype {params.dtype} --batch-size {resources.batch_size}"
        " --tokenized {input.tokenized}"
        " --layer {wildcards.layer} --positions-per-cell {params.positions} --seed {params.seed}"
        " --out-stem results/activations/{wildcards.model}/{wildcards.condition}/layer{wildcards.layer}"
        " > {log} 2>&1"
