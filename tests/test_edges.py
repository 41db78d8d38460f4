"""ctrace.edges: statistics against scipy/statsmodels on raw δ, edge calls, and a planted circuit."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from ctrace.enrichment import bh_fdr
from ctrace.edges import (
    EDGE_COLUMNS,
    EdgeCriteria,
    edge_statistics,
    edge_table,
    null_abs_d,
    summarize_edges,
)
from ctrace.errors import CtraceInputError
from ctrace.models.base import Backend, Batch, Cell
from ctrace.sae import SAEShape, TopKSAE
from ctrace.trace import SweepConfig, SweepStats, merge_stats, run_sweep


# ---------------------------------------------------------------------------------------------------
# statistics from raw δ
# ---------------------------------------------------------------------------------------------------
def stats_from_raw(
    delta_SLGN: np.ndarray, n_S: np.ndarray, features, null_SRLGN=None, source_layer=0, target_layers=(1, 2)
) -> SweepStats:
    """Sufficient statistics of raw per-cell δ (cells beyond n_S[s] are ignored)."""
    S, NL, G, _ = delta_SLGN.shape
    valid = np.arange(delta_SLGN.shape[-1])[None, :] < n_S[:, None]  # (S, N)
    x = np.where(valid[:, None, None, :], delta_SLGN, 0.0)
    null = np.zeros((S, 0, NL, G, delta_SLGN.shape[-1])) if null_SRLGN is None else null_SRLGN
    xn = np.where(valid[:, None, None, None, :], null, 0.0)
    return SweepStats(
        source_layer=source_layer,
        source_features_S=np.asarray(features, dtype=np.int64),
        target_layers_L=np.asarray(target_layers, dtype=np.int64),
        n_target_features=G,
        n_S=n_S.astype(np.int64),
        sum_SLG=x.sum(-1),
        sumsq_SLG=(x * x).sum(-1),
        pos_SLG=(x > 0).sum(-1).astype(np.int64),
        neg_SLG=(x < 0).sum(-1).astype(np.int64),
        null_sum_SRLG=xn.sum(-1),
        null_sumsq_SRLG=(xn * xn).sum(-1),
        null_pos_SRLG=(xn > 0).sum(-1).astype(np.int64),
        null_neg_SRLG=(xn < 0).sum(-1).astype(np.int64),
        null_draws=null.shape[1],
        n_cells=delta_SLGN.shape[-1],
        cells_digest="x",
        forward_passes=int(n_S.sum()),
        wall_time_s=1.0,
    )


@pytest.fixture(scope="module")
def raw():
    """6 source features × 2 layers × 40 targets × up to 25 cells; planted effects, zeros, ties, n < 3."""
    rng = np.random.default_rng(0)
    S, NL, G, N = 6, 2, 40, 25
    n_S = np.array([25, 12, 2, 0, 25, 9])
    delta = rng.normal(0, 1, (S, NL, G, N))
    delta[:, :, :8] += rng.choice([-1.5, -0.8, 0.7, 1.2], size=(S, NL, 8))[..., None]
    delta[:, :, 8:12] = np.round(delta[:, :, 8:12] * 0.6)  # many exact zeros (count against consistency)
    delta[:, :, 12] = 0.0  # sd = 0 (all zero)
    delta[:, :, 13] = 0.3  # sd = 0 up to rounding (all equal, non-zero)
    delta[:, :, 14] = -0.4 + 1e-3 * rng.normal(size=(S, NL, N))  # tiny sd, huge |d|
    null = rng.normal(0, 1, (S, 3, NL, G, N)) + 0.1
    features = [40, 3, 17, 8, 25, 11]
    return delta, n_S, features, null


def scipy_reference(delta, n_S, features, min_n=3):
    """Rows (s, ℓ, g) → (n, mean, sd, d, p) with n ≥ min_n and sd > 0, from scipy on the raw δ."""
    out = {}
    for s in range(delta.shape[0]):
        n = int(n_S[s])
        if n < min_n:
            continue
        for li in range(delta.shape[1]):
            for g in range(delta.shape[2]):
                x = delta[s, li, g, :n]
                sd = x.std(ddof=1)
                if sd <= 1e-9 * np.abs(x).max(initial=0):
                    continue
                pos, neg = (x > 0).sum(), (x < 0).sum()
                cons = (pos if x.mean() > 0 else neg if x.mean() < 0 else 0) / n  # d = 0: no sign
                out[(features[s], li, g)] = dict(
                    n=n,
                    mean=x.mean(),
                    sd=sd,
                    d=x.mean() / sd,
                    p=sps.ttest_1samp(x, 0.0).pvalue,
                    cons=cons,
                    ref_cons=max(pos, n - pos) / n,
                )
    return out


def test_statistics_equal_scipy_and_statsmodels_on_merged_shards(raw):
    delta, n_S, features, null = raw
    parts = [[0, 4], [1, 3], [2, 5]]
    shards = [stats_from_raw(delta[p], n_S[p], [features[i] for i in p], null[p]) for p in parts]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN / division warnings may leak
        merged = merge_stats(shards)
        table = edge_statistics(merged, "c1")
    ref = scipy_reference(delta, n_S, features)
    tested = table[table["p_value"].notna()]
    got = {
        (r.source_feature, int(np.searchsorted([1, 2], r.target_layer)), r.target_feature): r
        for r in tested.itertuples()
    }
    assert set(got) == set(ref)
    for key, r in ref.items():
        row = got[key]
        assert row.n == r["n"]
        np.testing.assert_allclose(
            [row.mean_delta, row.sd_delta, row.cohens_d, row.p_value, row.sign_consistency, row.reference_consistency],
            [r["mean"], r["sd"], r["d"], r["p"], r["cons"], r["ref_cons"]],
            rtol=1e-8,
            atol=1e-12,
        )
    # BH within the (condition, source layer) family = every test of the merged sweep
    order = sorted(ref)
    q_sm = multipletests([got[k].p_value for k in order], method="fdr_bh")[1]
    np.testing.assert_allclose([got[k].q_value for k in order], q_sm, rtol=1e-12)
    q_raw = multipletests([ref[k]["p"] for k in order], method="fdr_bh")[1]
    np.testing.assert_allclose([got[k].q_value for k in order], q_raw, rtol=1e-8)
    # sd == 0 rows (all-equal δ) are listed with NaN d/p/q; n < 3 features are absent
    untested = table[table["p_value"].isna()]
    assert set(untested["target_feature"]) >= {12, 13}
    assert untested["cohens_d"].isna().all() and untested["q_value"].isna().all()
    assert not table["source_feature"].isin([17, 8]).any()
    # the sufficient-statistic path also handles the near-degenerate column 14 (tiny sd, huge |d|)
    assert (tested.loc[tested["target_feature"] == 14, "cohens_d"] < -50).all()


def test_corrected_and_reference_edge_calls(raw):
    delta, n_S, features, null = raw
    stats = stats_from_raw(delta, n_S, features, null)
    ref = scipy_reference(delta, n_S, features)
    keys = sorted(ref)
    q = dict(zip(keys, multipletests([ref[k]["p"] for k in keys], method="fdr_bh")[1]))
    expected = {k for k in keys if q[k] < 0.05 and abs(ref[k]["d"]) >= 0.5 and ref[k]["cons"] >= 0.7}
    edges = edge_table(stats, "c1", "corrected")
    assert list(edges.columns) == EDGE_COLUMNS
    got = {(r.source_feature, r.target_layer - 1, r.target_feature) for r in edges.itertuples()}
    assert got == expected and len(expected) > 10
    assert (edges["condition"] == "c1").all() and (edges["source_layer"] == 0).all()
    neg = edges["cohens_d"] < 0
    assert (edges.loc[neg, "ablation_effect_sign"] == "negative").all()
    assert (edges.loc[~neg, "ablation_effect_sign"] == "positive").all()

    crit = EdgeCriteria(reference_top_k=3)
    ref_edges = edge_table(stats, "c1", "reference", crit)
    expected_ref = set()
    for f in {k[0] for k in keys}:
        for li in (0, 1):
            cand = [k for k in keys if k[:2] == (f, li) and abs(ref[k]["d"]) > 0.5 and ref[k]["ref_cons"] > 0.7]
            cand.sort(key=lambda k: (-abs(ref[k]["d"]), k[2]))
            expected_ref |= set(cand[:3])
    got_ref = {(r.source_feature, r.target_layer - 1, r.target_feature) for r in ref_edges.itertuples()}
    assert got_ref == expected_ref
    assert ref_edges.groupby(["source_feature", "target_layer"]).size().max() == 3
    np.testing.assert_allclose(
        ref_edges["sign_consistency"],
        [ref[(r.source_feature, r.target_layer - 1, r.target_feature)]["ref_cons"] for r in ref_edges.itertuples()],
    )
    with pytest.raises(CtraceInputError):
        edge_table(stats, "c1", "loose")


def test_summary_and_null(raw):
    delta, n_S, features, null = raw
    stats = stats_from_raw(delta, n_S, features, null)
    edges = edge_table(stats, "c1")
    summary = summarize_edges(edges, stats)
    d = edges["cohens_d"].to_numpy()
    assert summary["edges"] == len(edges)
    assert summary["mean_abs_d"] == pytest.approx(np.abs(d).mean())
    assert summary["median_abs_d"] == pytest.approx(np.median(np.abs(d)))
    assert summary["pct_d_negative"] == pytest.approx(100 * (d < 0).mean())
    assert summary["edges_per_layer_pair"] == {
        f"0->{t}": int((edges["target_layer"] == t).sum()) for t in (1, 2) if (edges["target_layer"] == t).any()
    }
    assert summary["forward_passes"] == n_S.sum() and summary["wall_time_s"] == 1.0
    assert summary["criteria"] == {"min_n": 3, "q_max": 0.05, "d_min": 0.5, "consistency_min": 0.7,
                                   "reference_top_k": 50}
    assert summary["swept_layer_pairs"] == ["0->1", "0->2"]  # what was tested, edges or not
    # null |d| from scipy on the raw null δ
    null_d = []
    for s in range(null.shape[0]):
        n = n_S[s]
        if n >= 3:
            x = null[s, :, :, :, :n]
            null_d.append(np.abs(x.mean(-1) / x.std(-1, ddof=1)).ravel())
    null_d = np.concatenate(null_d)
    np.testing.assert_allclose(np.sort(null_abs_d(stats)), np.sort(null_d), rtol=1e-9)
    assert summary["null"]["tests"] == null_d.size and summary["null"]["draws"] == 3
    assert summary["null"]["abs_d_quantiles"]["q0.5"] == pytest.approx(np.quantile(null_d, 0.5))
    assert summary["null"]["abs_d_quantiles"]["q1"] == pytest.approx(null_d.max())
    assert summary["real"]["abs_d_quantiles"]["q0.9"] > summary["null"]["abs_d_quantiles"]["q0.9"]
    # histograms for the report: numpy's on the same |d| (clipped into the outer bins), every test counted
    bins = np.asarray(summary["abs_d_bin_edges"])
    assert bins[0] == pytest.approx(1e-3) and bins[-1] == pytest.approx(1e3)
    expected, _ = np.histogram(np.clip(null_d, bins[0], bins[-1]), bins=bins)
    assert summary["null"]["abs_d_histogram"] == expected.tolist()
    assert sum(summary["real"]["abs_d_histogram"]) == summary["real"]["tests"]
    # the fraction of TESTS (n ≥ 3, sd > 0) passing |d| ≥ 0.5 and sign-consistency ≥ 0.7
    ref = scipy_reference(delta, n_S, features)
    passing = sum(abs(r["d"]) >= 0.5 and r["cons"] >= 0.7 for r in ref.values())
    assert summary["real"]["tests"] == len(ref)
    assert summary["real"]["frac_pass_effect_filters"] == pytest.approx(passing / len(ref))


def test_thresholds_hold_at_their_boundaries():
    """|d| and consistency exactly at the thresholds: corrected mode takes ≥, reference mode >."""
    # n = 100, Σδ = 50 (mean 0.5); Σδ² = 99 + Σδ²/n gives sd exactly 1, so d = 0.5 exactly; p ≈ 3e-6
    targets = {  # target feature → (Σδ, Σδ², #δ>0)
        0: (50.0, 124.0, 70),  # d = 0.5, consistency 0.70: corrected only
        1: (50.0, 124.0, 69),  # consistency 0.69: neither
        2: (60.0, 135.0, 70),  # d = 0.6, consistency 0.70: corrected only (reference needs > 0.7)
        3: (50.0, 124.0, 71),  # d = 0.5, consistency 0.71: corrected only (reference needs |d| > 0.5)
        4: (60.0, 135.0, 71),  # both
        5: (-50.0, 124.0, 30),  # d = −0.5, 70 of 100 negative: corrected only
    }
    G = len(targets)
    sums = np.array([[[targets[g][0] for g in range(G)]]])
    stats = SweepStats(
        source_layer=0, source_features_S=np.array([7]), target_layers_L=np.array([1]), n_target_features=G,
        n_S=np.array([100]), sum_SLG=sums, sumsq_SLG=np.array([[[targets[g][1] for g in range(G)]]]),
        pos_SLG=np.array([[[targets[g][2] for g in range(G)]]]),
        neg_SLG=np.array([[[100 - targets[g][2] for g in range(G)]]]),
        null_sum_SRLG=np.zeros((1, 0, 1, G)), null_sumsq_SRLG=np.zeros((1, 0, 1, G)),
        null_pos_SRLG=np.zeros((1, 0, 1, G), np.int64), null_neg_SRLG=np.zeros((1, 0, 1, G), np.int64),
    )
    table = edge_statistics(stats, "c")
    assert table.loc[table["target_feature"] == 0, "cohens_d"].item() == 0.5
    assert set(edge_table(stats, "c", "corrected")["target_feature"]) == {0, 2, 3, 4, 5}
    assert set(edge_table(stats, "c", "reference")["target_feature"]) == {4}


def test_bh_matches_statsmodels():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, 20), [0.01] * 5, [1.0]])
    rng.shuffle(p)
    np.testing.assert_allclose(bh_fdr(p), multipletests(p, method="fdr_bh")[1], rtol=1e-12)
    assert bh_fdr(np.array([])).size == 0


def test_no_edges_from_zero_effects():
    S, NL, G, N = 2, 2, 5, 10
    stats = stats_from_raw(np.zeros((S, NL, G, N)), np.array([10, 10]), [0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("corrected", "reference"):
            assert edge_table(stats, "c", mode).empty
        summary = summarize_edges(edge_table(stats, "c"), stats)
    assert summary["edges"] == 0 and summary["mean_abs_d"] is None and summary["real"]["tests"] == 0


# ---------------------------------------------------------------------------------------------------
# a hand-built 2-layer model with a planted dependency
# ---------------------------------------------------------------------------------------------------
D = 8
E = torch.eye(D)


class Planted(Backend):
    """Block 0: identity. Block 1: h + (−0.5·mean over real tokens of h·e1)·e6, otherwise identity.

    Layer-0 SAE: feature i reads/writes e_i (i = 0..3), k = 2. Layer-1 SAE: features read e0, e5, e6, e7.
    So ablating layer-0 feature 0 (direction e0) lowers layer-1 feature 0, which reads that same
    direction (planted edge, d < 0); ablating feature 1 (e1) raises layer-1 feature 2 (e6) through the
    mixing term (d > 0); layer-1 feature 1 (e5) depends on nothing.
    """

    name = "planted"
    n_layers = 2
    d_model = D
    pad_token_id = 0
    special_token_ids = frozenset({0, 1, 2})
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, vocab=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tok_VD = 0.2 + 0.8 * torch.rand(vocab, D, generator=g)
        self.tok_VD[:, 6] += 1.0

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.tok_VD[batch.input_ids_BT]

    def run_blocks(self, h_BTD, batch, start, stop, edits=None) -> Iterator[tuple[int, torch.Tensor]]:
        for i in range(start, stop + 1):
            if i == 1:
                keep = batch.keep_BT.to(h_BTD.dtype)
                pooled_B = (h_BTD[..., 1] * keep).sum(1) / keep.sum(1)
                h_BTD = h_BTD + (-0.5 * pooled_B)[:, None, None] * E[6]
            yield i, h_BTD


def planted_saes() -> dict[int, TopKSAE]:
    sae0 = TopKSAE(SAEShape(D, 4, 2))
    sae1 = TopKSAE(SAEShape(D, 4, 4))
    with torch.no_grad():
        sae0.W_enc_FD.copy_(E[:4])
        sae0.W_dec_DF.copy_(E[:4].T)
        rows = E[[0, 5, 6, 7]]
        sae1.W_enc_FD.copy_(rows)
        sae1.W_dec_DF.copy_(rows.T)
    return {0: sae0.eval(), 1: sae1.eval()}


def test_planted_dependency_is_found_with_the_right_sign():
    rng = np.random.default_rng(2)
    cells = [
        Cell(np.concatenate([[1], rng.choice(np.arange(3, 40), 8, replace=False), [2]]).astype(np.int64))
        for _ in range(16)
    ]
    stats = run_sweep(Planted(), planted_saes(), cells, 0, [0, 1, 2], [1], SweepConfig(null_draws=2, seed=1))
    assert (stats.n_S >= 10).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edges = edge_table(stats, "planted", "corrected")
        ref_edges = edge_table(stats, "planted", "reference")
    calls = {(r.source_feature, r.target_feature, r.ablation_effect_sign) for r in edges.itertuples()}
    assert calls == {(0, 0, "negative"), (1, 2, "positive")}
    assert {(r.source_feature, r.target_feature) for r in ref_edges.itertuples()} == {(0, 0), (1, 2)}
    # ablating e0 at f's firing positions removes z_f there: δ_0 = −mean(z_f) exactly per cell
    row = edges[(edges["source_feature"] == 0) & (edges["target_feature"] == 0)].iloc[0]
    assert row["cohens_d"] < -2 and row["sign_consistency"] == 1.0 and row["q_value"] < 1e-3
    # the unrelated target (e5) never moves: δ exactly 0 for every source
    assert not stats.sum_SLG[:, 0, 1].any() and not stats.pos_SLG[:, 0, 1].any()
