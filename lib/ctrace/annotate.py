"""Feature annotation (method.md §5): each feature's top genes, then gene-set enrichment with layer-wide BH.

top genes of f = argsort_t desc  mean{ z_f(row) : token(row) = t, z_f(row) > 0 },  support ≥ min_support;
enrichment: hypergeometric P(X ≥ overlap) per (feature, library, term); BH over all tests of the layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ctrace.enrichment import bh_fdr, hypergeom_upper, index_gene_sets, query_overlaps
from ctrace.errors import CtraceInputError
from ctrace.sae import TopKSAE
from ctrace.sae_training import open_dumps

FEATURE_COLUMNS = [
    "feature", "n_firing_positions", "top_genes", "best_library", "best_term", "best_q", "n_significant",
]
SIGNIFICANT_COLUMNS = [
    "feature", "library", "term", "term_size", "overlap", "overlap_genes", "p_value", "q_value",
]
TOP_GENE_COLUMNS = ["feature", "rank", "token_id", "gene", "mean_activation", "n_positions"]


@dataclass(frozen=True, eq=False)
class FeatureGeneStats:
    """Sparse per-(feature, token) sums and counts of activations over the positions where the feature fires.

    Entries sorted by (feature, token); only pairs with count ≥ 1 are stored.
    """

    feature_P: np.ndarray  # int64
    token_P: np.ndarray  # int64
    sum_P: np.ndarray  # float64, Σ z_f over firing positions of that token
    count_P: np.ndarray  # int64, number of such positions
    n_firing_positions_F: np.ndarray  # int64, Σ over tokens of count_P
    n_rows: int

    @property
    def n_features(self) -> int:
        return len(self.n_firing_positions_F)


class _SparseSums:
    """Accumulate (key, value) pairs into per-key sums and counts, compacting with amortised sorting."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.sums = np.zeros(0, np.float64)
        self.counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, keys: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
        self._pending.append((keys, sums, counts))
        self._pending_size += len(keys)
        if self._pending_size > max(1 << 20, len(self.keys)):
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys] + [p[0] for p in self._pending])
        sums = np.concatenate([self.sums] + [p[1] for p in self._pending])
        counts = np.concatenate([self.counts] + [p[2] for p in self._pending])
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.sums = np.bincount(inverse, weights=sums, minlength=len(self.keys))
        self.counts = np.bincount(inverse, weights=counts, minlength=len(self.keys)).astype(np.int64)
        self._pending, self._pending_size = [], 0


@torch.no_grad()
def feature_gene_stats(
    sae: TopKSAE,
    sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    device: torch.device | str = "cpu",
    batch_rows: int = 8192,
) -> FeatureGeneStats:
    """Stream every row of the dumps through the SAE encoder; sum z_f per (feature, token) where z_f > 0.

    The SAE is moved to `device` (nn.Module.to is in place).
    """
    dumps = open_dumps(sources)
    if dumps.d_model != sae.shape.d_model:
        raise CtraceInputError(
            f"{dumps.paths[0][0]}: d_model {dumps.d_model} does not match the SAE's {sae.shape.d_model}"
        )
    device = torch.device(device)
    sae = sae.to(device)
    n_tokens = int(dumps.token_R.max()) + 1 if dumps.n_rows else 1
    acc = _SparseSums()
    for rows, x16 in dumps.blocks(None, batch_rows):
        x = torch.from_numpy(x16).to(device).float()
        values, indices = sae.pre_acts(x).topk(sae.k, dim=-1, sorted=False)
        fired = values > 0
        tokens = torch.from_numpy(dumps.token_R[rows]).to(device)
        keys = indices[fired] * n_tokens + tokens[:, None].expand_as(indices)[fired]
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64, device=device).index_add_(
            0, inverse, values[fired].double()
        )
        counts = torch.bincount(inverse, minlength=len(uniq))
        acc.add(uniq.cpu().numpy(), sums.cpu().numpy(), counts.cpu().numpy().astype(np.int64))
    acc.compact()
    feature = acc.keys // n_tokens
    return FeatureGeneStats(
        feature_P=feature,
        token_P=acc.keys % n_tokens,
        sum_P=acc.sums,
        count_P=acc.counts,
        n_firing_positions_F=np.bincount(
            feature, weights=acc.counts, minlength=sae.shape.n_features
        ).astype(np.int64),
        n_rows=dumps.n_rows,
    )


def top_genes(
    stats: FeatureGeneStats, token_to_gene: Mapping[int, str], n_top: int = 20, min_support: int = 3
) -> pd.DataFrame:
    """Per feature the n_top genes with the highest mean activation over ≥ min_support firing positions.

    Tokens without a gene in `token_to_gene` are skipped; a gene reached by several tokens keeps its best
    token. Ties are broken by token id. Long table: feature, rank (0-based), token_id, gene,
    mean_activation, n_positions.
    """
    keep = stats.count_P >= min_support
    tokens = stats.token_P[keep]
    uniq, inverse = np.unique(tokens, return_inverse=True)
    genes = np.array([token_to_gene.get(int(t)) for t in uniq] + [None], dtype=object)[:-1][inverse]
    frame = pd.DataFrame({
        "feature": stats.feature_P[keep],
        "token_id": tokens,
        "gene": genes,
        "mean_activation": stats.sum_P[keep] / stats.count_P[keep],
        "n_positions": stats.count_P[keep],
    })
    frame = frame[frame["gene"].notna()]
    frame = frame.sort_values(
        ["feature", "mean_activation", "token_id"], ascending=[True, False, True], kind="stable"
    )
    frame = frame.drop_duplicates(["feature", "gene"], keep="first")
    frame = frame.groupby("feature", sort=True).head(n_top).copy()
    frame["rank"] = frame.groupby("feature").cumcount()
    return frame[TOP_GENE_COLUMNS].reset_index(drop=True)


def annotate_layer(
    sae: TopKSAE,
    sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    token_to_gene: Mapping[int, str],
    libraries: Mapping[str, Mapping[str, frozenset[str] | set[str]]],
    background: set[str] | frozenset[str],
    n_top: int = 20,
    min_support: int = 3,
    q_threshold: float = 0.05,
    min_size: int = 5,
    max_size: int = 500,
    device: torch.device | str = "cpu",
    batch_rows: int = 8192,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Annotate every feature of one layer's SAE; returns (features table, significant long table).

    Tests: each feature with ≥ 1 top gene in the background × each library × each term whose background-
    restricted size is in [min_size, max_size]. BH runs over all those tests (zero-overlap tests count,
    with p = 1). best_* is the feature's lowest-q test (reported even when not significant; NaN/None when
    no test had any overlap); significant rows have q < q_threshold.
    """
    stats = feature_gene_stats(sae, sources, device, batch_rows)
    tops = top_genes(stats, token_to_gene, n_top, min_support)
    genes_by_feature = {int(f): list(g) for f, g in tops.groupby("feature", sort=True)["gene"]}
    indices = {name: index_gene_sets(sets, background, min_size, max_size) for name, sets in libraries.items()}
    bg = frozenset(background)

    # one record per (feature, library, term) with overlap ≥ 1; zero-overlap tests only enter n_tests (p = 1)
    rec_feature, rec_library, rec_term, rec_overlap, rec_query = [], [], [], [], []
    n_tests = 0
    for feature, genes in genes_by_feature.items():
        query = bg.intersection(genes)
        if not query:
            continue
        for lib_i, index in enumerate(indices.values()):
            n_tests += index.n_terms
            terms, overlap = query_overlaps(index, query)
            rec_feature.append(np.full(len(terms), feature))
            rec_library.append(np.full(len(terms), lib_i))
            rec_term.append(terms)
            rec_overlap.append(overlap)
            rec_query.append(np.full(len(terms), len(query)))
    names = list(indices)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    feature_R, library_R, term_R, overlap_R, query_R = map(
        cat, (rec_feature, rec_library, rec_term, rec_overlap, rec_query)
    )
    size_R = np.zeros(len(term_R), np.int64)
    term_names = np.empty(len(term_R), dtype=object)
    for lib_i, index in enumerate(indices.values()):
        mine = library_R == lib_i
        size_R[mine] = index.term_sizes_T[term_R[mine]]
        term_names[mine] = np.asarray(index.terms, dtype=object)[term_R[mine]]
    p_R = hypergeom_upper(overlap_R, len(bg), size_R, query_R)
    tests = pd.DataFrame({
        "feature": feature_R,
        "library": np.asarray(names, dtype=object)[library_R],
        "term": term_names,
        "term_size": size_R,
        "overlap": overlap_R,
        "p_value": p_R,
        "q_value": bh_fdr(p_R, n_tests=n_tests),
        "_lib": library_R,
        "_term": term_R,
    }).sort_values(["feature", "q_value", "p_value", "library", "term"], kind="stable").reset_index(drop=True)

    best = tests.drop_duplicates("feature", keep="first").set_index("feature")
    significant = tests[tests["q_value"] < q_threshold].reset_index(drop=True)
    index_list = list(indices.values())
    significant["overlap_genes"] = [
        sorted(index_list[lib].gene_sets[term].intersection(genes_by_feature[f]))
        for f, lib, term in zip(significant["feature"], significant["_lib"], significant["_term"])
    ]
    significant = significant[SIGNIFICANT_COLUMNS]
    n_sig = significant.groupby("feature").size()
    features = pd.DataFrame({"feature": np.arange(sae.shape.n_features)})
    features["n_firing_positions"] = stats.n_firing_positions_F
    features["top_genes"] = [genes_by_feature.get(f, []) for f in features["feature"]]
    features["best_library"] = features["feature"].map(best["library"])
    features["best_term"] = features["feature"].map(best["term"])
    features["best_q"] = features["feature"].map(best["q_value"]).astype(np.float64)
    features["n_significant"] = features["feature"].map(n_sig).fillna(0).astype(np.int64)
    for frame in (features, significant):
        frame.attrs["n_tests"] = n_tests
    return features[FEATURE_COLUMNS], significant
