"""Gene-level validation of traced edges (method.md §8.5).

Gene pairs. Every edge (source feature f → target feature g, paired Cohen's d) is expanded into gene pairs
(source gene, target gene) = f's top genes × g's top genes (self pairs, source gene == target gene, are
dropped: knocking a gene down lowers its own expression trivially).

SIGN CONVENTION (the one thing to remember). d is the effect on the target of ABLATING the source.
  d < 0  ablating the source lowers the target ⇒ the source supports it ⇒ knocking the source GENE down is
         predicted to LOWER the target gene: predicted log-fold-change sign −1, TF mode "Activation".
  d > 0  ablating the source raises the target ⇒ predicted LFC sign +1, TF mode "Repression".
So the predicted LFC sign of a gene pair is simply sign(d); `sign` in the pair table is that predicted LFC
sign. (The reference calls d < 0 edges "inhibitory"; as a gene-level prediction they are activating.)

When several edges give the same gene pair, their signed weights are summed: score = Σ_e sign(d_e)·w_e,
the pair's `sign` = sign(score) and `weight` = |score| (pairs whose votes cancel exactly are dropped).
Edge weights w_e: "abs_d" = |d_e| (default), "uniform" = 1, "abs_d_rank" = |d_e| / ((i+1)(j+1)) for the
i-th source gene and j-th target gene in the features' ranked lists (the reference's rank weighting).

(a) Perturbation tables: pseudobulk expression per knocked-down gene, in the layout of Replogle et al.
2022's bulk files (figshare 20029387, e.g. `K562_essential_normalized_bulk_01.h5ad`):
  obs  one row per perturbation (guide/TSS); index `gene_transcript` = "<id>_<GENE>_<guide>_<ENSG…>",
       non-targeting controls "<id>_non-targeting_non-targeting_non-targeting"; a `gene` column (knocked-
       down gene symbol, as in the single-cell files) is used instead when present; optional `cell_line`;
       optional `num_cells_filtered` (weights the control mean in raw mode).
  var  measured genes, index Ensembl gene id, column `gene_name` (symbol).
  X    either already relative to control (the "normalized" files: z-scores against non-targeting
       controls; or log-fold-changes) — used as is; or raw pseudobulk (the "raw" files: mean UMI per cell,
       non-negative) — then each row is scaled to 10,000 total, and LFC = log2((x + pc) / (c + pc)) with
       c the (cell-number weighted) mean of the control rows of the same cell line.
  Rows of the same knocked-down gene (several guides/TSSs) are averaged; duplicate measured-gene symbols
  are averaged; control rows are then dropped. Several cell lines: a `cell_line` obs column, or one file
  per cell line (cell line = `cell_line=` argument, else the first "_"-token of the file name).
Directional accuracy is the fraction of tested pairs whose observed LFC sign equals the predicted sign,
with the sign-imbalance baseline P₊ᵖʳᵉᵈ·P₊ᵒᵇˢ + P₋ᵖʳᵉᵈ·P₋ᵒᵇˢ: the accuracy expected if predicted and
observed signs were independent with those frequencies (50 % only when either is balanced).

(b) TF → target tables (TRRUST raw layout: no header; TF, target, mode Activation/Repression/Unknown,
PMIDs separated by ';'). Precision of the predicted mode over gene pairs that TRRUST lists with one known
mode, against the same pairs with predicted signs shuffled among them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ctrace.coherence import empirical_p
from ctrace.errors import CtraceInputError

NodeKey = tuple[int, int]

REPLOGLE_LAYOUT = (
    "expected the layout of Replogle et al. 2022's bulk .h5ad files: obs = one row per perturbation with the "
    "knocked-down gene in an obs column 'gene' or in the obs index '<id>_<GENE>_<guide>_<ENSG id>' "
    "(controls '<id>_non-targeting_non-targeting_non-targeting'), var = measured genes with a 'gene_name' "
    "column, X = z-scores / log-fold-changes vs control, or raw pseudobulk with control rows"
)


# ───────────────────────────────────────── perturbation table ─────────────────────────────────────────


@dataclass
class PerturbationTable:
    """Observed expression changes per knocked-down gene, per cell line.

    lfc          cell line → DataFrame (index: knocked-down gene symbol, columns: measured gene symbol),
                 float32, NaN where unmeasured. Positive = higher than control.
    value_kind   cell line → "as_is" (X was already relative to control: z-score or LFC) or
                 "log2_ratio_to_control" (computed here from raw pseudobulk)
    n_controls   cell line → number of control rows found
    sources      cell line → file it came from
    n_unparsed   rows dropped because no knocked-down gene could be read from them
    """

    lfc: dict[str, pd.DataFrame]
    value_kind: dict[str, str]
    n_controls: dict[str, int]
    sources: dict[str, str]
    n_unparsed: int = 0

    @property
    def cell_lines(self) -> list[str]:
        return list(self.lfc)

    def lookup(self, cell_line: str, source_genes, target_genes) -> np.ndarray:
        """Observed values for (knocked-down gene, measured gene) pairs; NaN where absent."""
        frame = self.lfc[cell_line]
        r = _gene_indexer(frame.index, pd.Series(source_genes))
        c = _gene_indexer(frame.columns, pd.Series(target_genes))
        out = np.full(len(r), np.nan, dtype=np.float64)
        ok = (r >= 0) & (c >= 0)
        out[ok] = frame.to_numpy()[r[ok], c[ok]]
        return out


def _parse_replogle_index(labels: np.ndarray, control_label: str) -> np.ndarray:
    """'<id>_<GENE>_<guide>_<ENSG…>' → GENE (None when the label does not have that shape)."""
    out = np.empty(len(labels), dtype=object)
    for i, label in enumerate(labels):
        parts = str(label).split("_")
        if len(parts) >= 4 and parts[0].isdigit():
            gene = "_".join(parts[1:-2])
            out[i] = gene if gene else None
        else:
            out[i] = None
    return out


def _resolve_genes(adata, path: Path, gene_column: str | None) -> np.ndarray:
    var = adata.var
    if gene_column == "auto":
        if "gene_name" in var.columns:
            gene_column = "gene_name"
        elif not pd.Index(var.index.astype(str)).str.match(r"^ENS[A-Z]*G\d").mean() > 0.5:
            gene_column = None
        else:
            raise CtraceInputError(
                f"{path}: var has no 'gene_name' column and its index holds Ensembl ids "
                f"(e.g. {var.index[0]!r}); {REPLOGLE_LAYOUT}. Fix: add var['gene_name'] with gene symbols, "
                "or pass gene_column=<the var column holding symbols>."
            )
    if gene_column is None:
        return var.index.astype(str).to_numpy(dtype=object)
    if gene_column not in var.columns:
        raise CtraceInputError(
            f"{path}: var has no column {gene_column!r} (var columns: {list(var.columns)[:12]}); "
            f"{REPLOGLE_LAYOUT}. Fix: pass gene_column=<the var column holding gene symbols>, or None for "
            "the var index."
        )
    return var[gene_column].astype(str).to_numpy(dtype=object)


def _resolve_perturbations(adata, path: Path, perturbation_column: str | None, control_label: str):
    obs = adata.obs
    if perturbation_column is not None:
        if perturbation_column not in obs.columns:
            raise CtraceInputError(
                f"{path}: obs has no column {perturbation_column!r} (obs columns: {list(obs.columns)[:15]}); "
                f"{REPLOGLE_LAYOUT}."
            )
        labels = obs[perturbation_column].astype(object).to_numpy()
        return np.array([None if (v is None or v != v) else str(v) for v in labels], dtype=object)
    if "gene" in obs.columns:
        labels = obs["gene"].astype(object).to_numpy()
        return np.array([None if (v is None or v != v) else str(v) for v in labels], dtype=object)
    genes = _parse_replogle_index(obs.index.to_numpy(), control_label)
    n_ok = sum(g is not None for g in genes)
    if n_ok == 0:
        raise CtraceInputError(
            f"{path}: cannot tell which gene each obs row knocks down: no obs column 'gene' and the obs "
            f"index (e.g. {str(obs.index[0])!r}) is not '<id>_<GENE>_<guide>_<ENSG id>'; {REPLOGLE_LAYOUT}. "
            "Fix: add obs['gene'] with the knocked-down gene symbol (and "
            f"'{control_label}' for controls), or pass perturbation_column=<obs column>."
        )
    return genes


def _cell_line_name(path: Path, cell_line: str | Mapping[str, str] | None) -> str | None:
    if isinstance(cell_line, str):
        return cell_line
    if isinstance(cell_line, Mapping):
        for key in (str(path), path.name, path.stem):
            if key in cell_line:
                return str(cell_line[key])
        return None
    return None


def _dense(x) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float32)


def _load_one(
    path: Path,
    values: str,
    cell_line: str | Mapping[str, str] | None,
    perturbation_column: str | None,
    gene_column: str | None,
    control_label: str,
    pseudocount: float,
) -> tuple[dict[str, pd.DataFrame], dict[str, str], dict[str, int], int]:
    import anndata

    if not path.is_file():
        raise CtraceInputError(f"{path}: perturbation table not found; {REPLOGLE_LAYOUT}")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
        raise CtraceInputError(f"{path}: cannot read as an AnnData .h5ad file ({err}); {REPLOGLE_LAYOUT}") from None
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CtraceInputError(f"{path}: empty AnnData ({adata.n_obs} obs × {adata.n_vars} var)")
    genes = _resolve_genes(adata, path, gene_column)
    labels = _resolve_perturbations(adata, path, perturbation_column, control_label)
    n_unparsed = int(sum(g is None for g in labels))
    is_control = np.array([g is not None and g.lower() == control_label.lower() for g in labels])
    X = _dense(adata.X)

    with np.errstate(invalid="ignore"):
        x_min = float(np.nanmin(X)) if np.isfinite(X).any() else float("nan")
    kind = values
    if kind == "auto":
        kind = "lfc" if x_min < 0 else "raw"
    if kind == "raw" and x_min < 0:
        raise CtraceInputError(
            f"{path}: values='raw' but X has negative entries (min {x_min:.3g}), so it is not raw "
            "pseudobulk. Fix: use values='lfc' (X already relative to control) or 'auto'."
        )

    name = _cell_line_name(path, cell_line)
    if name is not None:
        groups = {name: np.ones(adata.n_obs, dtype=bool)}
    elif "cell_line" in adata.obs.columns:
        col = adata.obs["cell_line"].astype(str).to_numpy()
        groups = {c: col == c for c in pd.unique(col)}
    else:
        groups = {path.name.split("_")[0].split(".")[0]: np.ones(adata.n_obs, dtype=bool)}

    weights = None
    if "num_cells_filtered" in adata.obs.columns:
        weights = pd.to_numeric(adata.obs["num_cells_filtered"], errors="coerce").to_numpy(np.float64)
        if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            weights = None

    out, kinds, n_ctrl = {}, {}, {}
    for line, mask in groups.items():
        ctrl = mask & is_control
        n_ctrl[line] = int(ctrl.sum())
        block = X[mask]
        if kind == "raw":
            if not ctrl.any():
                raise CtraceInputError(
                    f"{path}: X looks like raw pseudobulk (no negative values) but cell line {line!r} has no "
                    f"control rows (knocked-down gene '{control_label}') to compute log-fold-changes "
                    "against. Fix: use a file with non-targeting control rows, pass control_label=<the "
                    "control label>, or values='lfc' if X already is relative to control."
                )
            totals = np.nansum(block, axis=1, dtype=np.float64)
            if np.any(totals <= 0):
                raise CtraceInputError(f"{path}: raw pseudobulk rows with zero total expression in {line!r}")
            scaled = block / (totals[:, None] / 1e4).astype(np.float32)  # per 10,000, float32
            ctrl_in_block = ctrl[mask]
            w = weights[ctrl] if weights is not None else np.ones(int(ctrl.sum()))
            c_mean = np.average(np.nan_to_num(scaled[ctrl_in_block]).astype(np.float64), axis=0, weights=w)
            with np.errstate(divide="ignore", invalid="ignore"):
                block = np.log2((scaled + pseudocount) / (c_mean + pseudocount)).astype(np.float32)
            kinds[line] = "log2_ratio_to_control"
        else:
            kinds[line] = "as_is"
        keep = np.array([g is not None for g in labels[mask]]) & ~is_control[mask]
        frame = pd.DataFrame(block[keep], columns=pd.Index(genes, name="measured_gene"))
        frame.index = pd.Index(labels[mask][keep].astype(str), name="perturbed_gene")
        if frame.columns.has_duplicates:
            frame = frame.T.groupby(level=0, sort=False).mean().T
        if frame.index.has_duplicates:
            frame = frame.groupby(level=0, sort=False).mean()
        out[line] = frame.astype(np.float32)
    return out, kinds, n_ctrl, n_unparsed


def load_perturbation_table(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    values: str = "auto",
    cell_line: str | Mapping[str, str] | None = None,
    perturbation_column: str | None = None,
    gene_column: str | None = "auto",
    control_label: str = "non-targeting",
    pseudocount: float = 0.1,
) -> PerturbationTable:
    """Read one or several Replogle-layout pseudobulk `.h5ad` files (see the module docstring).

    values              "auto" (X with negative values = already relative to control; otherwise raw
                        pseudobulk), "lfc" (use X as is) or "raw" (compute log2 ratio to control mean)
    cell_line           name for a single file, or {file path/name/stem: name}; default: obs 'cell_line'
                        column, else the file name's first "_"-token ("K562_essential_…" → "K562")
    perturbation_column obs column with the knocked-down gene (default: 'gene', else parse the obs index)
    gene_column         var column with measured-gene symbols ("auto": 'gene_name', else the var index when
                        it is not Ensembl ids; None: the var index)
    pseudocount         added to library-size-scaled values (per 10,000) before the log ratio (raw mode)
    """
    if values not in ("auto", "lfc", "raw"):
        raise CtraceInputError(f"load_perturbation_table: values must be 'auto', 'lfc' or 'raw', got {values!r}")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise CtraceInputError("load_perturbation_table: no file given")
    table = PerturbationTable({}, {}, {}, {}, 0)
    for p in paths:
        p = Path(p)
        frames, kinds, n_ctrl, n_unparsed = _load_one(
            p, values, cell_line, perturbation_column, gene_column, control_label, pseudocount
        )
        for line, frame in frames.items():
            if line in table.lfc:
                raise CtraceInputError(
                    f"{p}: cell line {line!r} was already read from {table.sources[line]}; name the cell line "
                    "of each file explicitly, e.g. cell_line={'K562_gwps_normalized_bulk_01.h5ad': "
                    "'K562_gwps', …}"
                )
            if frame.empty:
                raise CtraceInputError(f"{p}: cell line {line!r} has no perturbation rows besides controls")
            table.lfc[line] = frame
            table.value_kind[line] = kinds[line]
            table.n_controls[line] = n_ctrl[line]
            table.sources[line] = str(p)
        table.n_unparsed += n_unparsed
    return table


# ───────────────────────────────────────── gene pairs ─────────────────────────────────────────


def _top_genes_map(obj, what: str) -> dict[NodeKey, list[str]]:
    if isinstance(obj, pd.DataFrame):
        missing = [c for c in ("layer", "feature", "top_genes") if c not in obj.columns]
        if missing:
            raise CtraceInputError(
                f"{what}: missing column(s) {missing}; expected the feature annotation's features table "
                "(layer, feature, top_genes: list of gene symbols, …)"
            )
        items = zip(zip(obj["layer"], obj["feature"]), obj["top_genes"])
    elif isinstance(obj, Mapping):
        items = obj.items()
    else:
        raise CtraceInputError(
            f"{what}: expected a features DataFrame (layer, feature, top_genes) or a mapping "
            f"(layer, feature) → list of genes, got {type(obj).__name__}"
        )
    out: dict[NodeKey, list[str]] = {}
    for (layer, feature), genes in items:
        if genes is None or (isinstance(genes, float) and genes != genes):
            continue
        if isinstance(genes, str):
            raise CtraceInputError(
                f"{what}: top_genes of feature ({layer}, {feature}) is a string ({genes[:40]!r}…), expected a "
                "list of gene symbols"
            )
        out[(int(layer), int(feature))] = [str(g) for g in genes]
    return out


def gene_pairs_from_edges(
    edges: pd.DataFrame,
    features_top_genes_src,
    features_top_genes_tgt=None,
    weight: str = "abs_d",
    n_top_genes: int | None = None,
) -> pd.DataFrame:
    """Signed, weighted gene pairs predicted by the edges (convention in the module docstring).

    `features_top_genes_src` / `_tgt`: the features table (layer, feature, top_genes) of the model whose
    features are the edge sources / targets (the same table for one model; `_tgt` defaults to `_src`),
    or a mapping (layer, feature) → ranked gene list. `n_top_genes` truncates each list (None: all).
    Returns DataFrame(source_gene, target_gene, sign, weight, n_edges, n_opposite), strongest first
    (gene columns are pandas categoricals: millions of pairs share a few thousand genes);
    `sign` = predicted sign of the target gene's LFC when the source gene is knocked down (= sign of the
    summed d votes), `n_opposite` = contributing edges whose d has the other sign.
    """
    if weight not in ("abs_d", "uniform", "abs_d_rank"):
        raise CtraceInputError(f"gene_pairs_from_edges: weight must be 'abs_d', 'uniform' or 'abs_d_rank', got {weight!r}")
    from ctrace.coherence import _check_edges

    _check_edges(edges)
    if "cohens_d" not in edges.columns:
        raise CtraceInputError("edge table: missing column 'cohens_d' (the signed effect size of each edge)")
    src_map = _top_genes_map(features_top_genes_src, "source features table")
    tgt_map = src_map if features_top_genes_tgt is None else _top_genes_map(features_top_genes_tgt, "target features table")
    columns = ["source_gene", "target_gene", "sign", "weight", "n_edges", "n_opposite"]
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
        columns, [object, object, np.int8, np.float64, np.int64, np.int64])})
    vocab: dict[str, int] = {}

    def gene_matrix(mapping: dict[NodeKey, list[str]]) -> tuple[pd.MultiIndex, np.ndarray]:
        keys = list(mapping)
        lists = [mapping[k][:n_top_genes] if n_top_genes is not None else mapping[k] for k in keys]
        width = max((len(g) for g in lists), default=0)
        mat = np.full((len(keys), max(width, 1)), -1, dtype=np.int64)
        for i, genes in enumerate(lists):
            mat[i, : len(genes)] = [vocab.setdefault(g, len(vocab)) for g in genes]
        index = pd.MultiIndex.from_tuples(keys) if keys else None
        return index, mat

    src_index, src_mat = gene_matrix(src_map)
    tgt_index, tgt_mat = gene_matrix(tgt_map)
    if len(edges) == 0:
        return empty
    d = pd.to_numeric(edges["cohens_d"], errors="coerce").to_numpy(np.float64)
    no_index = np.full(len(edges), -1)
    si = no_index if src_index is None else src_index.get_indexer(pd.MultiIndex.from_arrays(
        [edges["source_layer"].to_numpy(np.int64), edges["source_feature"].to_numpy(np.int64)]))
    ti = no_index if tgt_index is None else tgt_index.get_indexer(pd.MultiIndex.from_arrays(
        [edges["target_layer"].to_numpy(np.int64), edges["target_feature"].to_numpy(np.int64)]))
    if not ((si >= 0) & (ti >= 0)).any():
        # features without top genes are skipped one by one; none matching means another model's or SAE set's table
        edge_layers = sorted(set(edges["source_layer"].astype(int)) | set(edges["target_layer"].astype(int)))
        table_layers = sorted({layer for layer, _ in src_map} | {layer for layer, _ in tgt_map})
        raise CtraceInputError(
            f"edge table: none of its {len(edges)} edges has both features in the features table (edge layers "
            f"{edge_layers}, features with top genes at layers {table_layers}); pass the annotate output of the "
            "edges' model and SAE set"
        )
    ok = (si >= 0) & (ti >= 0) & np.isfinite(d) & (d != 0)
    si, ti, d = si[ok], ti[ok], d[ok]
    n_genes = np.int64(max(len(vocab), 1))
    ls, lt = src_mat.shape[1], tgt_mat.shape[1]
    if weight == "abs_d_rank":
        rank_w = 1.0 / np.outer(np.arange(1, ls + 1), np.arange(1, lt + 1))
    else:
        rank_w = np.ones((ls, lt))

    def reduce(codes, score, pos, neg):
        uniq, inverse = np.unique(codes, return_inverse=True)
        return (uniq, np.bincount(inverse, score, len(uniq)), np.bincount(inverse, pos, len(uniq)),
                np.bincount(inverse, neg, len(uniq)))

    parts = []
    chunk = max(1, 4_000_000 // (ls * lt))
    for start in range(0, len(d), chunk):
        sg = src_mat[si[start : start + chunk]][:, :, None]
        tg = tgt_mat[ti[start : start + chunk]][:, None, :]
        dd = d[start : start + chunk][:, None, None]
        valid = (sg >= 0) & (tg >= 0) & (sg != tg)
        base = np.abs(dd) if weight in ("abs_d", "abs_d_rank") else np.ones_like(dd)
        signed = np.broadcast_to(np.sign(dd) * base * rank_w[None], valid.shape)[valid]
        codes = (sg * n_genes + tg)[valid]
        pos = np.broadcast_to(dd > 0, valid.shape)[valid].astype(np.float64)
        parts.append(reduce(codes, signed, pos, 1.0 - pos))
    if not parts:
        return empty
    if len(parts) == 1:
        codes, score, pos, neg = parts[0]
    else:
        codes, score, pos, neg = reduce(*(np.concatenate(x) for x in zip(*parts)))
    keep = score != 0
    codes, score, pos, neg = codes[keep], score[keep], pos[keep], neg[keep]
    order = np.lexsort((codes, -np.abs(score)))  # strongest first; ties in a fixed order
    codes, score, pos, neg = codes[order], score[order], pos[order], neg[order]
    names = pd.Index(list(vocab), dtype=object)
    sign = np.where(score > 0, 1, -1).astype(np.int8)
    return pd.DataFrame({
        "source_gene": pd.Categorical.from_codes(codes // n_genes, categories=names),
        "target_gene": pd.Categorical.from_codes(codes % n_genes, categories=names),
        "sign": sign,
        "weight": np.abs(score),
        "n_edges": np.rint(pos + neg).astype(np.int64),
        "n_opposite": np.rint(np.where(sign > 0, neg, pos)).astype(np.int64),
    })


def _gene_indexer(index: pd.Index, genes: pd.Series) -> np.ndarray:
    """Positions of `genes` in `index` (-1 when absent); fast for categorical columns."""
    if isinstance(genes.dtype, pd.CategoricalDtype):
        cat_pos = index.get_indexer(genes.cat.categories.astype(str))
        codes = genes.cat.codes.to_numpy()
        return np.where(codes >= 0, cat_pos[np.maximum(codes, 0)], -1) if len(cat_pos) else np.full(len(codes), -1)
    return index.get_indexer(pd.Index(genes.astype(str).to_numpy(object)))


def _check_pairs(pairs: pd.DataFrame) -> tuple[pd.Series, pd.Series, np.ndarray, np.ndarray]:
    if not isinstance(pairs, pd.DataFrame):
        raise CtraceInputError(f"gene pairs: expected a DataFrame, got {type(pairs).__name__}")
    missing = [c for c in ("source_gene", "target_gene", "sign") if c not in pairs.columns]
    if missing:
        raise CtraceInputError(
            f"gene pairs: missing column(s) {missing}; expected gene_pairs_from_edges() output "
            "(source_gene, target_gene, sign ±1, weight)"
        )
    sign = pd.to_numeric(pairs["sign"], errors="coerce").to_numpy(np.float64)
    if not np.all(np.isin(sign, (-1.0, 1.0))):
        raise CtraceInputError("gene pairs: column 'sign' must hold only +1 / -1 (predicted LFC sign)")
    w = (pd.to_numeric(pairs["weight"], errors="coerce").to_numpy(np.float64)
         if "weight" in pairs.columns else np.ones(len(pairs)))
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise CtraceInputError("gene pairs: column 'weight' must be finite and ≥ 0")
    return pairs["source_gene"].reset_index(drop=True), pairs["target_gene"].reset_index(drop=True), sign, w


# ───────────────────────────────────────── directional accuracy ─────────────────────────────────────────


@dataclass
class DirectionalAccuracy:
    """Predicted vs observed LFC sign for one cell line.

    n_pairs              gene pairs given
    n_tested             pairs whose source gene was knocked down and target gene measured, with
                         |observed| > min_abs_lfc
    n_below_threshold    pairs found but with |observed| ≤ min_abs_lfc (excluded; exact zeros always are)
    n_source_genes       distinct knocked-down source genes among tested pairs
    accuracy             fraction of tested pairs with predicted sign == observed sign
    weighted_accuracy    the same, each pair weighted by its `weight`
    frac_pred_positive   P₊ of predictions (tested pairs);  frac_obs_positive: P₊ of observations
    baseline             sign-imbalance baseline P₊ᵖ·P₊ᵒ + P₋ᵖ·P₋ᵒ (unweighted)
    weighted_baseline    the same with weighted frequencies
    p_vs_baseline        one-sided binomial p of the correct count vs `baseline`; p_vs_half vs 0.5.
                         Both treat pairs as independent, which they are not (pairs share genes and
                         edges): read them as descriptive.
    """

    cell_line: str
    n_pairs: int
    n_tested: int
    n_below_threshold: int
    n_source_genes: int
    n_correct: int
    accuracy: float
    weighted_accuracy: float
    frac_pred_positive: float
    frac_obs_positive: float
    baseline: float
    weighted_baseline: float
    p_vs_baseline: float
    p_vs_half: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def directional_accuracy(
    pairs: pd.DataFrame, table: PerturbationTable, min_abs_lfc: float = 0.0
) -> dict[str, DirectionalAccuracy]:
    """Per cell line: accuracy of the predicted LFC sign, weighted and unweighted, and its baseline."""
    src, tgt, sign, w = _check_pairs(pairs)
    out: dict[str, DirectionalAccuracy] = {}
    nan = float("nan")
    for line in table.cell_lines:
        obs = table.lookup(line, src, tgt)
        found = ~np.isnan(obs)  # ±inf (log of a zero without pseudocount) still has a sign
        tested = found & (np.abs(obs) > min_abs_lfc)
        n = int(tested.sum())
        pred, ob, ww = sign[tested], np.sign(obs[tested]), w[tested]
        correct = pred == ob
        k = int(correct.sum())
        if n == 0:
            out[line] = DirectionalAccuracy(line, len(src), 0, int((found & ~tested).sum()), 0, 0,
                                            nan, nan, nan, nan, nan, nan, nan, nan)
            continue
        pp, po = float(np.mean(pred > 0)), float(np.mean(ob > 0))
        baseline = pp * po + (1 - pp) * (1 - po)
        wsum = float(ww.sum())
        if wsum > 0:
            wacc = float(ww[correct].sum() / wsum)
            wpp, wpo = float(ww[pred > 0].sum() / wsum), float(ww[ob > 0].sum() / wsum)
            wbase = wpp * wpo + (1 - wpp) * (1 - wpo)
        else:
            wacc = wbase = nan
        out[line] = DirectionalAccuracy(
            cell_line=line,
            n_pairs=len(src),
            n_tested=n,
            n_below_threshold=int((found & ~tested).sum()),
            n_source_genes=int(src[tested].nunique()),
            n_correct=k,
            accuracy=k / n,
            weighted_accuracy=wacc,
            frac_pred_positive=pp,
            frac_obs_positive=po,
            baseline=baseline,
            weighted_baseline=wbase,
            p_vs_baseline=float(stats.binomtest(k, n, min(max(baseline, 0.0), 1.0), alternative="greater").pvalue),
            p_vs_half=float(stats.binomtest(k, n, 0.5, alternative="greater").pvalue),
        )
    return out


def accuracy_frame(results: Mapping[str, DirectionalAccuracy]) -> pd.DataFrame:
    """One row per cell line, for writing as a table."""
    return pd.DataFrame([r.to_dict() for r in results.values()])


# ───────────────────────────────────────── TF → target tables ─────────────────────────────────────────

TF_MODES = ("Activation", "Repression", "Unknown")
TRRUST_LAYOUT = (
    "expected the TRRUST raw-data layout: tab-separated, no header, 4 columns TF, target, mode "
    "(Activation/Repression/Unknown), PMIDs separated by ';' (e.g. trrust_rawdata.human.tsv)"
)


def load_tf_targets(path: str | os.PathLike) -> pd.DataFrame:
    """TRRUST-layout TF→target table → DataFrame(tf, target, mode, pmids).

    A header line (first field 'TF'/'source'/'regulator', mode field not a mode) is skipped; any other
    malformed line raises CtraceInputError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise CtraceInputError(f"{path}: TF→target table not found; {TRRUST_LAYOUT}")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except UnicodeDecodeError as err:
        raise CtraceInputError(f"{path}: not UTF-8 text ({err}); {TRRUST_LAYOUT}") from None
    rows: list[tuple[str, str, str, str]] = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        if number == 1 and len(parts) >= 3 and parts[2] not in TF_MODES and parts[0].strip().lower() in (
            "tf", "source", "regulator", "tf_name", "#tf"
        ):
            continue
        if len(parts) not in (3, 4):
            raise CtraceInputError(
                f"{path}, line {number}: {len(parts)} tab-separated fields, expected 4; {TRRUST_LAYOUT}"
            )
        tf, target, mode = parts[0].strip(), parts[1].strip(), parts[2].strip()
        if mode not in TF_MODES:
            raise CtraceInputError(
                f"{path}, line {number}: mode {mode!r} is not one of {list(TF_MODES)}; {TRRUST_LAYOUT}"
            )
        if not tf or not target:
            raise CtraceInputError(f"{path}, line {number}: empty TF or target name; {TRRUST_LAYOUT}")
        rows.append((tf, target, mode, parts[3].strip() if len(parts) == 4 else ""))
    if not rows:
        raise CtraceInputError(f"{path}: no TF→target rows; {TRRUST_LAYOUT}")
    return pd.DataFrame(rows, columns=["tf", "target", "mode", "pmids"])


@dataclass
class TFPrecisionResult:
    """Predicted regulatory mode vs a TF→target table with known modes.

    n_matched           gene pairs (source = TF, target = target) listed with exactly one known mode;
                        precision is computed over these
    n_ambiguous         pairs listed with both Activation and Repression (excluded)
    n_unknown_only      pairs listed only with mode Unknown (excluded)
    n_pred_activation   matched pairs predicted activating (sign −1); n_pred_repression (sign +1)
    n_ref_activation    matched pairs that the table calls Activation; n_ref_repression
    precision           fraction of matched pairs whose predicted mode equals the table's mode
    weighted_precision  the same weighted by pair weight
    precision_activation / precision_repression  precision within each predicted mode
    baseline            P(pred act)·P(ref act) + P(pred rep)·P(ref rep)
    null_mean/null_sd   precision with predicted signs shuffled among the matched pairs
    p_value             (1 + #{null ≥ observed}) / (1 + n_shuffles)
    """

    n_pairs: int
    n_matched: int
    n_ambiguous: int
    n_unknown_only: int
    n_pred_activation: int
    n_pred_repression: int
    n_ref_activation: int
    n_ref_repression: int
    precision: float
    weighted_precision: float
    precision_activation: float
    precision_repression: float
    baseline: float
    null_mean: float
    null_sd: float
    p_value: float
    n_shuffles: int
    seed: int | None
    null_values: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "null_values"}


def tf_target_precision(
    pairs: pd.DataFrame, tf_table: pd.DataFrame, n_shuffles: int = 1000, seed: int | None = 0
) -> TFPrecisionResult:
    """Precision of predicted activating (sign −1) / repressing (sign +1) gene pairs against `tf_table`.

    Only pairs whose source gene is the TF and target gene the target count (direction matters). The null
    shuffles the predicted signs among the matched pairs, keeping how many are predicted activating and
    how many the table calls activating: its mean is ≈ `baseline`.
    """
    src, tgt, sign, w = _check_pairs(pairs)
    missing = [c for c in ("tf", "target", "mode") if c not in getattr(tf_table, "columns", [])]
    if missing:
        raise CtraceInputError(f"TF table: missing column(s) {missing}; use load_tf_targets()")
    # per (TF, target): 1 = Activation only, 2 = Repression only, 3 = both (ambiguous), 0 = Unknown only
    code = tf_table["mode"].map({"Activation": 1, "Repression": 2, "Unknown": 0})
    if code.isna().any():
        bad = tf_table.loc[code.isna(), "mode"].iloc[0]
        raise CtraceInputError(f"TF table: mode {bad!r} is not one of {list(TF_MODES)}")
    ref_modes = (code.astype(np.int64).groupby([tf_table["tf"].astype(str), tf_table["target"].astype(str)])
                 .agg(np.bitwise_or.reduce))
    ref_index = ref_modes.index  # MultiIndex (tf, target)
    # only pairs whose source gene is a TF of the table can match: restrict first (pairs may be millions)
    candidate = np.flatnonzero(_gene_indexer(pd.Index(ref_index.get_level_values(0).unique()), src) >= 0)
    keys = pd.MultiIndex.from_arrays([src.iloc[candidate].astype(str).to_numpy(object),
                                      tgt.iloc[candidate].astype(str).to_numpy(object)])
    hit = ref_index.get_indexer(keys)
    mode_of = np.full(len(src), -1, dtype=np.int64)
    mode_of[candidate[hit >= 0]] = ref_modes.to_numpy()[hit[hit >= 0]]
    n_amb, n_unk = int((mode_of == 3).sum()), int((mode_of == 0).sum())
    matched = (mode_of == 1) | (mode_of == 2)
    pred_act = sign[matched] < 0
    ref_act = mode_of[matched] == 1
    ww = w[matched]
    n = int(matched.sum())
    nan = float("nan")
    rng = np.random.default_rng(seed)
    if n == 0:
        return TFPrecisionResult(len(src), 0, n_amb, n_unk, 0, 0, 0, 0, nan, nan, nan, nan, nan, nan, nan,
                                 nan, int(n_shuffles), seed)
    correct = pred_act == ref_act
    precision = float(correct.mean())
    wprec = float(ww[correct].sum() / ww.sum()) if ww.sum() > 0 else nan
    pa, ra = float(pred_act.mean()), float(ref_act.mean())
    null = np.array([float((rng.permutation(pred_act) == ref_act).mean()) for _ in range(int(n_shuffles))])
    return TFPrecisionResult(
        n_pairs=len(src),
        n_matched=n,
        n_ambiguous=n_amb,
        n_unknown_only=n_unk,
        n_pred_activation=int(pred_act.sum()),
        n_pred_repression=int((~pred_act).sum()),
        n_ref_activation=int(ref_act.sum()),
        n_ref_repression=int((~ref_act).sum()),
        precision=precision,
        weighted_precision=wprec,
        precision_activation=float(ref_act[pred_act].mean()) if pred_act.any() else nan,
        precision_repression=float((~ref_act)[~pred_act].mean()) if (~pred_act).any() else nan,
        baseline=pa * ra + (1 - pa) * (1 - ra),
        null_mean=float(null.mean()) if len(null) else nan,
        null_sd=float(null.std(ddof=1)) if len(null) > 1 else nan,
        p_value=empirical_p(precision, null),
        n_shuffles=int(n_shuffles),
        seed=seed,
        null_values=null,
    )
