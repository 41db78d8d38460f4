import functools
import itertools
import shlex
import zlib
from pathlib import Path

from snakemake.exceptions import WorkflowError

from ctrace.config import DEMO, validate_config
from ctrace.errors import CtraceInputError

try:
    config = validate_config(
        config, schema=Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"
    )
except CtraceInputError as err:
    raise WorkflowError(str(err)) from None

MODELS = sorted(config["models"])
CONDITIONS = sorted(config["conditions"])
SAE_SETS = sorted(config["sae_sets"])
SEED = config["seed"]
DEVICE = config["device"]


wildcard_constraints:
    model="|".join(MODELS),
    condition="|".join(CONDITIONS),
    sae_set="|".join(SAE_SETS),
    layer=r"\d+",
    split="trace|sae",
    shard=r"\d+",
    model_a="|".join(MODELS),
    model_b="|".join(MODELS),


CHECKPOINT_FILES = {
    "geneformer": ["config.json", "model.safetensors"],
    "scgpt": ["args.json", "best_model.pt", "vocab.json"],
}
GENEFORMER_DICTIONARY_FILES = {
    "V2": [
        "token_dictionary_gc104M.pkl",
        "gene_median_dictionary_gc104M.pkl",
        "gene_name_id_dict_gc104M.pkl",
        "ensembl_mapping_dict_gc104M.pkl",
    ],
    "V1": [
        "token_dictionary_gc30M.pkl",
        "gene_median_dictionary_gc30M.pkl",
        "gene_name_id_dict_gc30M.pkl",
        "ensembl_mapping_dict_gc30M.pkl",
    ],
}
DEMO_H5AD = "results/demo/pbmc68k_counts.h5ad"


def model_block(model):
    return config["models"][model]


def condition_block(condition):
    return config["conditions"][condition]


def get_checkpoint_dir(model):
    block = model_block(model)
    if block["checkpoint"] == DEMO:
        return f"results/demo/{model}/checkpoint"
    return block["checkpoint"]


def get_dictionary_dir(model):
    block = model_block(model)
    if block["kind"] != "geneformer":
        return ""
    if block["dictionaries"] == DEMO:
        return f"results/demo/{model}/dictionaries"
    return block["dictionaries"]


def get_model_files(wildcards):
    """Checkpoint (and dictionary) files of a model: demo ones are built by the demo rule."""
    block = model_block(wildcards.model)
    files = [
        f"{get_checkpoint_dir(wildcards.model)}/{name}"
        for name in CHECKPOINT_FILES[block["kind"]]
    ]
    if block["kind"] == "geneformer":
        version = block.get("version", "V2")
        files += [
            f"{get_dictionary_dir(wildcards.model)}/{name}"
            for name in GENEFORMER_DICTIONARY_FILES[version]
        ]
    return files


def get_h5ad(wildcards):
    path = condition_block(wildcards.condition)["h5ad"]
    return DEMO_H5AD if path == DEMO else path


@functools.cache  # input functions ask for it per job; the config check has validated the files
def model_shape(model):
    """(blocks, width) of a model: from its checkpoint's config, or from the demo settings before it is built."""
    block = model_block(model)
    if block["checkpoint"] == DEMO:
        return config["demo"]["n_layers"], config["demo"]["d_model"]
    from ctrace.models import checkpoint_shape  # torch: only for real checkpoints

    shape = checkpoint_shape(block["kind"], block["checkpoint"])
    return shape.n_layers, shape.d_model


def model_layers(model):
    wanted = config["activations"]["layers"]
    n_layers = model_shape(model)[0]
    if wanted == "all":
        return list(range(n_layers))
    return sorted(wanted)  # within range: checked with the config


def model_args(model):
    """ctrace CLI arguments that identify a model (shell-quoted by the caller)."""
    block = model_block(model)
    args = ["--kind", block["kind"], "--checkpoint", get_checkpoint_dir(model)]
    if block["kind"] == "geneformer":
        args += [
            "--dictionaries",
            get_dictionary_dir(model),
            "--version",
            block.get("version", "V2"),
        ]
    return args


def get_model_args(wildcards):
    return " ".join(shlex.quote(a) for a in model_args(wildcards.model))


def get_model_dtype(wildcards):
    return model_block(wildcards.model)["dtype"]


def get_batch_size(wildcards):
    return model_block(wildcards.model)["batch_size"]


def get_condition_seed(wildcards):
    """Per-condition seed: stable under adding or removing other conditions."""
    return SEED + zlib.crc32(wildcards.condition.encode()) % 2**31


def get_final_outputs():
    outputs = []
    for model in MODELS:
        if model_block(model)["checkpoint"] == DEMO:
            outputs.append(f"results/demo/{model}/pretrain_report.json")
        for condition in CONDITIONS:
            outputs.append(f"results/tokenized/{model}/{condition}.report.json")
    outputs.append("results/sae/quality.tsv")
    outputs.append("results/edges/summary.tsv")
    outputs.append("results/report/index.html")
    outputs += get_all_annotations()
    return outputs


def demo_models_regex(kind):
    """Names of the demo models of one kind, as a wildcard regex (never matches if there are none)."""
    names = [
        m
        for m in MODELS
        if model_block(m)["kind"] == kind and model_block(m)["checkpoint"] == DEMO
    ]
    return "|".join(names) if names else "(?!)"


def get_demo_args(wildcards):
    demo = config["demo"]
    return (
        f"--n-layers {demo['n_layers']} --d-model {demo['d_model']} --n-heads {demo['n_heads']}"
        f" --pretrain-steps {demo['pretrain_steps']} --seed {SEED}"
    )


def get_obs_filter_arg(wildcards):
    expression = condition_block(wildcards.condition)["obs_filter"]
    return "" if not expression else f"--obs-filter {shlex.quote(expression)}"


def get_cell_counts_args(wildcards):
    block = condition_block(wildcards.condition)
    args = f"--trace-cells {block['trace_cells']}"
    if block["sae_cells"] is not None:
        args += f" --sae-cells {block['sae_cells']}"
    if block["sae_includes_traced"]:
        args += " --sae-includes-traced"
    return args


def get_condition_data_args(wildcards):
    block = condition_block(wildcards.condition)
    args = ["--counts", block["counts"], "--gene-column", block["gene_column"]]
    if block["n_counts_column"]:
        args += ["--n-counts-column", block["n_counts_column"]]
    if model_block(wildcards.model)["kind"] == "scgpt":
        args += ["--max-seq-len", str(model_block(wildcards.model)["max_seq_len"])]
    return " ".join(shlex.quote(a) for a in args)


def get_sae_training_stems(wildcards):
    """Dump stems of every training condition of an SAE set at one layer (space-separated)."""
    conditions = config["sae_sets"][wildcards.sae_set]["conditions"]
    return " ".join(
        f"results/activations/{wildcards.model}/{condition}/layer{wildcards.layer}"
        for condition in conditions
    )


def get_sae_training_dumps(wildcards):
    stems = get_sae_training_stems(wildcards).split()
    return {
        "acts": [f"{stem}.npy" for stem in stems],
        "rows": [f"{stem}.rows.parquet" for stem in stems],
    }


def get_sae_training_tokenized(wildcards):
    conditions = config["sae_sets"][wildcards.sae_set]["conditions"]
    return [
        f"results/tokenized/{wildcards.model}/{condition}.sae.npz"
        for condition in conditions
    ]


def get_sae_args(wildcards):
    sae = config["sae"]
    args = (
        f"--expansion {sae['expansion']} --k {sae['k']} --lr {sae['lr']} --batch-size {sae['batch_size']}"
        f" --heldout-fraction {sae['heldout_fraction']}"
    )
    if sae["n_steps"] is not None:
        args += f" --n-steps {sae['n_steps']}"
    return args


def get_all_sae_metrics(wildcards):
    return [
        f"results/sae/{model}/{sae_set}/layer{layer}.metrics.json"
        for model in MODELS
        for sae_set in SAE_SETS
        for layer in model_layers(model)
    ]


def get_annotation_args(wildcards):
    annotation = config["annotation"]
    gene_sets = " ".join(shlex.quote(g) for g in annotation["gene_sets"])
    return (
        f"--gene-sets {gene_sets} --n-top {annotation['n_top_genes']}"
        f" --min-support {annotation['min_support']} --q {annotation['q_threshold']}"
    )


def get_all_annotations():
    return [
        f"results/annotation/{model}/{sae_set}/layer{layer}.{table}.parquet"
        for model in MODELS
        for sae_set in SAE_SETS
        for layer in model_layers(model)
        for table in ("features", "significant")
    ]


def sweep_source_layers(model):
    """Source layers: every SAE layer that has a later SAE layer, unless the config lists them."""
    layers = model_layers(model)
    wanted = config["sweep"]["source_layers"]
    if wanted == "all":
        return layers[:-1]
    bad = [layer for layer in wanted if layer not in layers[:-1]]
    if bad:
        raise WorkflowError(
            f"sweep.source_layers: {bad} have no later SAE layer in {model} (layers {layers})"
        )
    return sorted(wanted)


def n_selected_features(model):
    sweep = config["sweep"]
    n_features = config["sae"]["expansion"] * model_shape(model)[1]
    if sweep["selection"] == "all":
        return n_features
    if sweep["selection"] == "explicit":
        return len(sweep["features"])
    return min(sweep["n_features"], n_features)


def sweep_shards(model):
    per_shard = config["sweep"]["features_per_shard"]
    return list(range(-(-n_selected_features(model) // per_shard)))


def get_selection_args(wildcards):
    sweep = config["sweep"]
    args = f"--strategy {sweep['selection']} --n {sweep['n_features']}"
    if sweep["selection"] == "explicit":
        args += " --features " + " ".join(str(f) for f in sweep["features"])
    return args


def condition_sae_set(condition):
    return condition_block(condition)["sae_set"]


def get_sweep_sources(wildcards):
    sae_set = condition_sae_set(wildcards.condition)
    return f"results/sources/{wildcards.model}/{sae_set}/layer{wildcards.layer}.tsv"


def sweep_sae_stems(wildcards):
    """The source layer's SAE and every later SAE layer (the targets)."""
    sae_set = condition_sae_set(wildcards.condition)
    return [
        f"results/sae/{wildcards.model}/{sae_set}/layer{layer}"
        for layer in model_layers(wildcards.model)
        if layer >= int(wildcards.layer)
    ]


def get_sweep_sae_stems(wildcards):
    return " ".join(sweep_sae_stems(wildcards))


def get_sweep_sae_files(wildcards):
    return [
        f"{stem}.{ext}"
        for stem in sweep_sae_stems(wildcards)
        for ext in ("safetensors", "json")
    ]


def get_sweep_args(wildcards):
    sweep = config["sweep"]
    return (
        f"--features-per-shard {sweep['features_per_shard']} --features-per-batch {sweep['features_per_batch']}"
        f" --response {sweep['response']} --null-draws {sweep['null_draws']}"
    )


def get_sweep_runtime(wildcards, attempt):
    return config["sweep"]["runtime_per_shard"] * attempt


def get_sweep_shards(wildcards):
    base = (
        f"results/sweep/{wildcards.model}/{wildcards.condition}/layer{wildcards.layer}"
    )
    return [f"{base}.shard{shard}.npz" for shard in sweep_shards(wildcards.model)]


def get_condition_sweep_stats(wildcards):
    return [
        f"results/sweep/{wildcards.model}/{wildcards.condition}/layer{layer}.stats.npz"
        for layer in sweep_source_layers(wildcards.model)
    ]


def get_edge_args(wildcards):
    edges = config["edges"]
    return (
        f"--min-n {edges['min_n']} --q {edges['q_threshold']} --min-abs-d {edges['min_abs_d']}"
        f" --min-consistency {edges['min_consistency']} --reference-top-k {edges['reference_top_k']}"
    )


def get_all_edge_summaries(wildcards):
    return [
        f"results/edges/{model}/{condition}.summary.tsv"
        for model in MODELS
        for condition in CONDITIONS
    ]


EDGE_MODES = ("corrected", "reference")


def edge_tables(model, condition, modes=EDGE_MODES):
    return [f"results/edges/{model}/{condition}.{mode}.parquet" for mode in modes]


def get_condition_edge_tables(wildcards):
    return edge_tables(wildcards.model, wildcards.condition)


def get_condition_corrected_edges(wildcards):
    return edge_tables(wildcards.model, wildcards.condition, ["corrected"])


def annotation_tables(model, sae_set, table):
    return [
        f"results/annotation/{model}/{sae_set}/layer{layer}.{table}.parquet"
        for layer in model_layers(model)
    ]


def get_condition_annotation(wildcards):
    sae_set = condition_sae_set(wildcards.condition)
    return {
        "significant": annotation_tables(wildcards.model, sae_set, "significant"),
        "features": annotation_tables(wildcards.model, sae_set, "features"),
    }


def get_null_args(wildcards):
    biology = config["biology"]
    return f"--n-permutations {biology['n_permutations']} --swaps-per-edge {biology['swaps_per_edge']}"


def sae_set_conditions(sae_set):
    return [c for c in CONDITIONS if condition_sae_set(c) == sae_set]


def model_pairs():
    return list(itertools.combinations(MODELS, 2))


def get_consensus_inputs(wildcards):
    """Both models' edge tables (conditions of the SAE set) and annotations, plus the disease GMT if set."""
    inputs = {}
    for side, model in (("a", wildcards.model_a), ("b", wildcards.model_b)):
        inputs[f"edges_{side}"] = [
            table
            for condition in sae_set_conditions(wildcards.sae_set)
            for table in edge_tables(model, condition)
        ]
        inputs[f"significant_{side}"] = annotation_tables(
            model, wildcards.sae_set, "significant"
        )
    if config["biology"]["disease_gene_sets"]:
        inputs["disease"] = config["biology"]["disease_gene_sets"]
    return inputs


def get_disease_args(wildcards, input):
    if "disease" not in input.keys():
        return ""
    gene_sets = " ".join(shlex.quote(g) for g in config["annotation"]["gene_sets"])
    return f"--disease-gmt {shlex.quote(input.disease)} --gene-sets {gene_sets}"


def get_validation_files(wildcards):
    biology = config["biology"]
    files = {"perturbation": biology["perturbation"]}
    if biology["tf_targets"]:
        files["tf_targets"] = biology["tf_targets"]
    return files


def get_validation_args(wildcards, input):
    biology = config["biology"]
    args = (
        f"--perturbation-values {biology['perturbation_values']} --n-top-genes {biology['validation_top_genes']}"
        f" --pair-weight {biology['pair_weight']}"
    )
    if biology["perturbation"]:
        args += " --perturbation " + " ".join(
            shlex.quote(p) for p in input.perturbation
        )
    if "tf_targets" in input.keys():
        args += f" --tf-targets {shlex.quote(input.tf_targets)}"
    return args


def get_consensus_outputs():
    return [
        f"results/biology/consensus/{sae_set}/{a}.{b}.json"
        for sae_set in SAE_SETS
        if sae_set_conditions(sae_set)
        for a, b in model_pairs()
    ]


def get_report_inputs(wildcards):
    per_condition = [(m, c) for m in MODELS for c in CONDITIONS]
    return {
        "summaries": [f"results/edges/{m}/{c}.summary.json" for m, c in per_condition],
        "sae_quality": "results/sae/quality.tsv",
        "edges": [table for m, c in per_condition for table in edge_tables(m, c)],
        "coherence": [
            f"results/biology/{m}/{c}.coherence.json" for m, c in per_condition
        ],
        "top_edges": [
            f"results/biology/{m}/{c}.top_edges.tsv" for m, c in per_condition
        ],
        "validation": [
            f"results/biology/{m}/{c}.validation.json" for m, c in per_condition
        ],
        "consensus": get_consensus_outputs(),
    }


def get_condition_features(wildcards):
    return get_condition_annotation(wildcards)["features"]
