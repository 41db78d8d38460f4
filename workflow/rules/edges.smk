rule edges:
    input:
        get_condition_sweep_stats,
    output:
        corrected="results/edges/{model}/{condition}.corrected.parquet",
        reference="results/edges/{model}/{condition}.reference.parquet",
        summary_json="results/edges/{model}/{condition}.summary.json",
        summary_tsv="results/edges/{model}/{condition}.summary.tsv",
    log:
        "results/logs/edges/{model}/{condition}.log",
    conda:
        "../envs/ctrace.yaml"
    params:
        criteria=get_edge_args,
    shell:
        "ctrace edges --model {wildcards.model} --condition {wildcards.condition} --stats {input}"
        " {params.criteria} --out-corrected {output.corrected} --out-reference {output.reference}"
        " --summary-json {output.summary_json} --summary-tsv {output.summary_tsv} > {log} 2>&1"


rule edge_summary:
    input:
        get_all_edge_summaries,
    output:
        "results/edges/summary.tsv",
    log:
        "results/logs/edge_summary.log",
    conda:
        "../envs/ctrace.yaml"
    shell:
        "ctrace concat-tables --tables {input} --out {output} > {log} 2>&1"
