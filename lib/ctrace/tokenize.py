"""Raw counts → model tokens, exactly as the official Geneformer and scGPT tokenizers (method.md §2).

Geneformer (model_formats.md §1.6–1.7, upstream `geneformer/tokenizer.py`):
    v_g = count_g / n_counts × 10,000 / median_g  (float64, in that order), rank = np.argsort(-v)
    → V2: `<cls>` + top 4,094 genes + `<eos>`; V1: top 2,048 genes, no specials.
scGPT whole-human (model_formats.md §2.7, upstream `scgpt/tasks/cell_emb.py` + `data_collator.py`
+ `preprocess.py`):
    `<cls>` (value pad_value) + non-zero vocab genes with per-cell quantile bins 1..n_bins-1,
    random sub-sample of max_seq_len-1 genes when longer.

Cells are processed in row chunks (CSR), so memory stays bounded by the chunk plus the output.
The output, `TokenizedCells`, stores ragged cells flat (`ids` + `offsets`), like a CSR matrix.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from ctrace.errors import CtraceInputError
from ctrace.io import UNREADABLE_FILE_ERRORS, unreadable, write_npz
from ctrace.models.base import Cell
from ctrace.vocab import GENEFORMER_SPECIALS, SCGPT_SPECIALS, GeneformerDictionaries

logger = logging.getLogger(__name__)

TARGET_SUM = 10_000  # Geneformer's `target_sum`
GENEFORMER_INPUT_SIZE = {"V2": 4096, "V1": 2048}  # tokens per cell, specials included (V2)
DEFAULT_CHUNK_CELLS = 512  # upstream's chunk_size; any value gives identical output

# An Ensembl gene ID with a version suffix (`ENSG00000141510.17`). Only IDs are stripped: clone-based
# symbols such as `AL627309.1` also contain a dot and must be kept whole.
_ENSEMBL_VERSIONED = re.compile(r"^(ENS[A-Z]*[0-9]+)\.[0-9]+$")


# ---------------------------------------------------------------------------------------------------
# Output containers
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedCells:
    """Ragged tokenized cells stored flat: cell i is `ids[offsets[i]:offsets[i+1]]`.

    ids: (n_tokens,) int32, specials included; offsets: (n_cells+1,) int64, offsets[0] == 0;
    values: (n_tokens,) float32 scGPT binned values (same layout as ids) or None (Geneformer);
    obs_names: (n_cells,) str.
    """

    ids: np.ndarray
    offsets: np.ndarray
    values: np.ndarray | None
    obs_names: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        offsets = np.asarray(self.offsets)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != ids.size:
            raise ValueError("offsets must be 1-D, start at 0 and end at len(ids)")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        object.__setattr__(self, "ids", ids.astype(np.int32, copy=False))
        object.__setattr__(self, "offsets", offsets.astype(np.int64, copy=False))
        if self.values is not None:
            values = np.asarray(self.values, dtype=np.float32)
            if values.shape != ids.shape:
                raise ValueError(f"values shape {values.shape} != ids shape {ids.shape}")
            object.__setattr__(self, "values", values)
        obs = np.asarray(self.obs_names).astype(str)
        if obs.shape != (offsets.size - 1,):
            raise ValueError(f"obs_names has shape {obs.shape}, expected ({offsets.size - 1},)")
        object.__setattr__(self, "obs_names", obs)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def lengths(self) -> np.ndarray:
        """Tokens per cell, specials included: (n_cells,) int64."""
        return np.diff(self.offsets)

    def cell(self, i: int) -> Cell:
        """Cell i as the model back-ends take it (int64 ids, float32 values)."""
        i = range(len(self))[i]  # negative indices and bounds, as for a list
        start, stop = self.offsets[i], self.offsets[i + 1]
        values = None if self.values is None else self.values[start:stop].copy()
        return Cell(input_ids=self.ids[start:stop].astype(np.int64), values=values)

    def subset(self, rows) -> TokenizedCells:
        """Cells selected by integer indices (any order, repeats allowed) or a boolean mask."""
        rows = np.asarray(rows)
        if rows.size == 0 and rows.dtype != np.bool_:
            rows = rows.astype(np.int64)  # `[]` arrives as float64
        rows_R = np.arange(len(self))[rows]
        lengths_R = self.lengths()[rows_R]
        offsets = np.zeros(rows_R.size + 1, dtype=np.int64)
        np.cumsum(lengths_R, out=offsets[1:])
        # position t of the new flat array comes from old offset[row] + (t − new offset[row])
        take = np.repeat(self.offsets[rows_R] - offsets[:-1], lengths_R) + np.arange(offsets[-1])
        return TokenizedCells(
            ids=self.ids[take],
            offsets=offsets,
            values=None if self.values is None else self.values[take],
            obs_names=self.obs_names[rows_R],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Atomic uncompressed `.npz` (no pickled objects: obs_names are a unicode array)."""
        arrays = {"ids": self.ids, "offsets": self.offsets, "obs_names": self.obs_names}
        if self.values is not None:
            arrays["values"] = self.values
        write_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenizedCells:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except UNREADABLE_FILE_ERRORS as err:
            raise CtraceInputError(
                f"{path}: cannot read tokenized cells ({unreadable(err)}); re-run the tokenize step"
            ) from None
        missing = {"ids", "offsets", "obs_names"} - set(arrays)
        if missing:
            raise CtraceInputError(
                f"{path}: not a tokenized-cells file (missing {sorted(missing)}); re-run the tokenize step"
            )
        try:
            return cls(arrays["ids"], arrays["offsets"], arrays.get("values"), arrays["obs_names"])
        except ValueError as err:
            raise CtraceInputError(
                f"{path}: inconsistent tokenized cells ({err}); re-run the tokenize step"
            ) from None


@dataclass(frozen=True)
class TokenizeReport:
    """Per-condition tokenization summary (method.md §2). Token counts include specials."""

    n_cells_in: int
    n_cells_kept: int  # cells with ≥1 gene token; the others are dropped, as upstream
    n_genes_in: int  # columns given
    n_genes_matched: int  # columns that map to a model gene token
    pct_genes_matched: float
    median_tokens_per_cell: float
    mean_tokens_per_cell: float
    min_tokens_per_cell: int
    max_tokens_per_cell: int
    n_cells_truncated: int  # cells with more genes than fit (Geneformer: cut; scGPT: sub-sampled)
    tokenizer: str  # "geneformer-V2", "geneformer-V1" or "scgpt"
    seed: int | None = None  # scGPT tie-breaking / sub-sampling seed; None for Geneformer

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Input checks and chunked access
# ---------------------------------------------------------------------------------------------------
def check_raw_counts(counts_CG, source: str) -> None:
    """Raise CtraceInputError unless every value is a finite non-negative integer (raw counts)."""
    matrix = _as_matrix(counts_CG, source)
    for _, chunk in _row_chunks(matrix, DEFAULT_CHUNK_CELLS * 8):
        _check_count_values(chunk.data, source)


def _check_count_values(data: np.ndarray, source: str) -> None:
    """Check the stored values of one chunk (a CSR `.data` array)."""
    if data.size == 0:
        return
    if data.dtype == np.bool_ or np.issubdtype(data.dtype, np.unsignedinteger):
        return
    if np.issubdtype(data.dtype, np.integer):
        bad = data < 0
    else:
        bad = ~np.isfinite(data) | (data < 0) | (data != np.floor(data))
    if bad.any():
        example = data[np.flatnonzero(bad)[0]]
        raise CtraceInputError(
            f"{source}: expected raw integer counts, found {int(bad.sum())} negative, non-finite or "
            f"non-integer value(s) in one block of cells (e.g. {example:g}). Data log-normalised? pass "
            "raw integer counts (layer/.raw), e.g. adata.layers['counts'] or adata.raw.X."
        )


def _as_matrix(counts_CG, source: str) -> sp.csr_matrix | np.ndarray:
    """CSR matrix (any sparse input) or a 2-D numeric ndarray (dense input, sliced per chunk)."""
    if sp.issparse(counts_CG):
        matrix = counts_CG if isinstance(counts_CG, sp.csr_matrix) else sp.csr_matrix(counts_CG)
    else:
        matrix = np.asarray(counts_CG)
    if matrix.ndim != 2:
        raise CtraceInputError(f"{source}: expected a cells × genes matrix, got shape {matrix.shape}")
    if not (np.issubdtype(matrix.dtype, np.number) or matrix.dtype == np.bool_):
        raise CtraceInputError(f"{source}: expected numeric counts, got dtype {matrix.dtype}")
    return matrix


def _row_chunks(matrix, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, CSR block of ≤ chunk_size rows); dense input is converted one block at a time."""
    n = matrix.shape[0]
    for start in range(0, n, chunk_size):
        block = matrix[start : start + chunk_size]
        yield start, block if sp.issparse(block) else sp.csr_matrix(block)


def _check_lengths(matrix, gene_ids, obs_names, gene_field: str) -> tuple[list[str], np.ndarray]:
    n_cells, n_genes = matrix.shape
    genes = [str(g) for g in np.asarray(gene_ids, dtype=object).ravel()]
    if len(genes) != n_genes:
        raise CtraceInputError(
            f"{gene_field}: {len(genes)} gene identifiers given but counts_CG has {n_genes} columns "
            f"(genes); pass the var column of the same AnnData/layer as the counts"
        )
    obs = np.asarray(obs_names).astype(str).ravel()
    if obs.size != n_cells:
        raise CtraceInputError(
            f"obs_names: {obs.size} names given but counts_CG has {n_cells} rows (cells); pass "
            "adata.obs_names of the same AnnData"
        )
    if n_cells == 0:
        raise CtraceInputError("counts_CG: no cells to tokenize (0 rows); check the obs filter")
    return genes, obs


def _no_match_error(genes: Sequence[str], model: str, hint: str) -> CtraceInputError:
    examples = ", ".join(repr(g) for g in genes[:3])
    return CtraceInputError(
        f"gene ids: none of the {len(genes)} genes given matches the {model} vocabulary "
        f"(examples: {examples}). {hint}"
    )


def _report(
    lengths_C: np.ndarray, n_cells_in: int, n_genes_in: int, n_matched: int, n_truncated: int,
    tokenizer: str, seed: int | None,
) -> TokenizeReport:
    return TokenizeReport(
        n_cells_in=int(n_cells_in),
        n_cells_kept=int(lengths_C.size),
        n_genes_in=int(n_genes_in),
        n_genes_matched=int(n_matched),
        pct_genes_matched=float(100.0 * n_matched / n_genes_in) if n_genes_in else 0.0,
        median_tokens_per_cell=float(np.median(lengths_C)),
        mean_tokens_per_cell=float(np.mean(lengths_C)),
        min_tokens_per_cell=int(lengths_C.min()),
        max_tokens_per_cell=int(lengths_C.max()),
        n_cells_truncated=int(n_truncated),
        tokenizer=tokenizer,
        seed=seed,
    )


def _assemble(
    ids_list: list[np.ndarray], values_list: list[np.ndarray] | None, obs_names: np.ndarray,
    kept_rows: list[int], n_cells_in: int, what: str,
) -> TokenizedCells:
    n_dropped = n_cells_in - len(kept_rows)
    if not kept_rows:
        raise CtraceInputError(
            f"counts_CG: none of the {n_cells_in} cells has a non-zero count in a {what} gene; check "
            "that the counts and gene ids belong together and that cells are not empty"
        )
    if n_dropped:
        logger.warning("%d of %d cells have no %s gene with a non-zero count; dropped (as upstream)",
                       n_dropped, n_cells_in, what)
    lengths = np.fromiter((a.size for a in ids_list), dtype=np.int64, count=len(ids_list))
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedCells(
        ids=np.concatenate(ids_list).astype(np.int32, copy=False),
        offsets=offsets,
        values=None if values_list is None else np.concatenate(values_list).astype(np.float32),
        obs_names=obs_names[np.asarray(kept_rows, dtype=np.int64)],
    )


# ---------------------------------------------------------------------------------------------------
# Geneformer
# ---------------------------------------------------------------------------------------------------
def geneformer_gene_map(gene_ids: Sequence[str], dicts: GeneformerDictionaries) -> list[str | None]:
    """Canonical Ensembl ID (a token gene with a median) for each input gene, or None.

    model_formats.md §1.7: Ensembl IDs lose their `.N` version suffix; then exact symbol lookup in
    `gene_name_id`, else the upper-cased key in `ensembl_mapping` restricted to targets in the token
    dict (upstream's mapping; it also collapses alternate Ensembl IDs onto the canonical one).
    """
    usable = {g for g in dicts.token_dict if g in dicts.gene_medians}
    usable.difference_update(GENEFORMER_SPECIALS[dicts.version])
    mapping = dicts.ensembl_mapping
    out: list[str | None] = []
    for raw in gene_ids:
        gene = str(raw).strip()
        versioned = _ENSEMBL_VERSIONED.match(gene)
        if versioned:
            gene = versioned.group(1)
        target = dicts.gene_name_id.get(gene)
        if target not in usable:
            target = mapping.get(gene.upper())
        if target not in usable:
            # token dict keys are canonical IDs; a stripped ID absent from the mapping dict still counts
            target = gene if gene in usable else None
        out.append(target)
    return out


def _geneformer_collapse(canonical_G: list[str | None]) -> tuple[sp.csr_matrix, list[str]]:
    """Column-summing matrix A_GK (0/1) and the K canonical IDs in upstream's column order.

    Upstream (`sum_ensembl_ids`) keeps IDs that occur once in their original column order and appends
    the summed duplicates in order of first appearance; the order only matters for ties in argsort.
    """
    counts = Counter(g for g in canonical_G if g is not None)
    singles = [g for g in canonical_G if g is not None and counts[g] == 1]
    dups = [g for g in dict.fromkeys(canonical_G) if g is not None and counts[g] > 1]
    order_K = singles + dups
    index = {g: k for k, g in enumerate(order_K)}
    rows = [j for j, g in enumerate(canonical_G) if g is not None]
    cols = [index[canonical_G[j]] for j in rows]
    a_GK = sp.csr_matrix(
        (np.ones(len(rows)), (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))),
        shape=(len(canonical_G), len(order_K)),
    )
    return a_GK, order_K


def tokenize_geneformer(
    counts_CG,
    gene_ids: Sequence[str],
    n_counts_C,
    dicts: GeneformerDictionaries,
    obs_names: Sequence[str],
    max_tokens: int | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_CELLS,
) -> tuple[TokenizedCells, TokenizeReport]:
    """Rank-value encoding of raw counts, as Geneformer's `TranscriptomeTokenizer.tokenize_anndata`.

    v_g = count_g / n_counts × 10,000 / median_g (float64, that order); tokens = token[np.argsort(-v)]
    over non-zero v only (numpy's default, unstable argsort, as upstream `rank_genes`, so ties come out
    exactly as upstream for the same column order).
    V2 (dicts.version): `<cls>` + first (max_tokens − 2) genes + `<eos>`, max_tokens default 4096;
    V1: first max_tokens genes (default 2048), no specials.

    counts_CG: cells × genes raw integer counts (scipy sparse or ndarray). gene_ids: Ensembl IDs
    (version suffix allowed) or symbols, one per column; columns mapping to the same canonical ID are
    summed (upstream's collapse). n_counts_C: each cell's total raw count over ALL genes (upstream's
    `obs["n_counts"]`), not only the columns given. Cells without any token gene are dropped.

    Parity notes: upstream's h5ad path divides a scipy sparse matrix, which scipy evaluates as a
    multiplication by reciprocals (last-bit differences); ranks can then differ only between genes
    whose values agree to ~1e-16 (checked: none of pbmc68k's 700 cells differs). Exact ties are
    ordered by numpy's argsort, which, as upstream, depends on numpy's sort kernel for the CPU.
    Symbol mapping tries `gene_name_id` before the mapping dict (§1.7; the two agree on real dicts).
    """
    matrix = _as_matrix(counts_CG, "counts_CG")
    genes, obs = _check_lengths(matrix, gene_ids, obs_names, "gene_ids")
    version = dicts.version
    if max_tokens is None:
        max_tokens = GENEFORMER_INPUT_SIZE[version]
    n_specials = 2 if version == "V2" else 0
    if int(max_tokens) < n_specials + 1:
        raise CtraceInputError(f"max_tokens: must be ≥ {n_specials + 1} for Geneformer {version}")
    n_keep = int(max_tokens) - n_specials

    n_counts_C = np.asarray(n_counts_C, dtype=np.float64).ravel()
    if n_counts_C.size != matrix.shape[0]:
        raise CtraceInputError(
            f"n_counts_C: {n_counts_C.size} values given but counts_CG has {matrix.shape[0]} cells"
        )
    if not np.all(np.isfinite(n_counts_C)) or np.any(n_counts_C < 0):
        raise CtraceInputError("n_counts_C: total counts must be finite and non-negative")

    canonical_G = geneformer_gene_map(genes, dicts)
    n_matched = sum(g is not None for g in canonical_G)
    if n_matched == 0:
        raise _no_match_error(
            genes, f"Geneformer {version}",
            "Pass Ensembl gene IDs (e.g. var['gene_ids'] or var['ensembl_id']) or HGNC symbols "
            "(e.g. var['feature_name']) as the gene column.",
        )
    a_GK, order_K = _geneformer_collapse(canonical_G)
    token_K = np.array([dicts.token_dict[g] for g in order_K], dtype=np.int64)
    median_K = np.array([dicts.gene_medians[g] for g in order_K], dtype=np.float64)
    cls_eos = (dicts.token_dict["<cls>"], dicts.token_dict["<eos>"]) if version == "V2" else None

    ids_list: list[np.ndarray] = []
    kept: list[int] = []
    n_truncated = 0
    for start, block in _row_chunks(matrix, chunk_size):
        _check_count_values(block.data, "counts_CG")
        n_counts = n_counts_C[start : start + block.shape[0]]
        sums = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        low = np.flatnonzero(n_counts < sums * (1 - 1e-9))
        if low.size:
            i = low[0]
            raise CtraceInputError(
                f"n_counts_C: cell {start + i} ({str(obs[start + i])!r}) has n_counts {n_counts[i]:g} but its "
                f"counts in counts_CG sum to {sums[i]:g}; n_counts must be the total raw count over all "
                "genes (e.g. adata.obs['n_counts'] computed on raw counts)"
            )
        collapsed = (block.astype(np.float64) @ a_GK).tocsr()
        collapsed.eliminate_zeros()
        collapsed.sort_indices()  # ascending collapsed column = upstream's order within a cell
        indptr, cols = collapsed.indptr, collapsed.indices
        row_of = np.repeat(np.arange(collapsed.shape[0]), np.diff(indptr))
        value = collapsed.data / n_counts[row_of]
        value = value * TARGET_SUM
        value = value / median_K[cols]
        for r in range(collapsed.shape[0]):
            s, e = indptr[r], indptr[r + 1]
            if s == e:
                continue
            ranked = token_K[cols[s:e]][np.argsort(-value[s:e])]
            if ranked.size > n_keep:
                n_truncated += 1
                ranked = ranked[:n_keep]
            if cls_eos is not None:
                ranked = np.concatenate(([cls_eos[0]], ranked, [cls_eos[1]]))
            ids_list.append(ranked.astype(np.int32))
            kept.append(start + r)

    cells = _assemble(ids_list, None, obs, kept, matrix.shape[0], f"Geneformer {version}")
    report = _report(cells.lengths(), matrix.shape[0], len(genes), n_matched, n_truncated,
                     f"geneformer-{version}", None)
    return cells, report


# ---------------------------------------------------------------------------------------------------
# scGPT
# ---------------------------------------------------------------------------------------------------
def scgpt_bin(values_N: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bins 1..n_bins-1 of one cell's non-zero values, as scGPT's `binning` + `_digitize(side="both")`.

    edges = quantile(x, linspace(0, 1, n_bins-1)); bin = ceil(u·(right − left) + left), u ~ U[0,1),
    left/right = np.digitize(x, edges, right=False/True): a value sitting on tied edges gets a random
    bin between them. x is cast to float32 first, as upstream (its collator holds float32 tensors).
    Difference from upstream: u comes from `rng`, not numpy's global RNG.
    """
    x = np.asarray(values_N, dtype=np.float32)
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    u = rng.random(x.size)
    return np.ceil(u * (right - left) + left).astype(np.int64).astype(np.float32)


def tokenize_scgpt(
    counts_CG,
    gene_symbols: Sequence[str],
    vocab: dict[str, int],
    obs_names: Sequence[str],
    max_seq_len: int = 1200,
    n_bins: int = 51,
    pad_value: float = -2.0,
    seed: int = 0,
    *,
    chunk_size: int = DEFAULT_CHUNK_CELLS,
) -> tuple[TokenizedCells, TokenizeReport]:
    """scGPT zero-shot input (`embed_data` → `DataCollator(do_binning, sampling, keep_first_n_tokens=1)`).

    Per cell: `<cls>` (value pad_value) + its non-zero vocab genes in column order, values = scgpt_bin
    of the raw counts; if 1 + n_genes > max_seq_len, a random max_seq_len − 1 genes are kept in the
    random order of the permutation that picked them (upstream `_sample`: `randperm(n)[:max_len-1]`,
    not sorted), `<cls>` stays first. Binning happens before sub-sampling, over all non-zero genes.
    Genes match by exact symbol; unknown genes are dropped before anything else (upstream would map
    them to `<pad>` if unfiltered); the vocab's specials are never matched as genes. Repeated symbols
    are kept as separate tokens, as upstream. Cells with no matched non-zero gene are dropped.

    Difference from upstream, randomness only: upstream draws tie-breaking from numpy's global RNG and
    the sub-sample from torch's; here both come from `np.random.default_rng([seed, row])` per cell
    (row = index in counts_CG), so output is seeded and independent of chunking and batching.
    """
    matrix = _as_matrix(counts_CG, "counts_CG")
    genes, obs = _check_lengths(matrix, gene_symbols, obs_names, "gene_symbols")
    for name in ("<cls>", "<pad>"):
        if name not in vocab:
            raise CtraceInputError(
                f"vocab: no {name!r} token; load vocab.json with ctrace.vocab.load_scgpt_vocab, which "
                "appends scGPT's special tokens"
            )
    if int(max_seq_len) < 2:
        raise CtraceInputError("max_seq_len: must be ≥ 2 (`<cls>` plus at least one gene)")
    if int(n_bins) < 3:
        raise CtraceInputError("n_bins: must be ≥ 3 (scGPT uses 51)")
    if int(seed) < 0:
        raise CtraceInputError("seed: must be a non-negative integer")
    max_seq_len, n_bins, seed = int(max_seq_len), int(n_bins), int(seed)

    specials = set(SCGPT_SPECIALS)
    id_G = np.array([vocab[g] if g in vocab and g not in specials else -1 for g in genes], dtype=np.int64)
    matched_cols = np.flatnonzero(id_G >= 0)
    if matched_cols.size == 0:
        raise _no_match_error(
            genes, "scGPT",
            "scGPT matches exact gene symbols (e.g. 'GAPDH'); pass the var column holding symbols "
            "(e.g. var['feature_name'] or var_names) as the gene column.",
        )
    token_M = id_G[matched_cols]
    cls_id = int(vocab["<cls>"])
    head_value = np.array([pad_value], dtype=np.float32)

    ids_list: list[np.ndarray] = []
    values_list: list[np.ndarray] = []
    kept: list[int] = []
    n_truncated = 0
    for start, block in _row_chunks(matrix, chunk_size):
        _check_count_values(block.data, "counts_CG")
        sub = block[:, matched_cols].tocsr()  # unknown genes gone before anything else
        sub.eliminate_zeros()
        sub.sort_indices()  # genes in column order, as upstream's np.nonzero(row)
        indptr, cols, data = sub.indptr, sub.indices, sub.data
        for r in range(sub.shape[0]):
            s, e = indptr[r], indptr[r + 1]
            if s == e:
                continue
            rng = np.random.default_rng([seed, start + r])
            tokens = token_M[cols[s:e]]
            bins = scgpt_bin(data[s:e], n_bins, rng)
            if tokens.size + 1 > max_seq_len:
                n_truncated += 1
                pick = rng.permutation(tokens.size)[: max_seq_len - 1]
                tokens, bins = tokens[pick], bins[pick]
            ids_list.append(np.concatenate(([cls_id], tokens)).astype(np.int32))
            values_list.append(np.concatenate((head_value, bins)))
            kept.append(start + r)

    cells = _assemble(ids_list, values_list, obs, kept, matrix.shape[0], "scGPT vocabulary")
    report = _report(cells.lengths(), matrix.shape[0], len(genes), int(matched_cols.size), n_truncated,
                     "scgpt", seed)
    return cells, report
