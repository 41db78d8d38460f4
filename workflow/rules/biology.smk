rule coherence:
    input:
        unpack(get_condition_annotation),
        edges=get_condition_edge_tables,
    output:
        json="results/biology/{model}/{condition}.coherence.json",
        top_edges="results/biology/{model}/{condition}.top_edges.tsv",
    log:
        "results/logs/coherence/{model}/{condition}.log",
    benchmark:
        "results/benchmarks/coherence/{model}/{condition}.tsv"
    conda:
        "../envs/ctrace.yaml"
    params:
        nulls=get_null_args,
        seed=get_condition_seed,
        n_top_edges=config["biology"]["n_top_edges"],
    shell:
        "ctrace coherence --model {wildcards.model} --condition {wildcards.condition}"
        " --edges {input.edges} --significant {input.significant} --features {input.features}"
        " --n-top-edges {params.n_top_edges} {params.nulls} --seed {params.seed}"
        " --out-json {output.json} --out-top-edges {output.top_edges} > {log} 2>&1"


rule consensus:
    input:
        unpack(get_consensus_inputs),
    output:
        "results/biology/consensus/{sae_set}/{model_a}.{model_b}.json",
    log:
        "results/logs/consensus/{sae_set}/{model_a}.{model_b}.log",
    benchmark:
        "results/benchmarks/consensus/{sae_set}/{model_a}.{model_b}.tsv"
    conda:
        "../envs/ctrace.yaml"
    params:
        nulls=get_null_args,
        disease=get_disease_args,
        seed=SEED,
    shell:
        "ctrace consensus --model-a {wildcards.model_a} --model-b {wildcards.model_b}"
        " --edges-a {input.edges_a} --significant-a {input.significant_a}"
        " --edges-b {input.edges_b} --significant-b {input.significant_b}"
        " {params.disease} {params.nulls} --seed {params.seed} --out {output} > {log} 2>&1"


rule validate_edges:
    input:
        unpack(get_validation_files),
        edges=get_condition_corrected_edges,
        features=get_condition_features,
    output:
        "results/biology/{model}/{condition}.validation.json",
    log:
        "results/logs/validate_edges/{model}/{condition}.log",
    conda:
        "../envs/ctrace.yaml"
    params:
        validation=get_validation_args,
        nulls=get_null_args,
        seed=get_condition_seed,
    shell:
        "ctrace validate --model {wildcards.model} --condition {wildcards.condition}"
        " --edges {input.edges} --features {input.features} {params.validation}"
        " {params.nulls} --seed {params.seed} --out {output} > {log} 2>&1"
