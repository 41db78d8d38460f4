rule demo_data:
    output:
        DEMO_H5AD,
    log:
        "results/logs/demo_data.log",
    conda:
        "../envs/ctrace.yaml"
    shell:
        "ctrace demo-data --out {output} > {log} 2>&1"


rule demo_geneformer:
    input:
        DEMO_H5AD,
    output:
        checkpoint=multiext(
            "results/demo/{model}/checkpoint/", *CHECKPOINT_FILES["geneformer"]
        ),
        dictionaries=multiext(
            "results/demo/{model}/dictionaries/", *GENEFORMER_DICTIONARY_FILES["V2"]
        ),
        report="results/demo/{model}/pretrain_report.json",
    log:
        "results/logs/demo_model/{model}.log",
    benchmark:
        "results/benchmarks/demo_model/{model}.tsv"
    wildcard_constraints:
        model=demo_models_regex("geneformer"),
    conda:
        "../envs/ctrace.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        demo=get_demo_args,
    shell:
        "ctrace --threads {threads} demo-model --kind geneformer --h5ad {input} --out-dir results/demo/{wildcards.model}"
        " --report {output.report} {params.demo} > {log} 2>&1"


rule demo_scgpt:
    input:
        DEMO_H5AD,
    output:
        checkpoint=multiext(
            "results/demo/{model}/checkpoint/", *CHECKPOINT_FILES["scgpt"]
        ),
        report="results/demo/{model}/pretrain_report.json",
    log:
        "results/logs/demo_model/{model}.log",
    benchmark:
        "results/benchmarks/demo_model/{model}.tsv"
    wildcard_constraints:
        model=demo_models_regex("scgpt"),
    conda:
        "../envs/ctrace.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        demo=get_demo_args,
    shell:
        "ctrace --threads {threads} demo-model --kind scgpt --h5ad {input} --out-dir results/demo/{wildcards.model}"
        " --report {output.report} {params.demo} > {log} 2>&1"
