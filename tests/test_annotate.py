"""Feature annotation: streamed per-(feature, token) stats, top genes with min_support, layer-wide BH."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import hypergeom
from statsmodels.stats.multitest import multipletests

from ctrace.annotate import FEATURE_COLUMNS, SIGNIFICANT_COLUMNS, annotate_layer, feature_gene_stats, top_genes
from ctrace.io import write_parquet
from ctrace.sae import SAEShape, TopKSAE


def identity_sae(d: int, k: int) -> TopKSAE:
    """z = TopK_k(ReLU(x)), x̂ = z: feature f is coordinate f."""
    sae = TopKSAE(SAEShape(d_model=d, n_features=d, k=k))
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.eye(d))
        sae.W_dec_DF.copy_(torch.eye(d))
    return sae


def write_dump(folder, name, x, tokens, cells=None):
    npy, rows = folder / f"{name}.npy", folder / f"{name}.rows.parquet"
    np.save(npy, np.asarray(x, np.float16))
    n = len(tokens)
    write_parquet(rows, pd.DataFrame({
        "cell": (np.arange(n) // 4 if cells is None else cells).astype(np.int32),
        "position": np.arange(n, dtype=np.int32),
        "token_id": np.asarray(tokens, np.int32),
    }))
    return npy, rows


@pytest.fixture()
def hand_dump(tmp_path):
    """Feature 0 on tokens 10 (5.0 ×2), 11 (1, 2, 3), 12 (4 ×3), 13 (1 ×3), 14 (10 ×3, no gene), 15 (3.5 ×3,
    same gene as 12). Feature 1 fires once per row with value 0.5; feature 2 never (negative)."""
    spec = [(10, 5.0)] * 2 + [(11, 1.0), (11, 2.0), (11, 3.0)] + [(12, 4.0)] * 3 + [(13, 1.0)] * 3 \
        + [(14, 10.0)] * 3 + [(15, 3.5)] * 3
    tokens = [t for t, _ in spec]
    x = np.zeros((len(spec), 3))
    x[:, 0] = [v for _, v in spec]
    x[:, 1] = 0.5
    x[:, 2] = -1.0
    half = len(spec) // 2
    return [write_dump(tmp_path, "a", x[:half], tokens[:half]), write_dump(tmp_path, "b", x[half:], tokens[half:])]


TOKEN_TO_GENE = {10: "TEN", 11: "ELEVEN", 12: "TWELVE", 13: "THIRTEEN", 15: "TWELVE"}


def test_feature_gene_stats_hand_fixture(hand_dump):
    stats = feature_gene_stats(identity_sae(3, k=2), hand_dump, batch_rows=4)
    got = {(f, t): (s, c) for f, t, s, c in zip(stats.feature_P, stats.token_P, stats.sum_P, stats.count_P)}
    assert got == {
        (0, 10): (10.0, 2), (0, 11): (6.0, 3), (0, 12): (12.0, 3), (0, 13): (3.0, 3), (0, 14): (30.0, 3),
        (0, 15): (10.5, 3),
        (1, 10): (1.0, 2), (1, 11): (1.5, 3), (1, 12): (1.5, 3), (1, 13): (1.5, 3), (1, 14): (1.5, 3),
        (1, 15): (1.5, 3),
    }
    assert stats.n_firing_positions_F.tolist() == [17, 17, 0]
    assert stats.n_rows == 17


def test_top_genes_honours_min_support(hand_dump):
    stats = feature_gene_stats(identity_sae(3, k=2), hand_dump)
    tops = top_genes(stats, TOKEN_TO_GENE, n_top=3, min_support=3)
    f0 = tops[tops.feature == 0]
    # TEN (mean 5, only 2 positions) fails min_support; token 14 has no gene; TWELVE keeps its best token (12)
    assert f0.gene.tolist() == ["TWELVE", "ELEVEN", "THIRTEEN"]
    assert f0.token_id.tolist() == [12, 11, 13]
    assert f0.mean_activation.tolist() == pytest.approx([4.0, 2.0, 1.0])
    assert f0["rank"].tolist() == [0, 1, 2]
    loose = top_genes(stats, TOKEN_TO_GENE, n_top=2, min_support=2)
    assert loose[loose.feature == 0].gene.tolist() == ["TEN", "TWELVE"]
    # feature 1: all means 0.5 → ties broken by token id
    assert tops[tops.feature == 1].token_id.tolist() == [11, 12, 13]
    assert 2 not in set(tops.feature)


def test_feature_gene_stats_match_dense_computation(tmp_path):
    rng = np.random.default_rng(0)
    d, f, n = 6, 24, 700
    x = rng.standard_normal((n, d)).astype(np.float16)
    tokens = rng.integers(4, 40, n)
    sources = [write_dump(tmp_path, "a", x[:300], tokens[:300]), write_dump(tmp_path, "b", x[300:], tokens[300:])]
    sae = TopKSAE(SAEShape(d_model=d, n_features=f, k=5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.b_enc_F.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(4))
    stats = feature_gene_stats(sae, sources, batch_rows=64)
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(x.astype(np.float32))).double().numpy()
    expected_sum = np.zeros((f, 40))
    expected_count = np.zeros((f, 40), np.int64)
    for row in range(n):
        for feat in np.flatnonzero(codes[row] > 0):
            expected_sum[feat, tokens[row]] += codes[row, feat]
            expected_count[feat, tokens[row]] += 1
    got_sum = np.zeros((f, 40))
    got_count = np.zeros((f, 40), np.int64)
    got_sum[stats.feature_P, stats.token_P] = stats.sum_P
    got_count[stats.feature_P, stats.token_P] = stats.count_P
    np.testing.assert_allclose(got_sum, expected_sum, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_count, expected_count)
    np.testing.assert_array_equal(stats.n_firing_positions_F, (codes > 0).sum(0))


def test_annotate_layer_matches_independent_tests(tmp_path):
    """Feature f (< 2) fires on the genes of program f; enrichment finds its term; BH over all layer tests."""
    rng = np.random.default_rng(5)
    n_genes, d = 60, 4
    genes = [f"GENE{i}" for i in range(n_genes)]
    token_to_gene = {100 + i: g for i, g in enumerate(genes)}
    programs = {0: range(0, 10), 1: range(20, 30)}
    tokens = np.repeat(np.arange(100, 100 + n_genes), 4)
    x = np.full((len(tokens), d), -1.0)
    for f, members in programs.items():
        hit = np.isin(tokens - 100, list(members))
        x[hit, f] = 2.0 + rng.uniform(0, 1, hit.sum())
    x[:, 2] = rng.uniform(-1, 1, len(tokens))  # feature 2: random genes; feature 3 never fires
    sources = [write_dump(tmp_path, "a", x, tokens)]
    libraries = {
        "lib1": {"P0": set(genes[0:10]) | set(genes[40:45]), "P1": set(genes[20:30]), "MIX": set(genes[5:25])},
        "lib2": {f"R{j}": set(rng.choice(genes, 12, replace=False)) for j in range(6)} | {"SMALL": set(genes[:3])},
    }
    background = set(genes[:55])
    features, significant = annotate_layer(identity_sae(d, k=2), sources, token_to_gene, libraries, background,
                                           n_top=10, min_support=3)
    assert list(features.columns) == FEATURE_COLUMNS and list(significant.columns) == SIGNIFICANT_COLUMNS
    assert features.top_genes[0] == sorted(genes[0:10], key=lambda g: -x[tokens - 100 == genes.index(g), 0].mean())

    # independent: every (feature with top genes) × library × eligible term, hypergeom, then one BH
    rows = []
    for f, top in enumerate(features.top_genes):
        query = set(top) & background
        if not query:
            continue
        for lib, sets in libraries.items():
            for term, members in sets.items():
                restricted = members & background
                if not 5 <= len(restricted) <= 500:
                    continue
                a = len(restricted & query)
                rows.append((f, lib, term, hypergeom.sf(a - 1, len(background), len(restricted), len(query)), a))
    expected = pd.DataFrame(rows, columns=["feature", "library", "term", "p", "a"])
    expected["q"] = multipletests(expected.p, method="fdr_bh")[1]
    assert features.attrs["n_tests"] == len(expected)
    exp_sig = expected[expected.q < 0.05].sort_values(["feature", "library", "term"])
    got_sig = significant.sort_values(["feature", "library", "term"])
    key = ["feature", "library", "term"]
    assert got_sig[key].values.tolist() == exp_sig[key].values.tolist()
    np.testing.assert_allclose(got_sig.q_value, exp_sig.q, rtol=1e-10)
    np.testing.assert_allclose(got_sig.p_value, exp_sig.p, rtol=1e-10)
    assert (got_sig.overlap.values == exp_sig.a.values).all()

    assert features.loc[0, "best_term"] == "P0" and features.loc[0, "best_library"] == "lib1"
    assert features.loc[1, "best_term"] == "P1"
    assert features.loc[0, "best_q"] == pytest.approx(expected[(expected.feature == 0)].q.min())
    assert set(significant[significant.feature == 0].overlap_genes.iloc[0]) <= set(genes[0:10])
    assert features.n_significant.tolist() == [int((exp_sig.feature == f).sum()) for f in range(d)]
    assert features.loc[3, "top_genes"] == [] and pd.isna(features.loc[3, "best_q"])
    assert features.loc[3, "n_firing_positions"] == 0


def test_sparse_sums_merge_across_compactions():
    from ctrace.annotate import _SparseSums

    rng = np.random.default_rng(1)
    acc, dense_sum, dense_count = _SparseSums(), np.zeros(50), np.zeros(50, np.int64)
    for step in range(20):
        keys = np.unique(rng.integers(0, 50, 15))
        sums, counts = rng.uniform(size=len(keys)), rng.integers(1, 4, len(keys))
        acc.add(keys, sums, counts)
        np.add.at(dense_sum, keys, sums)
        np.add.at(dense_count, keys, counts)
        if step % 3 == 0:
            acc.compact()
    acc.compact()
    np.testing.assert_array_equal(acc.keys, np.flatnonzero(dense_count))
    np.testing.assert_allclose(acc.sums, dense_sum[acc.keys])
    np.testing.assert_array_equal(acc.counts, dense_count[acc.keys])
