"""Condition inputs: raw-count AnnData, obs filter, and the seeded SAE/trace cell split (method.md §1).

The embedded demo is scanpy's bundled `pbmc68k_reduced` (no network) with integer counts rebuilt as
round(expm1(raw.X) · n_counts / 1e4) — the inverse of the normalise-total + log1p it was stored with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ctrace.errors import CtraceInputError
from ctrace.tokenize import check_raw_counts

@dataclass(frozen=True)
class ConditionData:
    """Raw counts of the selected cells of one condition.

    counts_CG: CSR float64 of integer counts; n_counts_C: total counts per cell over all genes.
    """

    counts_CG: sp.csr_matrix
    gene_ids: np.ndarray
    n_counts_C: np.ndarray
    obs_names: np.ndarray
    obs: pd.DataFrame


def demo_anndata():
    """pbmc68k_reduced with integer counts in X and Ensembl ids in var['ensembl_id'] (where known)."""
    import anndata as ad
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    n_counts = reduced.obs["n_counts"].to_numpy(dtype=np.float64)
    log_norm = reduced.raw.X.toarray() if sp.issparse(reduced.raw.X) else np.asarray(reduced.raw.X)
    counts = np.round(np.expm1(log_norm.astype(np.float64)) * n_counts[:, None] / 1e4)
    var = pd.DataFrame(index=reduced.raw.var_names.astype(str))
    ids = demo_gene_ids()
    var["ensembl_id"] = [ids.get(symbol, "") for symbol in var.index]
    obs = reduced.obs[["bulk_labels", "louvain", "n_genes", "percent_mito"]].copy()
    obs["n_counts"] = counts.sum(axis=1)
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


def demo_gene_ids() -> dict[str, str]:
    """Symbol → Ensembl id of the demo genes (GENCODE v44, shipped in ctrace/data)."""
    table = resources.files("ctrace") / "data" / "pbmc68k_gene_ids.tsv"
    with resources.as_file(table) as path:
        frame = pd.read_csv(path, sep="\t")
    return dict(zip(frame["symbol"], frame["ensembl_id"]))


def open_h5ad(path: Path, where: str):
    """A condition's `.h5ad` in backed mode (close with `.file.close()`); unreadable files and duplicate
    obs names (cells are selected by name) are refused."""
    import anndata as ad

    if not path.is_file():
        raise CtraceInputError(f"{where}.h5ad: file {path} not found")
    try:
        adata = ad.read_h5ad(path, backed="r")
    except (OSError, ValueError, KeyError) as err:
        raise CtraceInputError(
            f"{where}.h5ad: {path} cannot be read as an AnnData .h5ad ({type(err).__name__}: {err}); "
            "point it at a file written by anndata (adata.write_h5ad)"
        ) from None
    if not adata.obs_names.is_unique:
        duplicated = list(adata.obs_names[adata.obs_names.duplicated()].unique()[:3])
        adata.file.close()
        raise CtraceInputError(
            f"{where}.h5ad: {path} has duplicate obs names (e.g. {duplicated}); cells are selected by name, so "
            "make them unique (adata.obs_names_make_unique()) and save the file again"
        )
    return adata


def load_condition(
    h5ad: str | os.PathLike,
    *,
    counts: str = "X",
    gene_column: str = "index",
    obs_filter: str | None = None,
    n_counts_column: str | None = None,
    cells: np.ndarray | None = None,
    where: str = "condition",
) -> ConditionData:
    """Read the cells of one condition from an `.h5ad` (backed mode: only the selected rows load).

    counts: "X", "raw" (`.raw.X`) or a layer name. gene_column: a `var` column or "index".
    cells: obs names to keep, in this order (after the filter). `where` names the config block in errors.
    """
    path = Path(h5ad)
    adata = open_h5ad(path, where)
    try:
        obs = adata.obs
        mask = np.ones(adata.n_obs, dtype=bool)
        if obs_filter:
            mask = select_obs(obs, obs_filter, where=f"{where}.obs_filter ({path})")
        if cells is not None:
            position = pd.Series(np.arange(adata.n_obs), index=obs.index.astype(str))
            missing = [c for c in cells if c not in position.index]
            if missing:
                raise CtraceInputError(f"{path}: {len(missing)} selected cells not found, e.g. {missing[:3]}")
            rows = position.loc[list(cells)].to_numpy()
            if not mask[rows].all():
                raise CtraceInputError(f"{path}: selected cells do not pass {where}.obs_filter")
        else:
            rows = np.flatnonzero(mask)
        matrix, var = _counts_matrix(adata, counts, rows, path, where)
        gene_ids = _gene_ids(var, gene_column, path, where)
        check_raw_counts(matrix, f"{path} ({where}.counts = {counts!r})")
        sub_obs = obs.iloc[rows].copy()
        if n_counts_column:
            if n_counts_column not in sub_obs.columns:
                raise CtraceInputError(
                    f"{where}.n_counts_column: obs column {n_counts_column!r} not in {path}; "
                    f"available: {list(sub_obs.columns)[:10]}"
                )
            n_counts = pd.to_numeric(sub_obs[n_counts_column], errors="coerce").to_numpy(dtype=np.float64)
            if not np.isfinite(n_counts).all():
                raise CtraceInputError(
                    f"{where}.n_counts_column: obs column {n_counts_column!r} of {path} is not numeric for every "
                    "selected cell; it must hold each cell's total counts (or set n_counts_column: null)"
                )
        else:
            n_counts = np.asarray(matrix.sum(axis=1)).ravel()
        return ConditionData(
            counts_CG=matrix,
            gene_ids=gene_ids,
            n_counts_C=n_counts,
            obs_names=sub_obs.index.astype(str).to_numpy(),
            obs=sub_obs,
        )
    finally:
        if adata.isbacked:
            adata.file.close()


def select_obs(obs: pd.DataFrame, expression: str, where: str) -> np.ndarray:
    """Boolean mask of the cells that satisfy a pandas `query` expression."""
    try:
        selected = obs.reset_index(drop=True).query(expression, engine="python").index.to_numpy()
    except Exception as err:  # pandas raises many types for a bad expression
        raise CtraceInputError(
            f"{where}: cannot evaluate {expression!r} ({type(err).__name__}: {err}); obs columns are "
            f"{list(obs.columns)}"
        ) from None
    mask = np.zeros(len(obs), dtype=bool)
    mask[selected] = True
    if not mask.any():
        hint = ""
        for column in obs.columns:
            if column in expression and isinstance(obs[column].dtype, pd.CategoricalDtype | object):
                values = pd.unique(obs[column].astype(str))[:8]
                hint = f"; values of {column!r} include {list(values)}"
                break
        raise CtraceInputError(f"{where}: {expression!r} selects no cell{hint}")
    return mask


def _counts_matrix(adata, counts: str, rows: np.ndarray, path: Path, where: str):
    if counts == "X":
        try:
            x = adata.X
        except KeyError:  # a backed file without an X dataset
            x = None
        if x is None:
            raise CtraceInputError(
                f"{where}.counts: {path} has no X matrix; use a layer name (layers: {list(adata.layers.keys())}) "
                "or 'raw'"
            )
        matrix, var = _rows(x, rows), adata.var
    elif counts == "raw":
        if adata.raw is None:
            raise CtraceInputError(f"{where}.counts: {path} has no .raw; use 'X' or a layer name")
        matrix, var = _rows(adata.raw.X, rows), adata.raw.var
    else:
        if counts not in adata.layers.keys():
            raise CtraceInputError(
                f"{where}.counts: layer {counts!r} not in {path}; layers: {list(adata.layers.keys())}, "
                "or use 'X' / 'raw'"
            )
        matrix, var = _rows(adata.layers[counts], rows), adata.var
    return sp.csr_matrix(matrix, dtype=np.float64), var


def _rows(matrix, rows: np.ndarray):
    # backed h5ad datasets want increasing indices; restore the requested order afterwards
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    block = matrix[sorted_rows]
    if hasattr(block, "to_memory"):
        block = block.to_memory()
    block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return block[inverse]


def _gene_ids(var: pd.DataFrame, gene_column: str, path: Path, where: str) -> np.ndarray:
    if gene_column == "index":
        return var.index.astype(str).to_numpy()
    if gene_column not in var.columns:
        raise CtraceInputError(
            f"{where}.gene_column: var column {gene_column!r} not in {path}; available columns: "
            f"{list(var.columns)} (or 'index' for var_names)"
        )
    return var[gene_column].astype(str).to_numpy()


def split_cells(
    obs_names: np.ndarray,
    n_trace: int,
    n_sae: int | None,
    seed: int,
    where: str = "condition",
    sae_includes_traced: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (trace, sae) cell sets from one seeded permutation of the cells.

    Default: disjoint; trace = its first n_trace cells, sae = the next n_sae (None = all the rest).
    sae_includes_traced: sae = its first n_sae cells (None = all cells): the traced cells come first, so
    they are SAE training cells too (when n_sae ≥ n_trace) and the SAE codes of traced cells are in-sample.
    """
    n = len(obs_names)
    if n_trace > n:
        raise CtraceInputError(f"{where}.trace_cells = {n_trace} but only {n} cells pass the filter")
    order = np.random.default_rng(seed).permutation(n)
    trace = order[:n_trace]
    pool = order if sae_includes_traced else order[n_trace:]
    if n_sae is not None and n_sae > len(pool):
        left = f"{len(pool)} cells " + ("pass the filter" if sae_includes_traced else f"are left after {n_trace} traced cells")
        raise CtraceInputError(f"{where}.sae_cells = {n_sae} but only {left}")
    sae = pool if n_sae is None else pool[:n_sae]
    return obs_names[np.sort(trace)], obs_names[np.sort(sae)]
