"""Domain labels, cross-model consensus of domain pairs, and disease enrichment (method.md §8.2–8.4).

Domain of a feature: its most significant term — lowest p-value, ties broken by term name, then library
name. One rule for sources and targets. Features with no significant term have no domain; an edge counts
toward domain pairs only when both ends have one.

Consensus: the domain pairs (source domain → target domain) present in both models' edge sets.
The null rewires each model's edges (`ctrace.coherence.rewire_edges`: degree-preserving double-edge swaps
within (source layer, target layer) blocks) and recomputes the overlap. Every feature keeps its domain and
its degree, so each domain's frequency on the source side and on the target side is preserved — popular
domains stay popular, which is what makes their pairs likely to be shared by chance.

The reference's null (`relabel_null`) permutes domain names among the distinct domains of model B's pairs
and intersects the relabelled set with model A's. It sends a popular domain of B to a random, usually rare,
domain name, so its expected overlap is far below the rewiring null's whenever a few domains dominate:
its fold is inflated. It is reported next to the rewiring null only for comparison.

Disease domains (method.md §8.4), the rule used here:
  * a domain term is a *disease domain* when it is itself a set of the disease GMT (same name), or when its
    gene set overlaps a disease gene set more than chance: one-sided hypergeometric test of the domain's
    genes against each disease set (background = `background`, default the union of all domain genes),
    BH-FDR over all domain × disease tests, q < alpha and overlap ≥ min_overlap (`disease_domains`);
  * a domain *pair* is a disease pair when EITHER of its two domains is a disease domain (`rule="either"`,
    the default; `rule="both"` requires both, closer to the reference's same-disease-on-both-ends rule);
  * the 2×2 table counts ANNOTATED domain pairs only (pairs seen in either model, both ends annotated):
    rows disease / other, columns consensus (in both models) / not consensus. The reference put edges
    with unannotated ends in the "other" row, which inflates the odds ratio.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from ctrace.coherence import _check_significant, _EdgeBlocks, _fold, _node_index, empirical_p
from ctrace.enrichment import bh_fdr, read_gmt
from ctrace.errors import CtraceInputError

__all__ = [
    "ConsensusResult", "DiseaseEnrichment", "RelabelNullResult", "consensus", "disease_domains",
    "disease_enrichment", "domain_pairs", "domains", "read_gmt", "relabel_null",
]

NodeKey = tuple[int, int]
DomainPair = tuple[str, str]


# ───────────────────────────────────────── domains ─────────────────────────────────────────


def domains(significant_table: pd.DataFrame, alpha: float | None = 0.05) -> dict[NodeKey, str]:
    """Domain (most significant term name) of every feature with ≥ 1 significant term.

    Lowest `p_value` wins; ties go to the alphabetically first term name, then library name.
    When `alpha` is set and the table has `q_value`, rows with q ≥ alpha are ignored.
    """
    _check_significant(significant_table, extra=("p_value",))
    table = significant_table
    if alpha is not None and "q_value" in table.columns:
        table = table[table["q_value"] < alpha]
    if table.empty:
        return {}
    table = table.assign(_term=table["term"].astype(str), _lib=table["library"].astype(str))
    table = table.sort_values(["layer", "feature", "p_value", "_term", "_lib"], kind="mergesort")
    best = table.drop_duplicates(["layer", "feature"], keep="first")
    return {
        (int(layer), int(feature)): term
        for layer, feature, term in zip(best["layer"], best["feature"], best["_term"])
    }


class _DomainGraph:
    """Edges as integer (source-domain, target-domain) codes, with a rewiring engine."""

    def __init__(self, edges: pd.DataFrame, domain: Mapping[NodeKey, str], vocab: dict[str, int], what: str):
        self.blocks = _EdgeBlocks(edges, what)
        keys = [k for k, v in domain.items() if v is not None and v == v]
        index = _node_index(keys)
        dom_of_key = np.array([vocab.setdefault(domain[k], len(vocab)) for k in index], dtype=np.int64)
        src_pos = self.blocks.source_lookup(index)
        tgt_pos = self.blocks.target_lookup(index)
        self.src_dom_node = np.where(src_pos >= 0, dom_of_key[np.maximum(src_pos, 0)], -1) if len(
            dom_of_key) else np.full(self.blocks.n_src, -1)
        self.tgt_dom_node = np.where(tgt_pos >= 0, dom_of_key[np.maximum(tgt_pos, 0)], -1) if len(
            dom_of_key) else np.full(self.blocks.n_tgt, -1)
        self.src_dom = self.src_dom_node[self.blocks.src] if self.blocks.n_edges else np.zeros(0, np.int64)

    def pair_codes(self, tgt: np.ndarray | None, n_domains: int) -> np.ndarray:
        """Sorted unique codes src_domain * n_domains + tgt_domain over edges with both ends annotated."""
        tgt = self.blocks.tgt if tgt is None else tgt
        if self.blocks.n_edges == 0:
            return np.zeros(0, dtype=np.int64)
        t_dom = self.tgt_dom_node[tgt]
        ok = (self.src_dom >= 0) & (t_dom >= 0)
        return np.unique(self.src_dom[ok] * np.int64(n_domains) + t_dom[ok])


def domain_pairs(edges: pd.DataFrame, domain: Mapping[NodeKey, str]) -> Counter:
    """Counter of (source domain, target domain) → number of edges, over edges with both ends annotated."""
    vocab: dict[str, int] = {}
    graph = _DomainGraph(edges, domain, vocab, "edge table")
    names = np.array(list(vocab), dtype=object)
    if graph.blocks.n_edges == 0:
        return Counter()
    t_dom = graph.tgt_dom_node[graph.blocks.tgt]
    ok = (graph.src_dom >= 0) & (t_dom >= 0)
    return Counter(zip(names[graph.src_dom[ok]].tolist(), names[t_dom[ok]].tolist()))


# ───────────────────────────────────────── consensus ─────────────────────────────────────────


@dataclass
class RelabelNullResult:
    """The reference's null: domain names permuted among model B's domains (ignores popularity)."""

    expected: float
    null_sd: float
    fold: float
    p_value: float
    n_permutations: int
    null_values: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "null_values"}


@dataclass
class ConsensusResult:
    """Cross-model consensus of domain pairs (method.md §8.3).

    observed          |pairs_a ∩ pairs_b| (distinct annotated domain pairs present in both models)
    n_pairs_a/_b      distinct annotated domain pairs per model
    n_edges_annotated_a/_b  edges with both ends annotated per model
    expected, null_sd rewiring null (both models rewired independently each permutation)
    fold              observed / expected
    p_value           empirical, (1 + #{null ≥ observed}) / (1 + n_permutations)
    relabel           the reference's relabelling null on the same observed sets, for comparison
    shared_pairs      the consensus pairs, sorted
    """

    observed: int
    n_pairs_a: int
    n_pairs_b: int
    n_edges_annotated_a: int
    n_edges_annotated_b: int
    expected: float
    null_sd: float
    fold: float
    p_value: float
    n_permutations: int
    n_swaps_per_edge: float
    seed: int | None
    relabel: RelabelNullResult
    shared_pairs: list[DomainPair] = field(repr=False, default_factory=list)
    null_values: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self, include_pairs: bool = False) -> dict[str, Any]:
        out = {
            k: getattr(self, k)
            for k in self.__dataclass_fields__
            if k not in ("null_values", "relabel", "shared_pairs")
        }
        out["relabel"] = self.relabel.to_dict()
        if include_pairs:
            out["shared_pairs"] = [list(p) for p in self.shared_pairs]
        return out


def _summary(null: np.ndarray) -> tuple[float, float]:
    null = np.asarray(null, dtype=np.float64)
    mean = float(null.mean()) if len(null) else float("nan")
    sd = float(null.std(ddof=1)) if len(null) > 1 else float("nan")
    return mean, sd


def consensus(
    edges_a: pd.DataFrame,
    domains_a: Mapping[NodeKey, str],
    edges_b: pd.DataFrame,
    domains_b: Mapping[NodeKey, str],
    n_permutations: int = 1000,
    seed: int | None = 0,
    n_swaps_per_edge: float = 10,
) -> ConsensusResult:
    """Domain pairs shared by two models' edge graphs, vs a degree-preserving rewiring null.

    `edges_a`/`edges_b` are edge tables (several conditions of one model may be concatenated: rewiring
    then stays within each condition); `domains_*` map (layer, feature) → domain term of that model.
    The relabelling null of the reference is computed on the same observed pair sets and attached as
    `result.relabel`.
    """
    if n_permutations < 0:
        raise CtraceInputError(f"consensus: n_permutations must be ≥ 0, got {n_permutations}")
    vocab: dict[str, int] = {}
    graph_a = _DomainGraph(edges_a, domains_a, vocab, "edge table of model A")
    graph_b = _DomainGraph(edges_b, domains_b, vocab, "edge table of model B")
    n_dom = max(len(vocab), 1)
    codes_a = graph_a.pair_codes(None, n_dom)
    codes_b = graph_b.pair_codes(None, n_dom)
    shared = np.intersect1d(codes_a, codes_b, assume_unique=True)
    observed = len(shared)

    rng = np.random.default_rng(seed)
    null = np.zeros(n_permutations, dtype=np.float64)
    for i in range(n_permutations):
        ta, _, _ = graph_a.blocks.rewired_targets(rng, n_swaps_per_edge)
        tb, _, _ = graph_b.blocks.rewired_targets(rng, n_swaps_per_edge)
        null[i] = len(np.intersect1d(graph_a.pair_codes(ta, n_dom), graph_b.pair_codes(tb, n_dom),
                                     assume_unique=True))
    expected, sd = _summary(null)

    names = np.array(list(vocab), dtype=object)
    shared_pairs = sorted(zip(names[shared // n_dom].tolist(), names[shared % n_dom].tolist()))
    relabel = _relabel_codes(codes_a, codes_b, n_dom, n_permutations, np.random.default_rng(
        None if seed is None else seed + 1))

    def n_annotated(graph: _DomainGraph) -> int:
        if graph.blocks.n_edges == 0:
            return 0
        return int(((graph.src_dom >= 0) & (graph.tgt_dom_node[graph.blocks.tgt] >= 0)).sum())

    return ConsensusResult(
        observed=int(observed),
        n_pairs_a=len(codes_a),
        n_pairs_b=len(codes_b),
        n_edges_annotated_a=n_annotated(graph_a),
        n_edges_annotated_b=n_annotated(graph_b),
        expected=expected,
        null_sd=sd,
        fold=_fold(observed, expected),
        p_value=empirical_p(observed, null),
        n_permutations=int(n_permutations),
        n_swaps_per_edge=n_swaps_per_edge,
        seed=seed,
        relabel=relabel,
        shared_pairs=shared_pairs,
        null_values=null,
    )


def _relabel_codes(
    codes_a: np.ndarray, codes_b: np.ndarray, n_dom: int, n_permutations: int, rng: np.random.Generator
) -> RelabelNullResult:
    observed = len(np.intersect1d(codes_a, codes_b, assume_unique=True))
    src_b, tgt_b = codes_b // n_dom, codes_b % n_dom
    doms_b = np.unique(np.concatenate([src_b, tgt_b]))
    mapping = np.arange(n_dom, dtype=np.int64)
    null = np.zeros(n_permutations, dtype=np.float64)
    for i in range(n_permutations):
        mapping[doms_b] = rng.permutation(doms_b)
        relabelled = np.unique(mapping[src_b] * np.int64(n_dom) + mapping[tgt_b])
        null[i] = len(np.intersect1d(codes_a, relabelled, assume_unique=True))
    expected, sd = _summary(null)
    return RelabelNullResult(
        expected=expected,
        null_sd=sd,
        fold=_fold(observed, expected),
        p_value=empirical_p(observed, null),
        n_permutations=int(n_permutations),
        null_values=null,
    )


def relabel_null(
    pairs_a: Iterable[DomainPair], pairs_b: Iterable[DomainPair], n_permutations: int = 1000,
    seed: int | None = 0,
) -> RelabelNullResult:
    """The reference's consensus null, for comparison only.

    Each permutation is a random bijection of the distinct domain names occurring in `pairs_b` onto
    themselves, applied to both ends of every pair of B; the statistic is the overlap of the relabelled
    set with `pairs_a`. It ignores how often each domain occurs, so it underestimates chance overlap
    when a few domains are very popular (fold inflated). `fold` here is observed / expected (the
    reference divided by max(expected, 1)); `p_value` uses (1 + #) / (1 + n).
    """
    set_a, set_b = set(pairs_a), set(pairs_b)
    vocab: dict[str, int] = {}
    for s, t in sorted(set_a | set_b):  # sorted: results must not depend on string hashing
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(t, len(vocab))
    n_dom = max(len(vocab), 1)
    codes_a = np.unique(np.array([vocab[s] * n_dom + vocab[t] for s, t in set_a], dtype=np.int64))
    codes_b = np.unique(np.array([vocab[s] * n_dom + vocab[t] for s, t in set_b], dtype=np.int64))
    return _relabel_codes(codes_a, codes_b, n_dom, n_permutations, np.random.default_rng(seed))


# ───────────────────────────────────────── disease ─────────────────────────────────────────


def disease_domains(
    domain_genes: Mapping[str, Iterable[str]],
    disease_gmt: str | os.PathLike | Mapping[str, Iterable[str]],
    background: Iterable[str] | None = None,
    alpha: float = 0.05,
    min_overlap: int = 3,
) -> set[str]:
    """Domain terms that are disease domains (see the module docstring for the rule).

    `domain_genes` maps each domain term to its genes — normally the term's own gene set from the
    annotation GMT library it came from. `disease_gmt` is a GMT path or a name → genes mapping.
    `background` is the gene universe (default: union of all domain genes); disease sets are restricted
    to it. A domain whose name is a disease set name is a disease domain without a test.
    """
    disease = read_gmt(disease_gmt) if isinstance(disease_gmt, (str, os.PathLike)) else {
        str(k): frozenset(v) for k, v in disease_gmt.items()
    }
    dom = {str(k): frozenset(v) for k, v in domain_genes.items()}
    if background is not None:
        universe = frozenset(background)
    else:
        universe = frozenset().union(*dom.values()) if dom else frozenset()
    out = {d for d in dom if d in disease}
    n = len(universe)
    tests: list[tuple[str, float]] = []
    for d, genes in dom.items():
        g = genes & universe
        if not g:
            continue
        for dset in disease.values():
            k_set = dset & universe
            overlap = len(g & k_set)
            if overlap < max(min_overlap, 1):
                tests.append((d, 1.0))
                continue
            tests.append((d, float(stats.hypergeom.sf(overlap - 1, n, len(k_set), len(g)))))
    if tests:
        q = bh_fdr(np.array([p for _, p in tests], dtype=np.float64))
        out |= {d for (d, _), qv in zip(tests, q) if qv < alpha}
    return out


class DiseaseEnrichment(NamedTuple):
    """odds_ratio, p_value (Fisher), table = [[disease∧consensus, disease∧¬consensus],
    [other∧consensus, other∧¬consensus]] over annotated domain pairs seen in either model."""

    odds_ratio: float
    p_value: float
    table: np.ndarray


def disease_enrichment(
    pairs_a: Iterable[DomainPair],
    pairs_b: Iterable[DomainPair],
    disease_terms: set[str],
    rule: str = "either",
    alternative: str = "greater",
) -> DiseaseEnrichment:
    """Are disease domain pairs more often consensus pairs than other annotated pairs? (Fisher's exact)

    Universe: distinct annotated domain pairs of model A ∪ model B (Counters are read as sets).
    Consensus: pair present in both. Disease pair: either domain is in `disease_terms` (`rule="either"`),
    or both (`rule="both"`). `alternative` is passed to scipy's fisher_exact ("greater" = enrichment,
    as in the reference). The odds ratio is the sample odds ratio (ad − bc form, inf when b·c = 0).
    """
    if rule not in ("either", "both"):
        raise CtraceInputError(f"disease_enrichment: rule must be 'either' or 'both', got {rule!r}")
    set_a, set_b = set(pairs_a), set(pairs_b)
    universe = set_a | set_b
    disease_terms = set(disease_terms)
    combine = any if rule == "either" else all
    table = np.zeros((2, 2), dtype=np.int64)
    for pair in universe:
        row = 0 if combine(d in disease_terms for d in pair) else 1
        col = 0 if (pair in set_a and pair in set_b) else 1
        table[row, col] += 1
    if table.sum(axis=1).min() == 0 or table.sum(axis=0).min() == 0:
        return DiseaseEnrichment(float("nan"), float("nan"), table)
    res = stats.fisher_exact(table, alternative=alternative)
    return DiseaseEnrichment(float(res.statistic), float(res.pvalue), table)
