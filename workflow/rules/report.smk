rule report:
    input:
        unpack(get_report_inputs),
    output:
        html="results/report/index.html",
        figures=directory("results/report/figures"),
    log:
        "results/logs/report.log",
    conda:
        "../envs/ctrace.yaml"
    shell:
        "ctrace report --summaries {input.summaries} --sae-quality {input.sae_quality}"
        " --edges {input.edges} --coherence {input.coherence} --top-edges {input.top_edges}"
        " --consensus {input.consensus} --validation {input.validation}"
        " --out-html {output.html} --out-figures {output.figures} > {log} 2>&1"
