"""Coherence statistic and the degree-preserving rewiring null (method.md §8.1)."""

import itertools
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from ctrace.coherence import coherence, rewire_edges, term_sets
from ctrace.errors import CtraceInputError


def random_edges(rng, blocks, n_src=30, n_tgt=200, n_edges=400, condition="K562"):
    """Edges with heavy-tailed degrees in each (source_layer, target_layer) block, no duplicates."""
    rows = []
    for sl, tl in blocks:
        src_w = rng.pareto(1.5, n_src) + 0.1
        tgt_w = rng.pareto(1.5, n_tgt) + 0.1
        seen = set()
        while len(seen) < n_edges:
            s = int(rng.choice(n_src, p=src_w / src_w.sum()))
            t = int(rng.choice(n_tgt, p=tgt_w / tgt_w.sum()))
            seen.add((s, t))
        for s, t in sorted(seen):
            d = float(rng.normal(0, 1.5))
            rows.append((condition, sl, s, tl, t, d))
    e = pd.DataFrame(rows, columns=["condition", "source_layer", "source_feature", "target_layer",
                                    "target_feature", "cohens_d"])
    e["ablation_effect_sign"] = np.where(e["cohens_d"] < 0, "negative", "positive")
    return e


def degree_counters(edges):
    out = {}
    for key, block in edges.groupby(["condition", "source_layer", "target_layer"]):
        out[key] = (Counter(block["source_feature"]), Counter(block["target_feature"]))
    return out


def test_rewire_keeps_every_degree_within_blocks_and_creates_no_duplicates():
    rng = np.random.default_rng(1)
    edges = pd.concat([
        random_edges(rng, [(0, 5), (0, 11), (5, 11)], condition="A"),
        random_edges(rng, [(0, 5)], condition="B"),
    ], ignore_index=True)
    rewired = rewire_edges(edges, np.random.default_rng(2), n_swaps_per_edge=10)

    assert degree_counters(rewired) == degree_counters(edges)  # every in/out degree, per block
    key = ["condition", "source_layer", "source_feature", "target_layer", "target_feature"]
    assert not rewired.duplicated(key).any()
    # only target_feature moved: every other column stays with its row
    pd.testing.assert_frame_equal(rewired.drop(columns="target_feature"), edges.drop(columns="target_feature"))
    # and the graph really is rewired
    same = pd.merge(edges[key], rewired[key], how="inner")
    assert len(same) < 0.5 * len(edges)


def test_rewire_rejects_duplicate_edges_and_missing_columns():
    e = pd.DataFrame({"source_layer": [0, 0], "source_feature": [1, 1], "target_layer": [5, 5],
                      "target_feature": [2, 2]})
    with pytest.raises(CtraceInputError, match="duplicate"):
        rewire_edges(e, 0)
    with pytest.raises(CtraceInputError, match="target_feature"):
        rewire_edges(e.drop(columns="target_feature"), 0)


def test_rewire_of_a_complete_block_is_the_identity():
    # the only bipartite graph with these degrees is the complete one: nothing may move
    e = pd.DataFrame([(0, s, 5, t) for s in range(3) for t in range(4)],
                     columns=["source_layer", "source_feature", "target_layer", "target_feature"])
    r = rewire_edges(e, 3)
    pd.testing.assert_frame_equal(r, e)


def test_rewiring_samples_every_graph_with_the_degrees_equally_often():
    """A null that favours some graphs biases every p-value built on it: enumerate all 68 bipartite graphs
    with this small block's degrees and test the rewirings' frequencies against uniform (χ²)."""
    from scipy.stats import chisquare

    pairs = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 3), (2, 1), (3, 4)]
    e = pd.DataFrame([(0, s, 1, t) for s, t in pairs],
                     columns=["source_layer", "source_feature", "target_layer", "target_feature"])
    out_deg, in_deg = np.bincount(e.source_feature, minlength=4), np.bincount(e.target_feature, minlength=5)
    graphs = [rows for rows in itertools.product(*[itertools.combinations(range(5), k) for k in out_deg])
              if (np.bincount([t for row in rows for t in row], minlength=5) == in_deg).all()]
    index = {rows: i for i, rows in enumerate(graphs)}
    assert len(graphs) == 68
    rng = np.random.default_rng(0)
    counts = np.zeros(len(graphs), dtype=np.int64)
    for _ in range(3000):
        r = rewire_edges(e, rng, n_swaps_per_edge=5)
        counts[index[tuple(tuple(sorted(r.target_feature[r.source_feature == s])) for s in range(4))]] += 1
    assert counts.min() > 0
    assert chisquare(counts).pvalue > 1e-3, counts  # the previous sampler: p = 4e-11


def planted_terms(rng, edges, n_terms=25):
    nodes = set(zip(edges.source_layer, edges.source_feature)) | set(zip(edges.target_layer, edges.target_feature))
    return {n: frozenset({("GO", f"T{rng.integers(n_terms)}")}) for n in sorted(nodes)}


def test_empirical_p_counts_the_observation_among_the_null():
    from ctrace.coherence import empirical_p

    null = np.array([0.1, 0.5, 0.5, 0.9, np.nan])
    assert empirical_p(0.5, null) == 4 / 5  # (1 + #{0.5, 0.5, 0.9}) / (1 + 4 finite draws)
    assert empirical_p(1.0, null) == 1 / 5
    assert empirical_p(0.0, null) == 1.0
    assert np.isnan(empirical_p(np.nan, null))


def test_planted_coherence_is_detected():
    rng = np.random.default_rng(5)
    edges = random_edges(rng, [(0, 5), (5, 11)], n_edges=300)
    terms = planted_terms(rng, edges)
    # plant: half of the edges get a target whose term equals the source's term (copy the term over)
    planted = dict(terms)
    for i in rng.choice(len(edges), len(edges) // 2, replace=False):
        r = edges.iloc[i]
        planted[(r.target_layer, r.target_feature)] = planted[(r.source_layer, r.source_feature)]
    res = coherence(edges, planted, n_permutations=200, seed=0)
    assert res.n_edges_tested == len(edges)
    assert res.observed > 0.2
    assert res.fold > 1.5
    assert (res.null_values >= res.observed).sum() == 0 and res.p_value == 1 / 201  # (1 + 0) / (1 + 200)
    assert res.null_values.shape == (200,)
    assert 0 < res.swap_acceptance <= 1


def test_random_terms_give_fold_near_one():
    rng = np.random.default_rng(7)
    edges = random_edges(rng, [(0, 5), (5, 11)], n_edges=400)
    terms = planted_terms(rng, edges, n_terms=6)  # P(share) ≈ 1/6 by chance
    res = coherence(edges, terms, n_permutations=200, seed=1)
    assert 0.85 < res.fold < 1.15
    assert res.p_value > 0.01
    assert abs(res.null_mean - 1 / 6) < 0.04


def test_unannotated_endpoints_are_not_tested_and_term_sets_from_table():
    sig = pd.DataFrame({
        "layer": [0, 0, 5, 5, 5], "feature": [1, 1, 2, 3, 4],
        "library": ["GO", "Hallmark", "GO", "Hallmark", "GO"],
        "term": ["A", "H", "A", "X", "B"], "p_value": [1e-5, 1e-3, 1e-4, 1e-3, 1e-2],
        "q_value": [0.001, 0.01, 0.01, 0.02, 0.2],
    })
    ts = term_sets(sig)
    assert ts[(0, 1)] == frozenset({("GO", "A"), ("Hallmark", "H")})
    assert (5, 4) not in ts  # q ≥ 0.05 is dropped
    edges = pd.DataFrame({"source_layer": [0, 0, 0, 0], "source_feature": [1, 1, 1, 9],
                          "target_layer": [5, 5, 5, 5], "target_feature": [2, 3, 4, 2]})
    res = coherence(edges, ts, n_permutations=20, seed=0)
    assert (res.n_edges_total, res.n_edges_tested, res.n_edges_shared) == (4, 2, 1)
    assert res.observed == pytest.approx(0.5)
    d = res.to_dict()
    assert "null_values" not in d and d["n_edges_tested"] == 2
