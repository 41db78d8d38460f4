"""Edges from sweep statistics (method.md §7): effect sizes, tests, FDR, sign consistency, edge calls.

Per (source feature f, target layer ℓ, target feature g) with n ≥ 3 cells:
  mean = Σδ/n,  sd = √((Σδ² − (Σδ)²/n)/(n−1)),  d_z = mean/sd,  t = d_z·√n,  p = 2·P(T_{n−1} ≥ |t|).
A test exists only where sd > 0 (sd = 0: d undefined, p undefined, never an edge). BH-FDR runs over the
tests of one (condition, source layer) — one merged `SweepStats`.

Modes: `corrected` = q < 0.05, |d| ≥ 0.5, sign-consistency ≥ 0.7 (fraction of the n cells whose δ has
the sign of d; zeros count against). `reference` = the published procedure: |d| > 0.5 and
max(#δ>0, n − #δ>0)/n > 0.7 (zeros count as non-positive), then the top 50 targets by |d| per (f, ℓ).
`ablation_effect_sign` "negative" (d < 0) = ablating the source lowers the target (the reference's
"inhibitory"), "positive" otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.special import stdtr

from ctrace.enrichment import bh_fdr
from ctrace.errors import CtraceInputError
from ctrace.trace import SweepStats

MODES = ("corrected", "reference")
EDGE_COLUMNS = [
    "condition",
    "source_layer",
    "source_feature",
    "target_layer",
    "target_feature",
    "n",
    "mean_delta",
    "sd_delta",
    "cohens_d",
    "p_value",
    "q_value",
    "sign_consistency",
    "ablation_effect_sign",
]
# Σδ² − (Σδ)²/n at or below this fraction of Σδ² is rounding error: the δ are all equal, sd = 0.
_SS_REL_TOL = 1e-12


@dataclass(frozen=True)
class EdgeCriteria:
    """Edge thresholds (defaults from method.md §7)."""

    min_n: int = 3
    q_max: float = 0.05
    d_min: float = 0.5
    consistency_min: float = 0.7
    reference_top_k: int = 50


@dataclass(frozen=True)
class Tests:
    """Per-test arrays, any common shape. tested: n ≥ min_n and sd > 0 (d, p defined; NaN elsewhere)."""

    n: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    d: np.ndarray
    p: np.ndarray
    consistency: np.ndarray  # fraction of cells with the sign of d (zeros against); 0 where mean = 0
    reference_consistency: np.ndarray  # max(#δ>0, n − #δ>0)/n
    tested: np.ndarray


def one_sample_tests(n, s1, s2, pos, neg, min_n: int = 3) -> Tests:
    """d_z, t-test p and sign consistency from the sufficient statistics (n broadcast against the sums)."""
    s1 = np.asarray(s1, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), s1.shape)
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    enough = n >= max(min_n, 2)
    safe_n = np.where(n > 0, n, 1.0)
    mean = np.where(n > 0, s1 / safe_n, np.nan)
    ss = s2 - s1 * s1 / safe_n
    ss = np.where(ss <= _SS_REL_TOL * s2, 0.0, ss)
    sd = np.where(enough, np.sqrt(np.maximum(ss, 0.0) / np.maximum(n - 1, 1.0)), np.nan)
    tested = enough & (sd > 0)
    safe_sd = np.where(tested, sd, 1.0)
    d = np.where(tested, mean / safe_sd, np.nan)
    t = np.where(tested, d * np.sqrt(n), 0.0)
    p = np.where(tested, 2.0 * stdtr(np.maximum(n - 1, 1.0), -np.abs(t)), np.nan)
    mean0 = np.where(n > 0, mean, 0.0)
    agree = np.where(mean0 > 0, pos, np.where(mean0 < 0, neg, 0.0))
    consistency = np.where(n > 0, agree / safe_n, np.nan)
    reference_consistency = np.where(n > 0, np.maximum(pos, n - pos) / safe_n, np.nan)
    return Tests(
        n=np.asarray(n),
        mean=mean,
        sd=sd,
        d=d,
        p=np.minimum(p, 1.0),
        consistency=consistency,
        reference_consistency=reference_consistency,
        tested=tested,
    )


def _tests(stats: SweepStats, criteria: EdgeCriteria) -> tuple[Tests, np.ndarray]:
    tests = one_sample_tests(
        stats.n_S[:, None, None], stats.sum_SLG, stats.sumsq_SLG, stats.pos_SLG, stats.neg_SLG, criteria.min_n
    )
    q = np.full(tests.p.shape, np.nan)
    q[tests.tested] = bh_fdr(tests.p[tests.tested])
    return tests, q


def _frame(
    stats: SweepStats, condition: str, tests: Tests, q: np.ndarray, mask: np.ndarray, consistency: np.ndarray
) -> pd.DataFrame:
    s_idx, l_idx, g_idx = np.nonzero(mask)
    d = tests.d[mask]
    return pd.DataFrame(
        {
            "condition": pd.Series([condition] * s_idx.size, dtype=object),
            "source_layer": np.full(s_idx.size, stats.source_layer, dtype=np.int64),
            "source_feature": stats.source_features_S[s_idx].astype(np.int64),
            "target_layer": stats.target_layers_L[l_idx].astype(np.int64),
            "target_feature": g_idx.astype(np.int64),
            "n": tests.n[mask].astype(np.int64),
            "mean_delta": tests.mean[mask],
            "sd_delta": tests.sd[mask],
            "cohens_d": d,
            "p_value": tests.p[mask],
            "q_value": q[mask],
            "sign_consistency": consistency[mask],
            "ablation_effect_sign": np.where(tests.mean[mask] < 0, "negative", "positive").astype(object),
        }
    )


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    key = ["source_layer", "source_feature", "target_layer", "target_feature"]
    return frame.sort_values(key, kind="stable").reset_index(drop=True)


def edge_statistics(stats: SweepStats, condition: str, criteria: EdgeCriteria = EdgeCriteria()) -> pd.DataFrame:
    """Every (f, ℓ, g) with n ≥ min_n (tested or not), columns of `EDGE_COLUMNS` (+ `reference_consistency`).

    Rows with sd = 0 have NaN d, p and q. `sign_consistency` is the corrected definition.
    """
    tests, q = _tests(stats, criteria)
    mask = tests.n >= criteria.min_n
    frame = _frame(stats, condition, tests, q, mask, tests.consistency)
    frame["reference_consistency"] = tests.reference_consistency[mask]
    return _sorted(frame)


def edge_table(
    stats: SweepStats, condition: str, mode: str = "corrected", criteria: EdgeCriteria = EdgeCriteria()
) -> pd.DataFrame:
    """Edges of one merged sweep (one source layer) under `mode`; columns `EDGE_COLUMNS`.

    In `reference` mode `sign_consistency` holds the reference's max(#δ>0, n−#δ>0)/n, the quantity it
    thresholds; p and q are reported in both modes.
    """
    if mode not in MODES:
        raise CtraceInputError(f"edge mode {mode!r} is not one of {MODES}")
    tests, q = _tests(stats, criteria)
    abs_d = np.where(tests.tested, np.abs(np.nan_to_num(tests.d)), 0.0)
    if mode == "corrected":
        mask = (
            tests.tested
            & (q < criteria.q_max)
            & (abs_d >= criteria.d_min)
            & (np.nan_to_num(tests.consistency) >= criteria.consistency_min)
        )
        return _sorted(_frame(stats, condition, tests, q, mask, tests.consistency))
    mask = (
        tests.tested
        & (abs_d > criteria.d_min)
        & (np.nan_to_num(tests.reference_consistency) > criteria.consistency_min)
    )
    # top-k by |d| per (source feature, target layer); ties by lower target feature id
    ranked = np.where(mask, abs_d, -1.0)
    order = np.argsort(-ranked, axis=2, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[2])[None, None, :], axis=2)
    mask &= rank < criteria.reference_top_k
    return _sorted(_frame(stats, condition, tests, q, mask, tests.reference_consistency))


def null_abs_d(stats: SweepStats, criteria: EdgeCriteria = EdgeCriteria()) -> np.ndarray:
    """|d| of every null test (random-direction ablations; all draws, layers, targets) with n ≥ min_n, sd > 0."""
    tests = one_sample_tests(
        stats.n_S[:, None, None, None],
        stats.null_sum_SRLG,
        stats.null_sumsq_SRLG,
        stats.null_pos_SRLG,
        stats.null_neg_SRLG,
        criteria.min_n,
    )
    return np.abs(tests.d[tests.tested])


def _quantiles(x: np.ndarray, probs: Sequence[float]) -> dict[str, float | None]:
    if x.size == 0:
        return {f"q{p:g}": None for p in probs}
    return {f"q{p:g}": float(v) for p, v in zip(probs, np.quantile(x, probs))}


# |d| histogram bins of the summaries: log-spaced 1e-3 … 1e3 (values outside are clipped into the end bins)
ABS_D_BIN_EDGES = np.logspace(-3, 3, 61)


def _histogram(x: np.ndarray) -> list[int]:
    clipped = np.clip(x, ABS_D_BIN_EDGES[0], ABS_D_BIN_EDGES[-1])
    return np.histogram(clipped, bins=ABS_D_BIN_EDGES)[0].astype(int).tolist()


def summarize_edges(
    edges: pd.DataFrame, stats: SweepStats | Sequence[SweepStats], criteria: EdgeCriteria = EdgeCriteria()
) -> dict:
    """Per-condition summary (JSON-ready): edge counts and |d|, per layer pair, cost, the null |d|, the edge
    criteria used and the (source layer, target layer) pairs the statistics cover (`swept_layer_pairs`).

    `real`/`null`: quantiles and a histogram (bins `abs_d_bin_edges`) of |d| over all tests (not only
    edges) of the real and random-direction ablations, and the fraction of tests passing the effect filters |d| ≥ d_min and sign-consistency ≥
    consistency_min — the null fraction estimates how often a direction with no special role passes them.
    """
    parts = [stats] if isinstance(stats, SweepStats) else list(stats)
    abs_d = edges["cohens_d"].abs().to_numpy(dtype=np.float64)
    pairs = edges.groupby(["source_layer", "target_layer"]).size()
    probs = (0.5, 0.9, 0.99, 0.999, 1.0)
    real, null, real_pass, null_pass = [], [], 0, 0
    for part in parts:
        t = one_sample_tests(
            part.n_S[:, None, None], part.sum_SLG, part.sumsq_SLG, part.pos_SLG, part.neg_SLG, criteria.min_n
        )
        real.append(np.abs(t.d[t.tested]))
        real_pass += int((_passes_effect(t, criteria)).sum())
        tn = one_sample_tests(
            part.n_S[:, None, None, None],
            part.null_sum_SRLG,
            part.null_sumsq_SRLG,
            part.null_pos_SRLG,
            part.null_neg_SRLG,
            criteria.min_n,
        )
        null.append(np.abs(tn.d[tn.tested]))
        null_pass += int((_passes_effect(tn, criteria)).sum())
    real_d, null_d = np.concatenate(real), np.concatenate(null)
    return {
        "edges": int(len(edges)),
        "mean_abs_d": float(abs_d.mean()) if abs_d.size else None,
        "median_abs_d": float(np.median(abs_d)) if abs_d.size else None,
        "pct_d_negative": float(100.0 * (edges["cohens_d"] < 0).mean()) if len(edges) else None,
        "edges_per_layer_pair": {f"{s}->{t}": int(c) for (s, t), c in pairs.items()},
        "source_features": int(sum(p.source_features_S.size for p in parts)),
        "fired_pairs": int(sum(p.n_S.sum() for p in parts)),
        "forward_passes": int(sum(p.forward_passes for p in parts)),
        "null_forward_passes": int(sum(p.null_forward_passes for p in parts)),
        "clean_passes": int(sum(p.clean_passes for p in parts)),
        "wall_time_s": float(sum(p.wall_time_s for p in parts)),
        "real": {
            "tests": int(real_d.size),
            "abs_d_quantiles": _quantiles(real_d, probs),
            "frac_pass_effect_filters": real_pass / real_d.size if real_d.size else None,
            "abs_d_histogram": _histogram(real_d),
        },
        "null": {
            "draws": int(parts[0].null_draws),
            "tests": int(null_d.size),
            "abs_d_quantiles": _quantiles(null_d, probs),
            "frac_pass_effect_filters": null_pass / null_d.size if null_d.size else None,
            "abs_d_histogram": _histogram(null_d),
        },
        "abs_d_bin_edges": ABS_D_BIN_EDGES.tolist(),
        "criteria": asdict(criteria),
        "swept_layer_pairs": sorted({f"{p.source_layer}->{int(t)}" for p in parts for t in p.target_layers_L}),
    }


def _passes_effect(t: Tests, criteria: EdgeCriteria) -> np.ndarray:
    return (
        t.tested
        & (np.abs(np.nan_to_num(t.d)) >= criteria.d_min)
        & (np.nan_to_num(t.consistency) >= criteria.consistency_min)
    )
