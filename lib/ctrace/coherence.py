"""Biological coherence of a feature→feature edge graph, against a degree-preserving rewiring null.

method.md §8.1. An edge is *tested* when both of its endpoints carry at least one significant term
(q < 0.05 in the feature annotation); it is *coherent* when the two term sets intersect. The statistic is
the fraction of tested edges that are coherent.

Null model: degree-preserving rewiring. Within each block of edges that share (source layer, target
layer) — and condition, when the table holds several — targets are exchanged by double-edge swaps
(a→b, c→d) ⇒ (a→d, c→b). Every source keeps its out-degree and every target its in-degree inside the
block (hence overall), no duplicate edge is ever created, and every feature keeps its own term set, so
the null keeps "hub" features and heavily annotated features exactly as frequent as in the real graph.
The reference instead relabelled terms at random, which ignores both.

Node keys are `(layer, feature)`: sources are `(source_layer, source_feature)`, targets
`(target_layer, target_feature)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from ctrace.errors import CtraceInputError

EDGE_KEY_COLUMNS = ("source_layer", "source_feature", "target_layer", "target_feature")

NodeKey = tuple[int, int]

# rewiring keeps a dense "edge exists" bitmap when #sources × #targets is at most this (bytes)
_DENSE_OCCUPANCY_LIMIT = 64_000_000


# ───────────────────────────────────────── edge blocks and rewiring ─────────────────────────────────────────


def _check_edges(edges: pd.DataFrame, what: str = "edge table") -> None:
    if not isinstance(edges, pd.DataFrame):
        raise CtraceInputError(f"{what}: expected a pandas DataFrame, got {type(edges).__name__}")
    missing = [c for c in EDGE_KEY_COLUMNS if c not in edges.columns]
    if missing:
        raise CtraceInputError(
            f"{what}: missing column(s) {missing}; an edge table needs {list(EDGE_KEY_COLUMNS)} "
            "(one row per source feature → target feature edge, as written by the edge-calling step)"
        )
    for col in EDGE_KEY_COLUMNS:
        if edges[col].isna().any():
            raise CtraceInputError(f"{what}: column '{col}' has missing values; drop those rows first")


class _EdgeBlocks:
    """Integer view of an edge table for fast rewiring.

    Source nodes and target nodes get their own tables. A target node is block-specific (the same
    feature reached from two source layers appears twice), so swapping targets inside a block can
    never move an edge to another block.
    """

    def __init__(self, edges: pd.DataFrame, what: str = "edge table"):
        _check_edges(edges, what)
        self.n_edges = len(edges)
        block_cols = ["source_layer", "target_layer"]
        if "condition" in edges.columns and edges["condition"].nunique(dropna=False) > 1:
            block_cols = ["condition", *block_cols]
        self.block_columns = tuple(block_cols)
        if self.n_edges == 0:
            self.block = np.zeros(0, dtype=np.int64)
            self.src = np.zeros(0, dtype=np.int64)
            self.tgt = np.zeros(0, dtype=np.int64)
            self.src_layer = self.src_feature = np.zeros(0, dtype=np.int64)
            self.tgt_layer = self.tgt_feature = np.zeros(0, dtype=np.int64)
            self.n_src = self.n_tgt = 0
            return
        block_id = edges.groupby(block_cols, sort=True, dropna=False).ngroup().to_numpy(np.int64)
        self.block = block_id
        # source nodes: (source_layer, source_feature), shared across blocks
        src_codes, src_uniques = pd.MultiIndex.from_arrays(
            [edges["source_layer"].to_numpy(), edges["source_feature"].to_numpy()]
        ).factorize()
        self.src = np.asarray(src_codes, dtype=np.int64)
        self.src_layer = np.asarray(src_uniques.get_level_values(0))
        self.src_feature = np.asarray(src_uniques.get_level_values(1))
        # target nodes: (block, target_feature); target_layer is constant inside a block
        tgt_codes, tgt_uniques = pd.MultiIndex.from_arrays(
            [block_id, edges["target_feature"].to_numpy()]
        ).factorize()
        self.tgt = np.asarray(tgt_codes, dtype=np.int64)
        first_row = np.zeros(len(tgt_uniques), dtype=np.int64)
        first_row[self.tgt[::-1]] = np.arange(self.n_edges - 1, -1, -1)
        self.tgt_layer = edges["target_layer"].to_numpy()[first_row]
        self.tgt_feature = np.asarray(tgt_uniques.get_level_values(1))
        self.n_src, self.n_tgt = len(src_uniques), len(tgt_uniques)
        codes = self.src * self.n_tgt + self.tgt
        if len(np.unique(codes)) != self.n_edges:
            dup = edges[pd.Series(codes).duplicated(keep=False).to_numpy()]
            raise CtraceInputError(
                f"{what}: {int(pd.Series(codes).duplicated().sum())} duplicate edge(s) (same source and "
                f"target feature{' and condition' if 'condition' in block_cols else ''}), e.g.\n"
                f"{dup[list(EDGE_KEY_COLUMNS)].head(4).to_string(index=False)}\n"
                "Each edge must appear once; drop duplicates or split the table by condition/mode."
            )

    def rewired_targets(
        self, rng: np.random.Generator, n_swaps_per_edge: float = 10
    ) -> tuple[np.ndarray, int, int]:
        """A degree-preserving rewiring: new target-node index per edge, #accepted, #proposed swaps.

        Batched double-edge swaps. Each round pairs up the edges of every block at random (disjoint
        pairs) and proposes to exchange the two targets. A proposal is rejected when the two edges share
        their source or their target, when any of its four cells (its two edges and the two it would
        create) is also a cell of another proposal of the round, or when a new edge already exists.
        The accepted swaps then touch disjoint cells, so a round is a set of independent swaps whose
        reverse round (same pairs) is exactly as likely: the chain is symmetric and samples the graphs
        with these degrees uniformly (rejecting only colliding *new* edges, as before, was not: it
        under-sampled hub-to-hub edges). About `n_swaps_per_edge × n_edges` swaps are proposed.
        """
        s, t = self.src, self.tgt.copy()
        m = self.n_edges
        if m < 2 or n_swaps_per_edge <= 0:
            return t, 0, 0
        nt = np.int64(max(self.n_tgt, 1))
        n_rounds = max(1, math.ceil(2 * n_swaps_per_edge))
        codes = s * nt + t
        n_cells = int(self.n_src) * int(nt)
        if n_cells <= _DENSE_OCCUPANCY_LIMIT:
            occupied = np.zeros(n_cells, dtype=bool)
            occupied[codes] = True

            def exists(c: np.ndarray) -> np.ndarray:
                return occupied[c]
        else:
            occupied = None
            sorted_codes = np.sort(codes)

            def exists(c: np.ndarray) -> np.ndarray:
                pos = np.minimum(np.searchsorted(sorted_codes, c), m - 1)
                return sorted_codes[pos] == c

        n_blocks = int(self.block.max()) + 1
        block_key = self.block.astype(np.int16 if n_blocks < 2**15 else np.int64)
        half = m // 2
        accepted = proposed = 0
        for _ in range(n_rounds):
            perm = rng.permutation(m)
            order = perm[np.argsort(block_key[perm], kind="stable")]  # random pairs within blocks
            a, b = order[0 : 2 * half : 2], order[1 : 2 * half : 2]
            keep = self.block[a] == self.block[b]
            proposed += int(keep.sum())
            keep &= (s[a] != s[b]) & (t[a] != t[b])
            a, b = a[keep], b[keep]
            if len(a) == 0:
                continue
            new1 = s[a] * nt + t[b]
            new2 = s[b] * nt + t[a]
            # a proposal's four cells are distinct (s and t differ), so a repeated cell is shared with another
            cells = np.concatenate([codes[a], codes[b], new1, new2])
            srt = np.sort(cells)
            shared = srt[1:][srt[1:] == srt[:-1]]
            keep = ~np.isin(cells, shared).reshape(4, -1).any(axis=0) if len(shared) else np.ones(len(a), bool)
            keep &= ~exists(new1) & ~exists(new2)
            a, b, new1, new2 = a[keep], b[keep], new1[keep], new2[keep]
            if len(a) == 0:
                continue
            old = np.concatenate([codes[a], codes[b]])
            t[a], t[b] = t[b].copy(), t[a].copy()
            codes[a], codes[b] = new1, new2
            if occupied is not None:
                occupied[old] = False
                occupied[new1] = True
                occupied[new2] = True
            else:
                sorted_codes = np.sort(codes)
            accepted += len(a)
        return t, accepted, proposed

    def source_lookup(self, index: pd.MultiIndex) -> np.ndarray:
        """Position of every source node in `index` of (layer, feature) keys; -1 when absent."""
        if self.n_src == 0 or len(index) == 0:
            return np.full(self.n_src, -1, dtype=np.int64)
        keys = pd.MultiIndex.from_arrays([self.src_layer, self.src_feature])
        return np.asarray(index.get_indexer(keys), dtype=np.int64)

    def target_lookup(self, index: pd.MultiIndex) -> np.ndarray:
        """Position of every target node in `index` of (layer, feature) keys; -1 when absent."""
        if self.n_tgt == 0 or len(index) == 0:
            return np.full(self.n_tgt, -1, dtype=np.int64)
        keys = pd.MultiIndex.from_arrays([self.tgt_layer, self.tgt_feature])
        return np.asarray(index.get_indexer(keys), dtype=np.int64)


def _node_index(keys) -> pd.MultiIndex:
    keys = list(keys)
    if not keys:
        return pd.MultiIndex.from_arrays([np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)])
    for key in keys[:5]:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise CtraceInputError(
                f"node keys must be (layer, feature) tuples, got {key!r}; build the mapping with "
                "ctrace.coherence.term_sets() or ctrace.consensus.domains()"
            )
    return pd.MultiIndex.from_tuples(keys)


def rewire_edges(
    edges: pd.DataFrame, rng: np.random.Generator | int | None, n_swaps_per_edge: float = 10
) -> pd.DataFrame:
    """Degree-preserving rewiring of an edge table (double-edge swaps of targets within blocks).

    Blocks are (source_layer, target_layer), and also condition when the table holds several. Each row
    keeps all its columns except `target_feature`, which is exchanged with another row of the same block;
    so every source keeps its out-degree and every target its in-degree inside each block, and no
    duplicate edge is created. Row attributes (d, sign, …) stay with the source side of the row.
    Returns a new DataFrame with the same index and columns.
    """
    rng = np.random.default_rng(rng)
    blocks = _EdgeBlocks(edges)
    out = edges.copy()
    if blocks.n_edges == 0:
        return out
    new_t, _, _ = blocks.rewired_targets(rng, n_swaps_per_edge)
    values = blocks.tgt_feature[new_t]
    out["target_feature"] = pd.Series(values, index=out.index).astype(edges["target_feature"].dtype)
    return out


# ───────────────────────────────────────── term sets ─────────────────────────────────────────


SIGNIFICANT_COLUMNS = ("layer", "feature", "library", "term")


def term_sets(significant_table: pd.DataFrame, alpha: float | None = 0.05) -> dict[NodeKey, frozenset]:
    """Per feature: frozenset of its significant (library, term) pairs.

    `significant_table` is the annotation's long table (`layer, feature, library, term, …, q_value`);
    when `alpha` is set and a `q_value` column is present, rows with q ≥ alpha are dropped (the table
    normally holds only q < 0.05 rows already). Features with no significant term are absent.
    """
    _check_significant(significant_table)
    table = significant_table
    if alpha is not None and "q_value" in table.columns:
        table = table[table["q_value"] < alpha]
    out: dict[NodeKey, set] = {}
    for layer, feature, library, term in zip(
        table["layer"].to_numpy(), table["feature"].to_numpy(),
        table["library"].astype(str).to_numpy(), table["term"].astype(str).to_numpy(),
    ):
        out.setdefault((int(layer), int(feature)), set()).add((library, term))
    return {k: frozenset(v) for k, v in out.items()}


def _check_significant(table: pd.DataFrame, extra: tuple[str, ...] = ()) -> None:
    if not isinstance(table, pd.DataFrame):
        raise CtraceInputError(
            f"significant-term table: expected a pandas DataFrame, got {type(table).__name__}"
        )
    need = (*SIGNIFICANT_COLUMNS, *extra)
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise CtraceInputError(
            f"significant-term table: missing column(s) {missing}; expected the feature annotation's long "
            "table with columns layer, feature, library, term, term_size, overlap, overlap_genes, p_value, "
            "q_value (one row per significant feature × term)"
        )


# ───────────────────────────────────────── coherence ─────────────────────────────────────────


@dataclass
class CoherenceResult:
    """Coherence of an edge graph vs its degree-preserving rewiring null (method.md §8.1).

    observed        fraction of tested edges (both ends annotated) whose term sets intersect
    n_edges_total   edges in the table
    n_edges_tested  edges with both endpoints annotated
    n_edges_shared  tested edges sharing ≥ 1 term
    null_mean/sd    mean and sd of the same fraction over rewired graphs
    fold            observed / null_mean
    p_value         empirical, (1 + #{null ≥ observed}) / (1 + n_permutations)
    swap_acceptance accepted / proposed double-edge swaps (low ⇒ blocks are nearly complete and the null
                    can hardly move; read the p-value with that in mind)
    """

    observed: float
    n_edges_total: int
    n_edges_tested: int
    n_edges_shared: int
    null_mean: float
    null_sd: float
    fold: float
    p_value: float
    n_permutations: int
    n_swaps_per_edge: float
    seed: int | None
    swap_acceptance: float
    null_values: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-permutation null values)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "null_values"}
        return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}


def _fold(observed: float, expected: float) -> float:
    if not np.isfinite(expected) or not np.isfinite(observed):
        return float("nan")
    if expected == 0:
        return float("nan") if observed == 0 else float("inf")
    return float(observed / expected)


def empirical_p(observed: float, null: np.ndarray) -> float:
    """(1 + #{null ≥ observed}) / (1 + n), with a relative tolerance for float ties."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed):
        return float("nan")
    tol = 1e-12 * max(1.0, abs(observed))
    return float((1 + np.count_nonzero(null >= observed - tol)) / (1 + len(null)))


def coherence(
    edges: pd.DataFrame,
    term_sets: Mapping[NodeKey, frozenset],
    n_permutations: int = 1000,
    seed: int | None = 0,
    n_swaps_per_edge: float = 10,
) -> CoherenceResult:
    """Fraction of annotated edges whose endpoints share a term, vs degree-preserving rewiring.

    `term_sets` maps (layer, feature) → frozenset of terms (any hashable; `term_sets()` gives
    (library, term) pairs); features that are absent or have an empty set are unannotated. Each null
    graph is one independent rewiring of the observed graph (`rewire_edges` with `n_swaps_per_edge`);
    every feature keeps its own term set, so only who-connects-to-whom is randomised.
    """
    if n_permutations < 0:
        raise CtraceInputError(f"coherence: n_permutations must be ≥ 0, got {n_permutations}")
    blocks = _EdgeBlocks(edges)
    annotated = {k: v for k, v in term_sets.items() if v}
    index = _node_index(annotated.keys())
    term_ids: dict[Any, int] = {}
    rows, cols = [], []
    for i, key in enumerate(index):
        for term in annotated[key]:
            rows.append(i)
            cols.append(term_ids.setdefault(term, len(term_ids)))
    incidence = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(index), max(len(term_ids), 1))
    )
    src_ann = blocks.source_lookup(index)[blocks.src] if blocks.n_edges else np.zeros(0, np.int64)
    tgt_ann_node = blocks.target_lookup(index)
    has_src = src_ann >= 0
    src_rows = incidence[src_ann[has_src]]

    def statistic(tgt: np.ndarray) -> tuple[float, int, int]:
        t_ann = tgt_ann_node[tgt[has_src]] if len(tgt) else np.zeros(0, np.int64)
        tested = t_ann >= 0
        n_tested = int(tested.sum())
        if n_tested == 0:
            return float("nan"), 0, 0
        shared = np.asarray(
            src_rows[tested].multiply(incidence[t_ann[tested]]).sum(axis=1)
        ).ravel() > 0
        n_shared = int(shared.sum())
        return n_shared / n_tested, n_tested, n_shared

    observed, n_tested, n_shared = statistic(blocks.tgt)
    rng = np.random.default_rng(seed)
    null = np.full(n_permutations, np.nan)
    accepted = proposed = 0
    for i in range(n_permutations):
        new_t, acc, prop = blocks.rewired_targets(rng, n_swaps_per_edge)
        accepted += acc
        proposed += prop
        null[i] = statistic(new_t)[0]
    finite = null[np.isfinite(null)]
    null_mean = float(finite.mean()) if len(finite) else float("nan")
    null_sd = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
    return CoherenceResult(
        observed=float(observed),
        n_edges_total=blocks.n_edges,
        n_edges_tested=n_tested,
        n_edges_shared=n_shared,
        null_mean=null_mean,
        null_sd=null_sd,
        fold=_fold(observed, null_mean),
        p_value=empirical_p(observed, finite) if n_tested else float("nan"),
        n_permutations=int(n_permutations),
        n_swaps_per_edge=n_swaps_per_edge,
        seed=seed,
        swap_acceptance=float(accepted / proposed) if proposed else float("nan"),
        null_values=null,
    )
