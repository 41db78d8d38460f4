"""Gene-set over-representation: GMT reading, one-sided hypergeometric test, Benjamini–Hochberg FDR.

p = P(X ≥ a),  X ~ Hypergeom(M = |background|, n = |set ∩ background|, N = |query ∩ background|),
a = |query ∩ set ∩ background|  (identical to Fisher's exact test, alternative="greater").
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import hypergeom

from ctrace.errors import CtraceInputError

ENRICHMENT_COLUMNS = ["term", "term_size", "overlap", "overlap_genes", "p_value"]


def read_gmt(path: str | os.PathLike) -> dict[str, frozenset[str]]:
    """Parse a GMT file: one set per line, `name<TAB>description<TAB>gene<TAB>gene…`.

    Blank lines are skipped, empty gene fields (trailing tabs) ignored, CRLF accepted. A line without a
    name or without any gene, or a name that repeats, raises CtraceInputError naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise CtraceInputError(f"{path}: GMT file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CtraceInputError(f"{path}: not UTF-8 text ({err}); expected a GMT gene-set file") from None
    sets: dict[str, frozenset[str]] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        fields = raw.split("\t")
        name = fields[0].strip()
        genes = frozenset(g.strip() for g in fields[2:] if g.strip())
        if not name or len(fields) < 3 or not genes:
            raise CtraceInputError(
                f"{path}, line {line_no}: malformed GMT line (expected "
                f"'name<TAB>description<TAB>gene<TAB>…' with a name and at least one gene); got {raw[:80]!r}"
            )
        if name in sets:
            raise CtraceInputError(f"{path}, line {line_no}: gene set {name!r} appears twice")
        sets[name] = genes
    if not sets:
        raise CtraceInputError(f"{path}: no gene sets found (empty GMT file)")
    return sets


def bh_fdr(p: Iterable[float] | np.ndarray, n_tests: int | None = None) -> np.ndarray:
    """Benjamini–Hochberg q-values: q_(i) = min_{j ≥ i} min(1, p_(j) · m / j), in the input order.

    `n_tests` (m) may exceed len(p): the missing tests are taken to have p = 1. They sort last and only add
    candidates p·m/j ≥ 1 to the running minimum, so the q of the given p-values is exact and terms with zero
    overlap (p = 1) never need to be materialised.
    """
    p_arr = np.asarray(p, dtype=np.float64)
    if p_arr.ndim != 1:
        raise ValueError(f"p must be one-dimensional, got shape {p_arr.shape}")
    if np.isnan(p_arr).any() or (p_arr < 0).any() or (p_arr > 1).any():
        raise ValueError("p-values must lie in [0, 1] and not be NaN")
    m = len(p_arr) if n_tests is None else int(n_tests)
    if m < len(p_arr):
        raise ValueError(f"n_tests={m} is smaller than the number of p-values ({len(p_arr)})")
    if len(p_arr) == 0:
        return p_arr.copy()
    order = np.argsort(p_arr, kind="stable")
    ranked = p_arr[order] * m / np.arange(1, len(p_arr) + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty_like(q_sorted)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


@dataclass(frozen=True)
class GeneSetIndex:
    """A library restricted to a background and to term sizes [min_size, max_size], indexed by gene."""

    terms: tuple[str, ...]
    term_sizes_T: np.ndarray  # |set ∩ background|, int64
    gene_sets: tuple[frozenset[str], ...]  # restricted sets, aligned with terms
    gene_to_terms: Mapping[str, np.ndarray]  # gene → indices into terms
    background_size: int
    background: frozenset[str]

    @property
    def n_terms(self) -> int:
        return len(self.terms)


def index_gene_sets(
    gene_sets: Mapping[str, Iterable[str]],
    background: Iterable[str],
    min_size: int = 5,
    max_size: int = 500,
) -> GeneSetIndex:
    """Restrict each set to the background and keep those with min_size ≤ |set ∩ background| ≤ max_size."""
    bg = frozenset(background)
    terms, sizes, restricted = [], [], []
    gene_to_terms: dict[str, list[int]] = {}
    for term in sorted(gene_sets):
        genes = frozenset(gene_sets[term]) & bg
        if not min_size <= len(genes) <= max_size:
            continue
        t = len(terms)
        terms.append(term)
        sizes.append(len(genes))
        restricted.append(genes)
        for gene in genes:
            gene_to_terms.setdefault(gene, []).append(t)
    return GeneSetIndex(
        terms=tuple(terms),
        term_sizes_T=np.asarray(sizes, dtype=np.int64),
        gene_sets=tuple(restricted),
        gene_to_terms={g: np.asarray(ix, dtype=np.int64) for g, ix in gene_to_terms.items()},
        background_size=len(bg),
        background=bg,
    )


def query_overlaps(
    index: GeneSetIndex, query_genes: Iterable[str], min_overlap: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(term indices, overlaps) of the indexed terms sharing ≥ min_overlap genes with query ∩ background."""
    overlap_T = np.zeros(index.n_terms, dtype=np.int64)
    for gene in set(query_genes) & index.background:
        hits = index.gene_to_terms.get(gene)
        if hits is not None:
            overlap_T[hits] += 1
    terms = np.flatnonzero(overlap_T >= min_overlap)
    return terms, overlap_T[terms]


def hypergeom_upper(overlap, background_size, term_size, query_size) -> np.ndarray:
    """P(X ≥ overlap) for X ~ Hypergeom(M, n, N), broadcast over arrays; clipped to [0, 1].

    scipy's hypergeom.sf loops in Python per element, so it is evaluated once per distinct (a, M, n, N):
    a layer has ~10⁶ tests but only a few thousand distinct combinations (a, N ≤ n_top).
    """
    a, m, n, q = np.broadcast_arrays(*(np.asarray(v, dtype=np.int64) for v in
                                       (overlap, background_size, term_size, query_size)))
    if a.size == 0:
        return np.zeros(a.shape)
    combos, inverse = np.unique(np.stack([a.ravel(), m.ravel(), n.ravel(), q.ravel()], axis=1), axis=0,
                                return_inverse=True)
    p = hypergeom.sf(combos[:, 0] - 1, combos[:, 1], combos[:, 2], combos[:, 3])
    return np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)[inverse.ravel()].reshape(a.shape)


def enrich_indexed(index: GeneSetIndex, query_genes: Iterable[str], min_overlap: int = 0) -> pd.DataFrame:
    """Hypergeometric upper-tail test of the query against every indexed term with overlap ≥ min_overlap."""
    query = sorted(set(query_genes) & index.background)
    keep, a = query_overlaps(index, query, min_overlap)
    n = index.term_sizes_T[keep]
    frame = pd.DataFrame(
        {
            "term": [index.terms[t] for t in keep],
            "term_size": n,
            "overlap": a,
            "overlap_genes": [[g for g in query if g in index.gene_sets[t]] for t in keep],
            "p_value": hypergeom_upper(a, index.background_size, n, len(query)),
        },
        columns=ENRICHMENT_COLUMNS,
    )
    return frame.sort_values(["p_value", "term"], kind="stable").reset_index(drop=True)


def hypergeom_enrichment(
    query_genes: Iterable[str],
    gene_sets: Mapping[str, Iterable[str]],
    background: Iterable[str],
    min_size: int = 5,
    max_size: int = 500,
    min_overlap: int = 0,
) -> pd.DataFrame:
    """One-sided hypergeometric test of `query_genes` against each gene set, all restricted to `background`.

    Returns one row per tested term (size within [min_size, max_size] after restriction) with overlap ≥
    `min_overlap` (0: every tested term), sorted by p-value: term, term_size, overlap, overlap_genes
    (sorted list), p_value = P(X ≥ overlap).
    """
    return enrich_indexed(index_gene_sets(gene_sets, background, min_size, max_size), query_genes, min_overlap)
