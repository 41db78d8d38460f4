# ctrace: causal circuit tracing in single-cell foundation models.
# Usage: snakemake --cores 2            (demo, one machine)
#        snakemake --profile profiles/slurm   (a Slurm cluster)


# The demo config, unless --configfile names the user's own (which then replaces it, not merges).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/edges.smk"
include: "workflow/rules/biology.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
