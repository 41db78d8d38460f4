"""Domains, cross-model consensus with the rewiring null vs the reference's relabelling null, disease OR."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ctrace.consensus import (
    consensus,
    disease_domains,
    disease_enrichment,
    domain_pairs,
    domains,
    read_gmt,
    relabel_null,
)
from ctrace.errors import CtraceInputError

COLS = ["source_layer", "source_feature", "target_layer", "target_feature"]


def test_domain_is_most_significant_term_ties_by_name():
    sig = pd.DataFrame({
        "layer": [0, 0, 0, 5, 5, 7],
        "feature": [1, 1, 1, 2, 2, 3],
        "library": ["GO", "Hallmark", "GO", "GO", "Reactome", "GO"],
        "term": ["b_term", "a_term", "c_term", "z", "y", "w"],
        "p_value": [1e-6, 1e-6, 1e-3, 1e-8, 1e-4, 0.01],
        "q_value": [1e-4, 1e-4, 0.01, 1e-6, 0.01, 0.2],
    })
    d = domains(sig)
    assert d == {(0, 1): "a_term", (5, 2): "z"}  # tie at p=1e-6 → "a_term"; (7, 3) not significant
    with pytest.raises(CtraceInputError, match="p_value"):
        domains(sig.drop(columns="p_value"))


def test_domain_pairs_count_only_edges_with_both_ends_annotated():
    edges = pd.DataFrame([(0, 1, 5, 1), (0, 1, 5, 2), (0, 2, 5, 1), (0, 3, 5, 1)], columns=COLS)
    dom = {(0, 1): "A", (0, 2): "A", (5, 1): "B"}  # (5, 2) and (0, 3) unannotated
    assert domain_pairs(edges, dom) == Counter({("A", "B"): 2})


def model_edges(rng, node_domain, n_random, planted, n_src=60, n_tgt=300):
    """Random edges layer 0 → 5 plus, for each planted (domain_s, domain_t), 3 edges realising it."""
    by_dom = {}
    for (layer, f), d in node_domain.items():
        by_dom.setdefault((layer, d), []).append(f)
    edges = set()
    while len(edges) < n_random:
        edges.add((0, int(rng.integers(n_src)), 5, int(rng.integers(n_tgt))))
    for ds, dt in planted:
        for _ in range(3):
            edges.add((0, int(rng.choice(by_dom[(0, ds)])), 5, int(rng.choice(by_dom[(5, dt)]))))
    return pd.DataFrame(sorted(edges), columns=COLS)


def test_planted_consensus_pairs_are_detected():
    rng = np.random.default_rng(11)
    n_dom = 100
    dom_a = {(0, f): f"D{rng.integers(n_dom)}" for f in range(60)} | {(5, f): f"D{rng.integers(n_dom)}" for f in range(300)}
    dom_b = {(0, f): f"D{rng.integers(n_dom)}" for f in range(60)} | {(5, f): f"D{rng.integers(n_dom)}" for f in range(300)}
    present = lambda dom, layer: sorted({d for (l, _), d in dom.items() if l == layer})  # noqa: E731
    src_ok = sorted(set(present(dom_a, 0)) & set(present(dom_b, 0)))
    tgt_ok = sorted(set(present(dom_a, 5)) & set(present(dom_b, 5)))
    planted = sorted({(str(rng.choice(src_ok)), str(rng.choice(tgt_ok))) for _ in range(15)})
    edges_a = model_edges(rng, dom_a, 150, planted)
    edges_b = model_edges(rng, dom_b, 150, planted)
    res = consensus(edges_a, dom_a, edges_b, dom_b, n_permutations=200, seed=0)
    assert set(planted) <= set(res.shared_pairs)
    assert res.observed == len(res.shared_pairs) >= len(planted)
    assert res.fold > 2
    assert (res.null_values >= res.observed).sum() == 0 and res.p_value == 1 / 201  # (1 + 0) / (1 + 200)
    assert res.relabel.n_permutations == 200
    d = res.to_dict()
    assert d["observed"] == res.observed and "relabel" in d and "null_values" not in d


def test_relabel_null_is_inflated_on_popularity_skewed_domains():
    """Two unrelated models whose features mostly carry a few very popular domains.

    Nothing is shared beyond popularity, so the rewiring null (which keeps every feature's domain and
    degree) must expect about the observed overlap (fold ≈ 1); the relabelling null sends popular domains
    to random, mostly rare names and expects far less: its fold is inflated.
    """
    rng = np.random.default_rng(3)
    popular, rare = [f"P{i}" for i in range(4)], [f"R{i}" for i in range(150)]

    def draw_domains():
        out = {}
        for layer, n in ((0, 80), (5, 400)):
            for f in range(n):
                out[(layer, f)] = str(rng.choice(popular)) if rng.random() < 0.8 else str(rng.choice(rare))
        return out

    def draw_edges():
        e = set()
        while len(e) < 600:
            e.add((0, int(rng.integers(80)), 5, int(rng.integers(400))))
        return pd.DataFrame(sorted(e), columns=COLS)

    dom_a, dom_b = draw_domains(), draw_domains()
    edges_a, edges_b = draw_edges(), draw_edges()
    res = consensus(edges_a, dom_a, edges_b, dom_b, n_permutations=100, seed=0)
    assert 0.85 < res.fold < 1.2 and res.p_value > 0.05
    assert res.relabel.expected < 0.5 * res.expected
    assert res.relabel.fold > 2 * res.fold
    assert res.relabel.p_value < 0.05  # the reference's null calls chance overlap "significant"
    # the stand-alone function (same null, on the pair sets) tells the same story
    alone = relabel_null(domain_pairs(edges_a, dom_a), domain_pairs(edges_b, dom_b), n_permutations=300, seed=1)
    assert abs(alone.expected - res.relabel.expected) < 4 * res.relabel.null_sd / np.sqrt(100)
    assert alone.expected < 0.5 * res.expected and alone.fold > 2 * res.fold


def test_relabel_null_hand_example():
    # B's domains {X, Y}; relabelling either keeps (X, Y) or swaps to (Y, X): expected overlap 0.5
    res = relabel_null({("X", "Y")}, {("X", "Y")}, n_permutations=400, seed=0)
    assert res.expected == pytest.approx(0.5, abs=0.08)
    assert res.fold == pytest.approx(1 / res.expected)


def test_disease_enrichment_hand_computed():
    a = {("D1", "x"), ("y", "D2"), ("x", "y"), ("u", "v"), ("D1", "D2")}
    b = Counter({("D1", "x"): 3, ("y", "D2"): 1, ("u", "w"): 2, ("D1", "D2"): 1, ("q", "r"): 1})
    # universe = a ∪ b = 7 pairs; disease (either end in {D1, D2}): (D1,x) (y,D2) (D1,D2) all consensus
    # others: (x,y) a only, (u,v) a only, (u,w) b only, (q,r) b only → none consensus
    res = disease_enrichment(a, b, {"D1", "D2"})
    np.testing.assert_array_equal(res.table, [[3, 0], [0, 4]])
    expected = stats.fisher_exact([[3, 0], [0, 4]], alternative="greater")
    assert res.p_value == pytest.approx(expected.pvalue)
    assert res.odds_ratio == float("inf")
    odds, p, table = res  # unpacks as a 3-tuple
    both = disease_enrichment(a, b, {"D1", "D2"}, rule="both")
    np.testing.assert_array_equal(both.table, [[1, 0], [2, 4]])
    with pytest.raises(CtraceInputError):
        disease_enrichment(a, b, {"D1"}, rule="any")


def test_disease_domains_from_gmt(tmp_path):
    gmt = tmp_path / "disease.gmt"
    gmt.write_text("LEUKEMIA\tna\tG1\tG2\tG3\tG4\tG5\nOTHER_DISEASE\tna\tZ1\tZ2\n")
    background = [f"G{i}" for i in range(1, 6)] + [f"B{i}" for i in range(200)]
    domain_genes = {
        "heme_term": ["G1", "G2", "G3", "G4", "B1"],     # 4 of 5 leukemia genes: enriched
        "random_term": ["B2", "B3", "B4", "B5", "G1"],   # overlap 1 < min_overlap
        "OTHER_DISEASE": ["B7", "B8"],                   # itself a disease set → disease domain
    }
    assert read_gmt(gmt)["LEUKEMIA"] == frozenset({"G1", "G2", "G3", "G4", "G5"})
    out = disease_domains(domain_genes, gmt, background=background)
    assert out == {"heme_term", "OTHER_DISEASE"}
    # BH, not raw p: one test with p ≈ 0.008 < 0.05 among 31 (30 disease sets it does not overlap) has q ≈ 0.24
    from scipy import stats as sps
    from statsmodels.stats.multitest import multipletests

    universe = [f"D{i}" for i in range(10)] + [f"B{i}" for i in range(200)]
    weak = {"weak_term": ["D0", "D1", "D2"] + [f"B{i}" for i in range(7)]}
    sets = {"DISEASE": [f"D{i}" for i in range(10)], **{f"UNRELATED{j}": [f"B{100 + 3 * j + i}" for i in range(3)]
                                                          for j in range(30)}}
    p = sps.hypergeom.sf(2, len(universe), 10, 10)
    q = multipletests([p] + [1.0] * 30, method="fdr_bh")[1][0]
    assert p < 0.05 <= q
    assert disease_domains(weak, sets, background=universe) == set()
    assert disease_domains(weak, {"DISEASE": sets["DISEASE"]}, background=universe) == {"weak_term"}  # 1 test: q = p
    bad = tmp_path / "bad.gmt"
    bad.write_text("only_name\n")
    with pytest.raises(CtraceInputError, match="line 1"):
        read_gmt(bad)


def test_relabel_null_permutes_only_the_domains_of_model_b():
    """B = {X→Y}: its domains are {X, Y}, so the two bijections give X→Y and Y→X, both in A: every draw
    overlaps A in exactly 1 pair. Permuting all domains (Z too) would give (X→Y, Y→X, Z→X of the 6 ordered
    pairs) an expected overlap of 0.5."""
    pairs_a = {("X", "Y"), ("Y", "X"), ("Z", "X")}
    res = relabel_null(pairs_a, {("X", "Y")}, n_permutations=50, seed=0)
    assert np.all(res.null_values == 1.0) and res.expected == 1.0
    assert res.fold == 1.0 and res.p_value == 1.0
