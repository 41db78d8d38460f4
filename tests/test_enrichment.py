"""Hypergeometric enrichment vs scipy, BH vs statsmodels, GMT parsing and the bundled libraries."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy.stats import fisher_exact, hypergeom
from statsmodels.stats.multitest import multipletests

from ctrace.enrichment import bh_fdr, hypergeom_enrichment, read_gmt
from ctrace.errors import CtraceInputError
from ctrace.genesets import bundled_gmt_paths

BACKGROUND = {f"G{i}" for i in range(100)}
SETS = {
    "A": {f"G{i}" for i in range(10)} | {"OUTSIDE1", "OUTSIDE2"},  # 10 in background
    "B": {f"G{i}" for i in range(5, 25)},  # 20
    "C": {f"G{i}" for i in range(50, 56)},  # 6, no overlap with the query
    "TINY": {"G1", "G2", "G3"},  # below min_size
    "HUGE": {f"G{i}" for i in range(90)},  # above max_size=80
    "MOSTLY_OUT": {"G1", "G2", "X1", "X2", "X3", "X4", "X5"},  # 2 in background: below min_size
}
QUERY = ["G0", "G1", "G2", "G3", "G7", "G12", "G30", "NOT_IN_BG"]  # 7 in background


def test_hypergeom_matches_scipy_and_fisher():
    frame = hypergeom_enrichment(QUERY, SETS, BACKGROUND, min_size=5, max_size=80).set_index("term")
    assert set(frame.index) == {"A", "B", "C"}
    M, N = 100, 7
    expected = {"A": (10, 5), "B": (20, 2), "C": (6, 0)}
    for term, (n, a) in expected.items():
        row = frame.loc[term]
        assert (row.term_size, row.overlap) == (n, a)
        assert row.p_value == pytest.approx(hypergeom.sf(a - 1, M, n, N), rel=1e-12)
        table = [[a, N - a], [n - a, M - n - N + a]]
        assert row.p_value == pytest.approx(fisher_exact(table, alternative="greater")[1], rel=1e-9)
    assert frame.loc["A"].overlap_genes == ["G0", "G1", "G2", "G3", "G7"]
    assert frame.loc["B"].overlap_genes == ["G12", "G7"]
    assert frame.loc["C"].p_value == 1.0
    assert list(frame["p_value"]) == sorted(frame["p_value"])


def test_min_overlap_drops_zero_overlap_terms():
    frame = hypergeom_enrichment(QUERY, SETS, BACKGROUND, max_size=80, min_overlap=1)
    assert set(frame["term"]) == {"A", "B"}


def test_many_random_fixtures_match_scipy():
    rng = np.random.default_rng(0)
    genes = np.array([f"g{i}" for i in range(300)])
    background = set(genes[:250])
    sets = {f"S{j}": set(rng.choice(genes, rng.integers(3, 60), replace=False)) for j in range(40)}
    query = set(rng.choice(genes, 25, replace=False))
    frame = hypergeom_enrichment(query, sets, background, min_size=5, max_size=500)
    n_query = len(query & background)
    for row in frame.itertuples():
        restricted = sets[row.term] & background
        assert row.term_size == len(restricted)
        assert row.overlap == len(restricted & query)
        assert row.p_value == pytest.approx(hypergeom.sf(row.overlap - 1, 250, row.term_size, n_query), rel=1e-10)


def test_bh_matches_statsmodels():
    rng = np.random.default_rng(1)
    for p in (rng.uniform(size=200), rng.uniform(size=50) ** 4, np.array([0.01, 0.01, 0.02, 1.0, 1.0, 0.5]),
              np.array([0.03])):
        np.testing.assert_allclose(bh_fdr(p), multipletests(p, method="fdr_bh")[1], rtol=1e-12)


def test_bh_with_implicit_unit_p_values():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=30) ** 3
    padded = np.concatenate([p, np.ones(70)])
    np.testing.assert_allclose(bh_fdr(p, n_tests=100), multipletests(padded, method="fdr_bh")[1][:30], rtol=1e-12)
    assert bh_fdr(np.zeros(0)).shape == (0,)
    with pytest.raises(ValueError):
        bh_fdr([0.1, np.nan])
    with pytest.raises(ValueError):
        bh_fdr([0.1, 0.2], n_tests=1)


def test_read_gmt(tmp_path):
    path = tmp_path / "ok.gmt"
    path.write_text("SET1\tdesc\tA\tB\tC\t\r\n\nSET2\t\tB\tD\n")
    assert read_gmt(path) == {"SET1": frozenset("ABC"), "SET2": frozenset("BD")}


@pytest.mark.parametrize(
    "content, line, what",
    [
        ("SET1\tdesc\tA\nSET2 only a name\n", 2, "malformed"),
        ("SET1\tdesc\tA\n\nSET2\tdesc\n", 3, "malformed"),
        ("\tdesc\tA\tB\n", 1, "malformed"),
        ("SET1\tdesc\tA\nSET1\tdesc\tB\n", 2, "appears twice"),
    ],
)
def test_read_gmt_errors_name_file_and_line(tmp_path, content, line, what):
    path = tmp_path / "bad.gmt"
    path.write_text(content)
    with pytest.raises(CtraceInputError, match=f"bad.gmt, line {line}: .*{what}"):
        read_gmt(path)


def test_read_gmt_missing_empty_binary(tmp_path):
    with pytest.raises(CtraceInputError, match="not found"):
        read_gmt(tmp_path / "missing.gmt")
    (tmp_path / "empty.gmt").write_text("\n")
    with pytest.raises(CtraceInputError, match="no gene sets"):
        read_gmt(tmp_path / "empty.gmt")
    (tmp_path / "bin.gmt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CtraceInputError, match="UTF-8"):
        read_gmt(tmp_path / "bin.gmt")


def test_bundled_libraries():
    paths = bundled_gmt_paths()
    assert set(paths) == {"hallmark", "reactome", "go_bp"}
    expected = {"hallmark": (50, "53adce93e699353f"), "reactome": (2546, "d77319f8c7f7dc83"),
                "go_bp": (6036, "5987ce789053fdd5")}
    for name, path in paths.items():
        n_sets, sha_prefix = expected[name]
        assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(sha_prefix)
        assert len(read_gmt(path)) == n_sets
    assert (paths["hallmark"].parent / "ATTRIBUTION.md").is_file()
