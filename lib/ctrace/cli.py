"""`ctrace` command line: one sub-command per workflow step. Rules call these; they call the library.

Input errors (CtraceInputError) are printed as one clear message with exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

from ctrace.errors import CtraceInputError

log = logging.getLogger("ctrace")


def _bounded(convert: type, low: float, high: float = math.inf, open_interval: bool = False):
    """argparse type: `convert(text)` within [low, high] ((low, high) if `open_interval`; counts, indices,
    thresholds), else a clear message."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if convert is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (open_interval and value == low):
            below = "not above" if open_interval else "below"
            raise argparse.ArgumentTypeError(f"{value} is {below} the minimum {low}")
        if value > high or (open_interval and value == high):
            above = "not below" if open_interval else "above"
            raise argparse.ArgumentTypeError(f"{value} is {above} the maximum {high}")
        return value

    return parse


POSITIVE, NON_NEGATIVE, FRACTION = _bounded(int, 1), _bounded(int, 0), _bounded(float, 0.0, 1.0)
SEED = _bounded(int, 0, 2**32 - 1)  # numpy's and torch's seeding accept this range on every platform
POSITIVE_NUMBER = _bounded(float, 0.0, open_interval=True)


# ---------------------------------------------------------------------------------------------
# helpers shared by sub-commands
def _load_backend(args):
    from ctrace.device import resolve_device, resolve_dtype
    from ctrace.models import load_backend

    device = resolve_device(args.device)
    return load_backend(
        args.kind,
        args.checkpoint,
        getattr(args, "dictionaries", None),
        version=getattr(args, "version", "V2"),
        device=device,
        dtype=resolve_dtype(args.dtype, device),
    )


def _add_model_args(p: argparse.ArgumentParser, runtime: bool = True) -> None:
    p.add_argument("--kind", required=True, choices=["geneformer", "scgpt"])
    p.add_argument("--checkpoint", required=True, help="model folder in the official format")
    p.add_argument("--dictionaries", help="Geneformer dictionary folder")
    p.add_argument("--version", default="V2", choices=["V1", "V2"], help="Geneformer version")
    if runtime:
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="float32")


# ---------------------------------------------------------------------------------------------
# sub-commands
def cmd_check_config(args) -> None:
    from ctrace.config import load_config

    config = load_config(args.config)
    print(f"{args.config}: valid ({len(config['models'])} models, {len(config['conditions'])} conditions)")


def cmd_demo_data(args) -> None:
    from ctrace.data import demo_anndata
    from ctrace.io import atomic_path

    adata = demo_anndata()
    with atomic_path(args.out) as tmp:
        adata.write_h5ad(tmp)
    log.info("wrote %s: %d cells x %d genes of integer counts", args.out, adata.n_obs, adata.n_vars)


def cmd_demo_model(args) -> None:
    from ctrace.demo import DemoModelConfig, build_demo_model

    cfg = DemoModelConfig(
        n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
        pretrain_steps=args.pretrain_steps, seed=args.seed,
    )
    report = build_demo_model(args.kind, args.h5ad, Path(args.out_dir), cfg)
    from ctrace.io import write_json

    write_json(args.report, report)
    log.info("demo %s: %s", args.kind, json.dumps(report["heldout"]))


def cmd_select_cells(args) -> None:
    import numpy as np
    import pandas as pd

    from ctrace.data import open_h5ad, select_obs, split_cells
    from ctrace.io import write_tsv

    adata = open_h5ad(Path(args.h5ad), args.condition)
    try:
        obs = adata.obs
        mask = select_obs(obs, args.obs_filter, f"{args.condition}.obs_filter") if args.obs_filter else None
        names = obs.index.astype(str).to_numpy()
        names = names if mask is None else names[mask]
    finally:
        adata.file.close()
    trace, sae = split_cells(
        names, args.trace_cells, args.sae_cells, args.seed, where=args.condition,
        sae_includes_traced=args.sae_includes_traced,
    )
    # one row per (cell, split): with --sae-includes-traced a traced cell is listed under both splits
    table = pd.concat(
        [pd.DataFrame({"obs_name": trace, "split": "trace"}), pd.DataFrame({"obs_name": sae, "split": "sae"})]
    )
    write_tsv(args.out, table)
    log.info("%s: %d cells pass the filter; %d traced, %d for SAE training (%d of them traced)", args.condition,
             len(names), len(trace), len(sae), len(np.intersect1d(trace, sae)))


@contextlib.contextmanager
def _naming_the_gene_column(args):
    """Tokenizer input errors (no gene in the vocabulary, …) name the file, the condition and the setting."""
    try:
        yield
    except CtraceInputError as err:
        raise CtraceInputError(
            f"{args.h5ad} (condition {args.condition}, gene column {args.gene_column!r}: config "
            f"conditions.{args.condition}.gene_column, --gene-column): {err}"
        ) from None


def cmd_tokenize(args) -> None:
    import numpy as np

    from ctrace import tokenize
    from ctrace.data import load_condition
    from ctrace.io import read_table, write_json

    cells = read_table(
        args.cells, "a cell table (select-cells output: obs_name, split)", ["obs_name", "split"], as_text=True
    )
    unknown = sorted(set(cells["split"]) - {"trace", "sae"})
    if unknown:
        raise CtraceInputError(f"{args.cells}: split values {unknown[:5]} are not 'trace' or 'sae'; re-run select-cells")
    if args.kind == "geneformer" and not args.dictionaries:
        raise CtraceInputError("tokenize --kind geneformer needs --dictionaries (the folder with the *_gc104M.pkl files)")
    data = load_condition(
        args.h5ad, counts=args.counts, gene_column=args.gene_column,
        n_counts_column=args.n_counts_column, cells=cells["obs_name"].unique(), where=args.condition,
    )
    if args.kind == "geneformer":
        from ctrace.models.geneformer import read_geneformer_config
        from ctrace.vocab import load_geneformer_dictionaries

        dicts = load_geneformer_dictionaries(args.dictionaries, args.version)
        # upstream's input size, or fewer where the checkpoint has fewer positions (a small custom model)
        max_tokens = min(
            tokenize.GENEFORMER_INPUT_SIZE[args.version],
            read_geneformer_config(args.checkpoint)["max_position_embeddings"],
        )
        with _naming_the_gene_column(args):
            tokenized, report = tokenize.tokenize_geneformer(
                data.counts_CG, data.gene_ids, data.n_counts_C, dicts, data.obs_names, max_tokens
            )
    else:
        from ctrace.models.scgpt import read_scgpt_args
        from ctrace.vocab import load_scgpt_vocab

        _, model_args = read_scgpt_args(args.checkpoint)
        vocab = load_scgpt_vocab(args.checkpoint)
        with _naming_the_gene_column(args):
            tokenized, report = tokenize.tokenize_scgpt(
                data.counts_CG, data.gene_ids, vocab, data.obs_names,
                max_seq_len=args.max_seq_len, n_bins=model_args.n_bins or 51, pad_value=model_args.pad_value,
                seed=args.seed,
            )
    summary = {"condition": args.condition, "model_kind": args.kind, **report.to_dict(), "splits": {}}
    for name, out in (("trace", args.out_trace), ("sae", args.out_sae)):
        wanted = cells.loc[cells["split"] == name, "obs_name"]
        rows = np.flatnonzero(np.isin(tokenized.obs_names, wanted))
        if len(wanted) and not len(rows):
            raise CtraceInputError(
                f"{args.h5ad}: none of the {wanted.nunique()} {name} cells listed in {args.cells} has a gene in "
                f"{args.kind}'s vocabulary; check the gene column (--gene-column, now {args.gene_column!r}) and the "
                "condition's cell filter"
            )
        part = tokenized.subset(rows)
        part.save(out)
        summary["splits"][name] = int(len(part))
    write_json(args.report, summary)
    log.info("%s/%s: %s", args.kind, args.condition, json.dumps(summary))


def cmd_dump_activations(args) -> None:
    from ctrace.activations import dump_activations

    backend = _load_backend(args)
    cells = _load_cells(args.tokenized, backend)
    t0 = time.perf_counter()
    n = dump_activations(
        backend, cells, args.layer, args.out_stem, positions_per_cell=args.positions_per_cell,
        seed=args.seed, batch_size=args.batch_size,
    )
    log.info("layer %d: %d rows from %d cells in %.1fs", args.layer, n, len(cells), time.perf_counter() - t0)


def _dump_sources(stems: list[str]) -> list[tuple[Path, Path]]:
    return [(Path(f"{stem}.npy"), Path(f"{stem}.rows.parquet")) for stem in stems]


def cmd_fit_sae(args) -> None:
    from dataclasses import asdict

    from ctrace.activations import check_dumps
    from ctrace.device import resolve_device
    from ctrace.io import write_json
    from ctrace.sae import save_sae
    from ctrace.sae_training import SAETrainConfig, train_sae

    device = str(resolve_device(args.device))
    cfg = SAETrainConfig(
        expansion=args.expansion, k=args.k, lr=args.lr, batch_size=args.batch_size, n_steps=args.n_steps,
        heldout_fraction=args.heldout_fraction, seed=args.seed, device=device,
    )
    resolved = [str(Path(stem).resolve()) for stem in args.dumps]
    repeated = sorted({stem for stem, path in zip(args.dumps, resolved) if resolved.count(path) > 1})
    if repeated:
        raise CtraceInputError(
            f"fit-sae: dump(s) {repeated} given more than once in --dumps; the same cells would land in both the "
            "training and the held-out split. List each condition once (sae_sets.<set>.conditions)"
        )
    sources = _dump_sources(args.dumps)
    provenance = check_dumps([rows for _, rows in sources], layer=args.layer)
    result = train_sae(sources, cfg)
    sidecar = result.sidecar(
        model=args.model, sae_set=args.sae_set, layer=args.layer,
        dump_provenance=asdict(provenance) if provenance is not None else None,
    )
    save_sae(args.out_stem, result.sae, sidecar)
    write_json(args.metrics, {"model": args.model, "sae_set": args.sae_set, "layer": args.layer,
                              **result.metrics_dict(), "timing": result.timing, "resolved": result.resolved})
    log.info("SAE %s/%s/layer%d: %s", args.model, args.sae_set, args.layer, json.dumps(result.metrics_dict())[:400])


def cmd_sae_quality(args) -> None:
    import pandas as pd

    from ctrace.io import read_json, write_tsv

    keep = ["model", "sae_set", "layer", "heldout_fvu", "heldout_pca_fvu", "fvu_over_pca_fvu", "mean_l0",
            "dead_fraction", "n_heldout_rows"]
    rows = []
    for path in args.metrics:
        metrics = read_json(path, "an SAE metrics JSON (fit-sae --metrics)", ["model", "sae_set", "layer", "heldout_fvu"])
        rows.append({key: metrics.get(key) for key in keep})
    write_tsv(args.out, pd.DataFrame(rows).sort_values(["model", "sae_set", "layer"]))


def cmd_annotate(args) -> None:
    import numpy as np

    from ctrace.activations import DumpProvenance, check_dumps, check_sae_fitted_on
    from ctrace.annotate import annotate_layer
    from ctrace.device import resolve_device
    from ctrace.genesets import load_libraries
    from ctrace.io import write_parquet
    from ctrace.models import checkpoint_shape
    from ctrace.sae import load_sae
    from ctrace.tokenize import TokenizedCells
    from ctrace.vocab import (
        geneformer_token_symbols, load_geneformer_dictionaries, load_scgpt_vocab, scgpt_token_symbols,
    )

    if args.kind == "geneformer":
        symbols = geneformer_token_symbols(load_geneformer_dictionaries(args.dictionaries, args.version))
    else:
        symbols = scgpt_token_symbols(load_scgpt_vocab(args.checkpoint))
    libraries = load_libraries(args.gene_sets)
    tokens = np.unique(np.concatenate([TokenizedCells.load(p).ids for p in args.tokenized]))
    background = {symbols[int(t)] for t in tokens if int(t) in symbols}
    for name, sets in libraries.items():
        if not any(background.intersection(genes) for genes in sets.values()):
            log.warning(
                "gene-set library %s: none of its %d terms shares a gene with the %d background genes, so no "
                "feature can be annotated with it; its genes must be symbols like the model's (e.g. CD19)",
                name, len(sets), len(background),
            )
    device = resolve_device(args.device)
    sae, sidecar = load_sae(args.sae, device=device)
    if sidecar.get("layer") != args.layer:
        raise CtraceInputError(
            f"{args.sae}: SAE of layer {sidecar.get('layer')}, but --layer {args.layer}; pass the SAE fitted on "
            "this layer's dumps"
        )
    shape = checkpoint_shape(args.kind, args.checkpoint)
    model = DumpProvenance(kind=args.kind, n_layers=shape.n_layers, d_model=shape.d_model, layer=args.layer)
    sources = _dump_sources(args.dumps)
    check_dumps([rows for _, rows in sources], layer=args.layer, model=model)
    check_sae_fitted_on(args.sae, sidecar, model, args.checkpoint)
    features, significant = annotate_layer(
        sae, sources, symbols, libraries, background, n_top=args.n_top,
        min_support=args.min_support, q_threshold=args.q, device=device,
    )
    features.insert(0, "layer", args.layer)
    significant.insert(0, "layer", args.layer)
    write_parquet(args.out_features, features)
    write_parquet(args.out_significant, significant)
    n_annotated = int((features["n_significant"] > 0).sum())
    log.info("layer %d: %d of %d features with a significant term (background %d genes)", args.layer,
             n_annotated, len(features), len(background))


def cmd_select_features(args) -> None:
    import numpy as np
    import pandas as pd

    from ctrace.io import read_json, read_table, write_tsv
    from ctrace.trace import select_source_features

    metrics = read_json(args.metrics, "an SAE metrics JSON (fit-sae --metrics)", ["firing_frequency", "layer"])
    try:
        frequency = np.asarray(metrics["firing_frequency"], dtype=np.float64)
    except (TypeError, ValueError):
        frequency = np.array([np.nan])
    if frequency.ndim != 1 or not np.isfinite(frequency).all():
        raise CtraceInputError(
            f"{args.metrics}: 'firing_frequency' must be a list of one finite number per SAE feature; "
            "re-run the SAE fit step"
        )
    features = read_table(
        args.annotation, "a feature annotation table (annotate --out-features)", ["layer", "feature", "n_significant"]
    ).sort_values("feature")
    ids = features["feature"].to_numpy()
    if len(ids) != len(frequency) or not np.array_equal(ids, np.arange(len(frequency))):
        raise CtraceInputError(
            f"{args.annotation}: features {ids[:3].tolist()}...{ids[-3:].tolist()} ({len(ids)} rows) are not the "
            f"{len(frequency)} features of {args.metrics}; pass the annotation of the same SAE"
        )
    if set(features["layer"]) != {metrics["layer"]}:
        raise CtraceInputError(
            f"{args.annotation}: layer {sorted(set(features['layer']))} but {args.metrics} is layer {metrics['layer']}"
        )
    scores = features["n_significant"].to_numpy(dtype=np.float64)
    chosen = select_source_features(
        args.strategy, frequency, scores, args.n, args.seed, explicit=args.features or None
    )
    write_tsv(args.out, pd.DataFrame({"feature": chosen, "firing_frequency": frequency[chosen],
                                      "n_significant": scores[chosen].astype(int)}))
    log.info("layer %s source features (%s): %d selected", metrics["layer"], args.strategy, len(chosen))
    if args.strategy in ("top_frequency", "annotated", "random") and len(chosen) < args.n:
        why = " (features with at least one significant gene set)" if args.strategy == "annotated" else ""
        log.warning("layer %s: only %d of the %d requested source features qualify for %r%s",
                    metrics["layer"], len(chosen), args.n, args.strategy, why)


def cmd_sweep(args) -> None:
    from dataclasses import replace

    import numpy as np
    import pandas as pd

    from ctrace.activations import DumpProvenance, check_sae_fitted_on
    from ctrace.io import read_table
    from ctrace.sae import load_sae
    from ctrace.trace import SweepConfig, run_sweep

    sources = read_table(args.sources, "a source-feature table (select-features output)", ["feature"])
    if len(sources) and not pd.api.types.is_integer_dtype(sources["feature"]):
        raise CtraceInputError(f"{args.sources}: column 'feature' must hold integer feature ids")
    selected = sources["feature"].to_numpy(dtype=np.int64)  # a header-only table: no source feature
    # a shard beyond the list is empty (a selection may return fewer features than the config asks for)
    shard = selected[args.shard * args.features_per_shard : (args.shard + 1) * args.features_per_shard]
    backend = _load_backend(args)
    saes, fitted_on = {}, {}
    for stem in args.saes:
        sae, sidecar = load_sae(stem, device=backend.device)
        layer = sidecar.get("layer")
        if not isinstance(layer, int) or layer in saes:
            raise CtraceInputError(f"{stem}: SAE layer {layer!r} is missing or given twice in --saes; one SAE per layer")
        check_sae_fitted_on(stem, sidecar, DumpProvenance.of_backend(backend, layer), args.checkpoint)
        saes[layer] = sae
        fitted_on.setdefault((sidecar.get("model"), sidecar.get("sae_set")), []).append(stem)
    if len(fitted_on) > 1:
        raise CtraceInputError(
            "--saes: SAEs fitted on different (model, SAE set)s: "
            + "; ".join(f"{model}/{sae_set}: {', '.join(stems)}" for (model, sae_set), stems in fitted_on.items())
            + ". Pass the SAEs of one model and SAE set"
        )
    cells_file = _load_cells(args.tokenized, backend)
    cells = [cells_file.cell(i) for i in range(len(cells_file))]
    targets = [layer for layer in sorted(saes) if layer > args.layer]
    cfg = SweepConfig(features_per_batch=args.features_per_batch, ablations_per_batch=args.ablations_per_batch,
                      cells_per_clean_pass=args.cells_per_clean_pass, response=args.response,
                      null_draws=args.null_draws, seed=args.seed)
    stats = run_sweep(backend, saes, cells, args.layer, shard, targets, cfg)
    ((model_label, _),) = fitted_on
    replace(stats, model=model_label or "").save(args.out)
    log.info("layer %d shard %d: %d source features, %d ablated passes in %.1fs", args.layer, args.shard,
             len(shard), stats.forward_passes, stats.wall_time_s)


def cmd_merge_sweep(args) -> None:
    from ctrace.trace import SweepStats, merge_stats

    merge_stats([SweepStats.load(p) for p in args.shards]).save(args.out)


def cmd_edges(args) -> None:
    import pandas as pd

    from ctrace.edges import EdgeCriteria, edge_table, summarize_edges
    from ctrace.io import write_json, write_parquet, write_tsv
    from ctrace.trace import SweepStats

    criteria = EdgeCriteria(min_n=args.min_n, q_max=args.q, d_min=args.min_abs_d,
                            consistency_min=args.min_consistency, reference_top_k=args.reference_top_k)
    stats = [SweepStats.load(p) for p in args.stats]
    for path, s in zip(args.stats[1:], stats[1:]):
        if (s.backend, s.cells_digest) != (stats[0].backend, stats[0].cells_digest):
            raise CtraceInputError(
                f"{path}: statistics of {s.backend} on other cells than {args.stats[0]} ({stats[0].backend}); "
                "one edges call takes the merged statistics of one model and one condition"
            )
    for path, s in zip(args.stats, stats):
        if s.model and s.model != args.model:
            raise CtraceInputError(
                f"{path}: statistics of model {s.model!r} (the label its SAEs were fitted under), but --model is "
                f"{args.model!r}; pass that model's statistics or its label"
            )
    layers = [s.source_layer for s in stats]
    if len(set(layers)) != len(layers):
        raise CtraceInputError(f"--stats: source layers {layers} repeat; pass each source layer's merged file once")
    summaries = {}
    for mode, out in (("corrected", args.out_corrected), ("reference", args.out_reference)):
        edges = pd.concat([edge_table(s, args.condition, mode, criteria) for s in stats], ignore_index=True)
        edges.insert(0, "model", args.model)
        edges.insert(1, "mode", mode)
        write_parquet(out, edges)
        summaries[mode] = summarize_edges(edges, stats, criteria)
    summary = {"model": args.model, "condition": args.condition, **summaries}
    write_json(args.summary_json, summary)
    flat = [{"model": args.model, "condition": args.condition, "mode": mode,
             **{k: v for k, v in s.items() if not isinstance(v, dict | list)}} for mode, s in summaries.items()]
    write_tsv(args.summary_tsv, pd.DataFrame(flat))
    log.info("%s/%s: %s", args.model, args.condition, json.dumps(flat)[:600])


def cmd_concat_tables(args) -> None:
    import pandas as pd

    from ctrace.io import read_table, write_tsv

    tables = [read_table(p, "a per-condition summary table (TSV)") for p in args.tables]
    for path, table in zip(args.tables[1:], tables[1:]):
        if list(table.columns) != list(tables[0].columns):
            raise CtraceInputError(f"{path}: columns differ from those of {args.tables[0]}; concatenate tables of one kind")
    write_tsv(args.out, pd.concat(tables, ignore_index=True))


EDGE_TABLE = ("an edge table (edges step Parquet)", ["model", "mode", "condition", "source_layer", "source_feature",
                                                    "target_layer", "target_feature", "cohens_d"])
SIGNIFICANT_TABLE = ("a significant-terms table (annotate --out-significant)", ["layer", "feature", "term", "q_value"])
FEATURE_TABLE = ("a feature annotation table (annotate --out-features)", ["layer", "feature", "top_genes"])


def _read_tables(paths: list[str], kind: tuple[str, list[str]]):
    """Concatenated Parquet tables of one kind (what, required columns), each checked."""
    import pandas as pd

    from ctrace.io import read_table

    return pd.concat([read_table(p, *kind) for p in paths], ignore_index=True)


def _one_model(edges, paths: list[str], model: str) -> None:
    """Edge tables handed to a per-model step must be that model's (empty tables, of no model, are fine)."""
    found = sorted(set(edges["model"]))
    if found and found != [model]:
        raise CtraceInputError(f"{', '.join(paths)}: edge tables of model(s) {found}, expected only {model!r}")


def _load_cells(path: str, backend):
    """Tokenized cells that fit the backend: at least one, the right tokenizer (scGPT needs values) and vocabulary."""
    from ctrace.tokenize import TokenizedCells

    cells = TokenizedCells.load(path)
    if not len(cells):
        raise CtraceInputError(f"{path}: no cells; re-run tokenize on a condition with cells")
    wants_values = backend.pad_value is not None  # the back-ends that collate per-token values
    if (cells.values is not None) != wants_values:
        other = "Geneformer" if wants_values else "scGPT"
        raise CtraceInputError(f"{path}: cells tokenized for {other}, not {backend.name}; pass this model's tokenize output")
    low = int(cells.ids.min(initial=0))
    if low < 0:
        raise CtraceInputError(f"{path}: negative token id {low}; the file is not tokenize output, re-run tokenize")
    top = int(cells.ids.max(initial=-1))
    if top >= backend.vocab_size:
        raise CtraceInputError(
            f"{path}: token id {top} is outside {backend.name}'s vocabulary of {backend.vocab_size}; the cells were "
            "tokenized with another vocabulary or dictionary folder"
        )
    return cells


def _by_mode(edges) -> dict:
    from ctrace.edges import MODES

    return {mode: edges[edges["mode"] == mode] for mode in MODES}


def cmd_coherence(args) -> None:
    from ctrace.biology import annotated_top_edges, coherence_by_mode
    from ctrace.io import write_json, write_tsv

    edge_table = _read_tables(args.edges, EDGE_TABLE)
    _one_model(edge_table, args.edges, args.model)
    edges = _by_mode(edge_table)
    significant = _read_tables(args.significant, SIGNIFICANT_TABLE)
    result = coherence_by_mode(edges, significant, args.n_permutations, args.seed, args.swaps_per_edge)
    write_json(args.out_json, {"model": args.model, "condition": args.condition, **result})
    top = annotated_top_edges(edges["corrected"], _read_tables(args.features, FEATURE_TABLE), significant, n_edges=args.n_top_edges)
    top.insert(0, "model", args.model)
    write_tsv(args.out_top_edges, top)
    for mode, r in result.items():
        log.info("%s/%s %s: coherence %.3f over %d testable edges, null %.3f, fold %.2f, p %.3g", args.model,
                 args.condition, mode, r["observed"], r["n_edges_tested"], r["null_mean"], r["fold"], r["p_value"])


def cmd_consensus(args) -> None:
    from ctrace.biology import consensus_by_mode
    from ctrace.edges import MODES
    from ctrace.genesets import load_libraries
    from ctrace.io import write_json

    edges_a, edges_b = _read_tables(args.edges_a, EDGE_TABLE), _read_tables(args.edges_b, EDGE_TABLE)
    _one_model(edges_a, args.edges_a, args.model_a)
    _one_model(edges_b, args.edges_b, args.model_b)
    if args.disease_gmt and not args.gene_sets:
        raise CtraceInputError("consensus --disease-gmt needs --gene-sets (the libraries the domain terms come from)")
    domain_genes = None
    if args.disease_gmt:
        domain_genes = {term: genes for lib in load_libraries(args.gene_sets).values() for term, genes in lib.items()}
    result = consensus_by_mode(
        _by_mode(edges_a), _read_tables(args.significant_a, SIGNIFICANT_TABLE),
        _by_mode(edges_b), _read_tables(args.significant_b, SIGNIFICANT_TABLE),
        args.n_permutations, args.seed, args.swaps_per_edge, domain_genes=domain_genes, disease_gmt=args.disease_gmt,
    )
    if not args.disease_gmt:
        log.info("disease enrichment skipped: biology.disease_gene_sets is not set")
    write_json(args.out, {"model_a": args.model_a, "model_b": args.model_b, **result})
    for mode in MODES:
        r = result[mode]["all"]
        log.info("%s ∩ %s %s: %d shared domain pairs, rewiring null %.2f (fold %.2f, p %.3g), relabelling null "
                 "%.2f (fold %.2f)", args.model_a, args.model_b, mode, r["observed"], r["expected"], r["fold"],
                 r["p_value"], r["relabel"]["expected"], r["relabel"]["fold"])


def cmd_validate(args) -> None:
    from ctrace.biology import validation_records
    from ctrace.io import write_json

    edges = _read_tables(args.edges, EDGE_TABLE)
    _one_model(edges, args.edges, args.model)
    if len(edges) and "corrected" not in set(edges["mode"]):  # zero edges: a result, validated as empty
        raise CtraceInputError(f"{', '.join(args.edges)}: no corrected-mode edge table; validation uses the corrected edges")
    result = validation_records(
        edges[edges["mode"] == "corrected"], _read_tables(args.features, FEATURE_TABLE), perturbation_files=args.perturbation or (),
        perturbation_values=args.perturbation_values, tf_targets=args.tf_targets, n_top_genes=args.n_top_genes,
        pair_weight=args.pair_weight, n_shuffles=args.n_permutations, seed=args.seed,
    )
    for reason in result["skipped"]:
        log.info("%s/%s: skipped %s", args.model, args.condition, reason)
    write_json(args.out, {"model": args.model, "condition": args.condition, "result": result})


def cmd_report(args) -> None:
    import pandas as pd

    from ctrace.edges import MODES
    from ctrace.io import read_json, read_table
    from ctrace.report import ReportInputs, write_report

    def jsons(paths, what: str, keys: list[str], per_mode_key: str | None = None):
        """JSON inputs of one kind; `per_mode_key`: a key each mode's record must have (tells the kinds apart)."""
        objs = [read_json(p, what, keys) for p in paths or []]
        for path, obj in zip(paths or [], objs):
            if per_mode_key and not all(isinstance(obj[m], dict) and per_mode_key in obj[m] for m in MODES):
                raise CtraceInputError(f"{path}: its {'/'.join(MODES)} records lack {per_mode_key!r}; expected {what}")
        return objs

    inputs = ReportInputs(
        summaries=jsons(
            args.summaries, "an edge summary JSON (edges --summary-json)", ["model", "condition", *MODES],
            "abs_d_bin_edges",
        ),
        sae_quality=read_table(
            args.sae_quality, "the SAE quality table (sae-quality output)", ["model", "layer", "heldout_fvu"]
        ),
        edges=_read_tables(args.edges, EDGE_TABLE),
        coherence=jsons(
            args.coherence, "a coherence JSON (coherence --out-json)", ["model", "condition", *MODES], "n_edges_tested"
        ),
        consensus=jsons(args.consensus, "a consensus JSON (consensus --out)", ["model_a", "model_b", *MODES]),
        validation=jsons(args.validation, "a validation JSON (validate --out)", ["model", "condition", "result"]),
        top_edges=pd.concat(
            [read_table(p, "a top-edges table (coherence --out-top-edges)", ["model"]) for p in args.top_edges],
            ignore_index=True,
        ),
    )
    figures = write_report(inputs, args.out_html, args.out_figures)
    log.info("report %s with %d figures: %s", args.out_html, len(figures), ", ".join(f.name for f in figures))


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrace", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--threads", type=POSITIVE, default=None,
        help="CPU threads for torch (the rule's `threads`; oversubscribed cores slow torch down badly)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a workflow config file")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo-data", help="write the embedded demo cells (pbmc68k, integer counts)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo-model", help="build + pre-train a tiny model in the official format")
    p.add_argument("--kind", required=True, choices=["geneformer", "scgpt"])
    p.add_argument("--h5ad", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--n-layers", type=POSITIVE, default=4)
    p.add_argument("--d-model", type=POSITIVE, default=64)
    p.add_argument("--n-heads", type=POSITIVE, default=4)
    p.add_argument("--pretrain-steps", type=NON_NEGATIVE, default=300)
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("select-cells", help="filter a condition's cells and split them (trace / SAE)")
    p.add_argument("--condition", required=True)
    p.add_argument("--h5ad", required=True)
    p.add_argument("--obs-filter")
    p.add_argument("--trace-cells", type=POSITIVE, required=True)
    p.add_argument("--sae-cells", type=POSITIVE)
    p.add_argument(
        "--sae-includes-traced", action="store_true",
        help="draw the SAE cells from all cells, traced ones first (default: from the cells not traced)",
    )
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_select_cells)

    p = sub.add_parser("tokenize", help="tokenize a condition's cells for one model")
    _add_model_args(p, runtime=False)
    p.add_argument("--condition", required=True)
    p.add_argument("--h5ad", required=True)
    p.add_argument("--cells", required=True, help="TSV from select-cells")
    p.add_argument("--counts", default="X")
    p.add_argument("--gene-column", default="index")
    p.add_argument("--n-counts-column")
    p.add_argument("--max-seq-len", type=POSITIVE, default=1200)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out-trace", required=True)
    p.add_argument("--out-sae", required=True)
    p.add_argument("--report", required=True)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("dump-activations", help="write h_L at sampled gene positions (float16)")
    _add_model_args(p)
    p.add_argument("--tokenized", required=True)
    p.add_argument("--layer", type=NON_NEGATIVE, required=True)
    p.add_argument("--positions-per-cell", type=POSITIVE, default=64)
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out-stem", required=True)
    p.set_defaults(func=cmd_dump_activations)

    p = sub.add_parser("fit-sae", help="fit a TopK SAE on activation dumps (held-out split by cell)")
    p.add_argument("--dumps", nargs="+", required=True, help="dump stems (<stem>.npy + <stem>.rows.parquet)")
    p.add_argument("--model", required=True)
    p.add_argument("--sae-set", required=True)
    p.add_argument("--layer", type=NON_NEGATIVE, required=True)
    p.add_argument("--expansion", type=POSITIVE, default=4)
    p.add_argument("--k", type=POSITIVE, default=32)
    p.add_argument("--lr", type=POSITIVE_NUMBER, default=2e-4)
    p.add_argument("--batch-size", type=POSITIVE, default=4096)
    p.add_argument("--n-steps", type=POSITIVE)
    p.add_argument("--heldout-fraction", type=_bounded(float, 0.0, 1.0, open_interval=True), default=0.1)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out-stem", required=True)
    p.add_argument("--metrics", required=True)
    p.set_defaults(func=cmd_fit_sae)

    p = sub.add_parser("sae-quality", help="collect SAE metrics into one table")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sae_quality)

    p = sub.add_parser("annotate", help="top genes and gene-set enrichment of every SAE feature")
    _add_model_args(p)
    p.add_argument("--sae", required=True, help="SAE checkpoint stem")
    p.add_argument("--layer", type=NON_NEGATIVE, required=True)
    p.add_argument("--dumps", nargs="+", required=True)
    p.add_argument("--tokenized", nargs="+", required=True, help="tokenized cells (the gene background)")
    p.add_argument("--gene-sets", nargs="+", required=True, help="bundled names (hallmark, reactome, go_bp) or GMT paths")
    p.add_argument("--n-top", type=POSITIVE, default=20)
    p.add_argument("--min-support", type=NON_NEGATIVE, default=3)
    p.add_argument("--q", type=FRACTION, default=0.05)
    p.add_argument("--out-features", required=True)
    p.add_argument("--out-significant", required=True)
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("select-features", help="choose the source features of one layer to ablate")
    p.add_argument("--metrics", required=True, help="SAE metrics JSON (firing frequencies)")
    p.add_argument("--annotation", required=True, help="features table from annotate")
    p.add_argument("--strategy", required=True, choices=["top_frequency", "annotated", "random", "explicit", "all"])
    p.add_argument("--n", type=POSITIVE, default=30)
    p.add_argument("--features", type=NON_NEGATIVE, nargs="*", help="explicit feature ids")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_select_features)

    p = sub.add_parser("sweep", help="ablate one shard of source features; write sufficient statistics")
    _add_model_args(p)
    p.add_argument("--tokenized", required=True, help="traced cells")
    p.add_argument("--saes", nargs="+", required=True, help="SAE stems: the source layer and every target layer")
    p.add_argument("--layer", type=NON_NEGATIVE, required=True, help="source layer")
    p.add_argument("--sources", required=True, help="selected source features (TSV)")
    p.add_argument("--shard", type=NON_NEGATIVE, required=True)
    p.add_argument("--features-per-shard", type=POSITIVE, required=True)
    p.add_argument("--features-per-batch", type=POSITIVE, default=8,
                   help="consecutive source features of the shard whose ablations share forward passes")
    p.add_argument("--ablations-per-batch", type=POSITIVE, default=32, help="cap on ablated rows per forward pass")
    p.add_argument("--cells-per-clean-pass", type=POSITIVE, default=16,
                   help="cells per clean pass (blocks 0..L) and per window in which passes pack cells of similar length")
    p.add_argument("--response", default="firing", choices=["firing", "all"])
    p.add_argument("--null-draws", type=NON_NEGATIVE, default=0)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("merge-sweep", help="merge shard statistics exactly")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge_sweep)

    p = sub.add_parser("edges", help="Cohen's d, t-test, BH and edge calls in both modes")
    p.add_argument("--model", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--stats", nargs="+", required=True, help="merged statistics, one per source layer")
    p.add_argument("--min-n", type=POSITIVE, default=3)
    p.add_argument("--q", type=FRACTION, default=0.05)
    p.add_argument("--min-abs-d", type=_bounded(float, 0.0), default=0.5)
    p.add_argument("--min-consistency", type=FRACTION, default=0.7)
    p.add_argument("--reference-top-k", type=POSITIVE, default=50)
    p.add_argument("--out-corrected", required=True)
    p.add_argument("--out-reference", required=True)
    p.add_argument("--summary-json", required=True)
    p.add_argument("--summary-tsv", required=True)
    p.set_defaults(func=cmd_edges)

    def add_null_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n-permutations", type=POSITIVE, default=1000)
        p.add_argument("--swaps-per-edge", type=POSITIVE_NUMBER, default=10)
        p.add_argument("--seed", type=SEED, default=0)

    p = sub.add_parser("coherence", help="coherence of edges vs degree-preserving rewiring; annotated top edges")
    p.add_argument("--model", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--edges", nargs="+", required=True, help="edge tables (both modes)")
    p.add_argument("--significant", nargs="+", required=True, help="significant-term tables, every layer")
    p.add_argument("--features", nargs="+", required=True, help="feature tables (top genes), every layer")
    p.add_argument("--n-top-edges", type=POSITIVE, default=20)
    add_null_args(p)
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-top-edges", required=True)
    p.set_defaults(func=cmd_coherence)

    p = sub.add_parser("consensus", help="domain pairs shared by two models vs rewiring and relabelling nulls")
    p.add_argument("--model-a", required=True)
    p.add_argument("--model-b", required=True)
    for side in ("a", "b"):
        p.add_argument(f"--edges-{side}", nargs="+", required=True, help="edge tables, all conditions, both modes")
        p.add_argument(f"--significant-{side}", nargs="+", required=True)
    p.add_argument("--disease-gmt", help="disease gene sets (GMT); omitted: no disease enrichment")
    p.add_argument("--gene-sets", nargs="*", default=[], help="annotation libraries (domain gene sets)")
    add_null_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_consensus)

    p = sub.add_parser("validate", help="gene-pair predictions vs knock-down and TF→target tables")
    p.add_argument("--model", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--edges", nargs="+", required=True)
    p.add_argument("--features", nargs="+", required=True)
    p.add_argument("--perturbation", nargs="*", help="Replogle-layout pseudobulk .h5ad file(s)")
    p.add_argument("--perturbation-values", default="auto", choices=["auto", "lfc", "raw"])
    p.add_argument("--tf-targets", help="TRRUST-layout TF→target table")
    p.add_argument("--n-top-genes", type=POSITIVE, default=10)
    p.add_argument("--pair-weight", default="abs_d", choices=["abs_d", "uniform", "abs_d_rank"])
    add_null_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("report", help="HTML report with PNG figures")
    p.add_argument("--summaries", nargs="+", required=True, help="edge summary JSON files")
    p.add_argument("--sae-quality", required=True)
    p.add_argument("--edges", nargs="+", required=True)
    p.add_argument("--coherence", nargs="+", required=True)
    p.add_argument("--consensus", nargs="*")
    p.add_argument("--validation", nargs="*")
    p.add_argument("--top-edges", nargs="+", required=True)
    p.add_argument("--out-html", required=True)
    p.add_argument("--out-figures", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("concat-tables", help="stack TSV tables with the same columns")
    p.add_argument("--tables", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_concat_tables)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s ctrace %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except CtraceInputError as err:
        print(f"ctrace {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
