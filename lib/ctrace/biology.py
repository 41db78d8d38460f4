"""Biology tests of edge tables, as JSON-ready records for the workflow (method.md §8).

Glue between the statistics modules (`coherence`, `consensus`, `validation`) and the files the workflow
keeps: each function takes loaded tables and returns plain dicts (null distributions included, so the report
can draw them). Edge tables carry `condition`; rewiring nulls always stay within a condition.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ctrace.coherence import coherence, term_sets
from ctrace.consensus import consensus, disease_domains, disease_enrichment, domain_pairs, domains
from ctrace.errors import CtraceInputError
from ctrace.validation import (
    directional_accuracy,
    gene_pairs_from_edges,
    load_perturbation_table,
    load_tf_targets,
    tf_target_precision,
)

ALL_CONDITIONS = "all"


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64)]


def _with_null(result) -> dict[str, Any]:
    """result.to_dict() plus its null distribution (JSON-ready), for the report's figures."""
    return {**result.to_dict(), "null_values": _floats(result.null_values)}


def coherence_by_mode(
    edges_by_mode: Mapping[str, pd.DataFrame],
    significant: pd.DataFrame,
    n_permutations: int,
    seed: int,
    n_swaps_per_edge: float = 10,
) -> dict[str, dict[str, Any]]:
    """Coherence vs the degree-preserving rewiring null, per edge mode: {mode: result + null_values}."""
    terms = term_sets(significant)
    out = {}
    for mode, edges in edges_by_mode.items():
        result = coherence(edges, terms, n_permutations=n_permutations, seed=seed, n_swaps_per_edge=n_swaps_per_edge)
        out[mode] = {"n_annotated_features": len(terms), **_with_null(result)}
    return out


def annotated_top_edges(
    edges: pd.DataFrame, features: pd.DataFrame, significant: pd.DataFrame, n_edges: int = 20, n_genes: int = 5
) -> pd.DataFrame:
    """The `n_edges` edges of largest |d| with each end's domain (or empty) and its first `n_genes` top genes."""
    domain = domains(significant)
    genes = {
        (int(layer), int(feature)): ", ".join(list(top)[:n_genes])
        for layer, feature, top in zip(features["layer"], features["feature"], features["top_genes"])
    }
    top = edges.reindex(edges["cohens_d"].abs().sort_values(ascending=False, kind="stable").index).head(n_edges)
    src = list(zip(top["source_layer"].astype(int), top["source_feature"].astype(int)))
    tgt = list(zip(top["target_layer"].astype(int), top["target_feature"].astype(int)))
    columns = ["condition", "source_layer", "source_feature", "target_layer", "target_feature", "n", "cohens_d",
               "q_value", "sign_consistency"]
    out = top[columns].reset_index(drop=True)
    out["source_domain"] = [domain.get(k, "") for k in src]
    out["target_domain"] = [domain.get(k, "") for k in tgt]
    out["source_top_genes"] = [genes.get(k, "") for k in src]
    out["target_top_genes"] = [genes.get(k, "") for k in tgt]
    return out


def consensus_by_mode(
    edges_a: Mapping[str, pd.DataFrame],
    significant_a: pd.DataFrame,
    edges_b: Mapping[str, pd.DataFrame],
    significant_b: pd.DataFrame,
    n_permutations: int,
    seed: int,
    n_swaps_per_edge: float = 10,
    domain_genes: Mapping[str, frozenset[str]] | None = None,
    disease_gmt: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Cross-model consensus of domain pairs per mode, per shared condition and over all of them.

    {mode: {condition | "all": consensus + null_values + relabel null_values [+ disease]}}. Disease
    enrichment (when `disease_gmt` is given) needs `domain_genes`, each domain term's own gene set.
    """
    dom_a, dom_b = domains(significant_a), domains(significant_b)
    disease_terms = None
    if disease_gmt is not None:
        if domain_genes is None:
            raise CtraceInputError("consensus: disease enrichment needs the domain terms' gene sets")
        used = set(dom_a.values()) | set(dom_b.values())
        unknown = sorted(used - set(domain_genes))
        if unknown:  # they would silently count as non-disease domains
            raise CtraceInputError(
                f"consensus: {len(unknown)} domain term(s) have no gene set in the annotation libraries given, e.g. "
                f"{unknown[:3]}; pass the gene-set libraries the features were annotated with"
            )
        disease_terms = disease_domains({d: g for d, g in domain_genes.items() if d in used}, disease_gmt)
    out: dict[str, Any] = {"domains_a": len(dom_a), "domains_b": len(dom_b)}
    for mode in edges_a:
        ea, eb = edges_a[mode], edges_b[mode]
        shared = sorted(set(ea["condition"]) & set(eb["condition"]))
        groups = {c: (ea[ea["condition"] == c], eb[eb["condition"] == c]) for c in shared}
        groups[ALL_CONDITIONS] = (ea[ea["condition"].isin(shared)], eb[eb["condition"].isin(shared)])
        per_mode = {}
        for name, (ga, gb) in groups.items():
            result = consensus(ga, dom_a, gb, dom_b, n_permutations=n_permutations, seed=seed,
                               n_swaps_per_edge=n_swaps_per_edge)
            record = _with_null(result)
            record["relabel"]["null_values"] = _floats(result.relabel.null_values)
            record["shared_pairs"] = [list(p) for p in result.shared_pairs]
            if disease_terms is not None:
                enrichment = disease_enrichment(domain_pairs(ga, dom_a), domain_pairs(gb, dom_b), disease_terms)
                record["disease"] = {
                    "disease_domains": len(disease_terms),
                    "odds_ratio": enrichment.odds_ratio,
                    "p_value": enrichment.p_value,
                    "table": enrichment.table.tolist(),
                }
            per_mode[name] = record
        out[mode] = per_mode
    return out


def validation_records(
    edges: pd.DataFrame,
    features: pd.DataFrame,
    perturbation_files: Sequence[str | os.PathLike] = (),
    perturbation_values: str = "auto",
    tf_targets: str | os.PathLike | None = None,
    n_top_genes: int = 10,
    pair_weight: str = "abs_d",
    n_shuffles: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Gene-pair predictions of `edges` against the optional perturbation / TF→target tables.

    {"gene_pairs": n, "perturbation": [per cell line] | None, "tf_targets": record | None,
     "skipped": [reasons]}: a check without its input is skipped with a reason, never faked.
    """
    pairs = gene_pairs_from_edges(edges, features, weight=pair_weight, n_top_genes=n_top_genes)
    out: dict[str, Any] = {"gene_pairs": int(len(pairs)), "perturbation": None, "tf_targets": None, "skipped": []}
    if perturbation_files:
        table = load_perturbation_table(list(perturbation_files), values=perturbation_values)
        out["perturbation"] = [r.to_dict() for r in directional_accuracy(pairs, table).values()]
    else:
        out["skipped"].append("perturbation: biology.perturbation is not set in the config")
    if tf_targets:
        result = tf_target_precision(pairs, load_tf_targets(tf_targets), n_shuffles=n_shuffles, seed=seed)
        out["tf_targets"] = _with_null(result)
    else:
        out["skipped"].append("tf_targets: biology.tf_targets is not set in the config")
    return out
