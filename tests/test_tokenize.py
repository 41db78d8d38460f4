"""Tokenization against hand computations and independent re-implementations of the upstream rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from ctrace.errors import CtraceInputError
from ctrace.tokenize import (
    TokenizedCells,
    check_raw_counts,
    scgpt_bin,
    tokenize_geneformer,
    tokenize_scgpt,
)
from ctrace.vocab import (
    GeneformerDictionaries,
    load_geneformer_dictionaries,
    load_scgpt_vocab,
    write_geneformer_dictionaries,
)
from model_fixtures import (
    REAL_GENEFORMER_DICTS,
    REAL_SCGPT_CENSUS_VOCAB,
    have_real_geneformer_dicts,
    have_real_scgpt_vocab,
)

G = [f"ENSG0000000000{i}" for i in range(1, 7)]  # G[0] = ENSG…01 … G[5] = ENSG…06
MEDIANS = [1.0, 2.0, 0.5, 4.0, 1.0, 3.0]


# ---------------------------------------------------------------------------------------------------
# tiny Geneformer dictionaries written in the official format and loaded back
# ---------------------------------------------------------------------------------------------------
def _tiny_dicts(tmp_path: Path, version: str) -> GeneformerDictionaries:
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if version == "V2" else ["<pad>", "<mask>"]
    token_dict = {s: i for i, s in enumerate(specials)}
    token_dict.update({g: len(specials) + i for i, g in enumerate(G)})
    medians = dict(zip(G, MEDIANS))
    medians["ENSG00000000099"] = 1.0  # has a median but no token: must be ignored
    names = {"GENEA": G[0], "GeneB": G[1], "GENEC": G[2], "GENED": G[3], "GENEE": G[4], "GENEF": G[5]}
    mapping = {g: g for g in G}
    mapping.update({k.upper(): v for k, v in names.items()})
    mapping["ENSG00000000011"] = G[0]  # an alternate ID collapsed onto G[0]
    mapping["ALIASC"] = G[2]  # an alias of GENEC
    mapping["ENSG00000000099"] = "ENSG00000000099"  # target not in the token dict
    dicts = GeneformerDictionaries(version, token_dict, medians, names, mapping)
    write_geneformer_dictionaries(tmp_path, dicts)
    return load_geneformer_dictionaries(tmp_path, version)


# columns: G0 (versioned ID), G1 (exact-case symbol), G2 (alias, lower case), G3, G0 again (alternate
# ID → summed with column 0), unknown symbol, an ID whose target has no token.
GENE_COLS = ["ENSG00000000001.5", "GeneB", "aliasc", "ENSG00000000004", "ENSG00000000011", "UNKNOWN",
             "ENSG00000000099"]
COUNTS = np.array(
    [
        [2, 4, 3, 12, 3, 5, 7],  # G0 = 5 → 500; G1 → 200; G2 → 600; G3 → 300   (n_counts 100)
        [0, 0, 0, 0, 0, 9, 4],  # no token gene → dropped
        [1, 0, 0, 2, 0, 0, 0],  # G0 → 1000; G3 → 500                             (n_counts 10)
    ],
    dtype=np.float32,
)
N_COUNTS = np.array([100, 50, 10])


def test_geneformer_v2_hand_computed(tmp_path):
    dicts = _tiny_dicts(tmp_path, "V2")
    cells, report = tokenize_geneformer(sp.csr_matrix(COUNTS), GENE_COLS, N_COUNTS, dicts, ["a", "b", "c"])
    tok = {g: dicts.token_dict[g] for g in G}
    assert len(cells) == 2
    assert list(cells.obs_names) == ["a", "c"]
    # values 600 (G2) > 500 (G0, summed over two columns) > 300 (G3) > 200 (G1); <cls>=2 first, <eos>=3 last
    assert cells.cell(0).input_ids.tolist() == [2, tok[G[2]], tok[G[0]], tok[G[3]], tok[G[1]], 3]
    assert cells.cell(1).input_ids.tolist() == [2, tok[G[0]], tok[G[3]], 3]
    assert cells.cell(0).input_ids.dtype == np.int64 and cells.cell(0).values is None
    assert cells.values is None and cells.ids.dtype == np.int32
    assert report.n_cells_in == 3 and report.n_cells_kept == 2
    assert report.n_genes_in == 7 and report.n_genes_matched == 5
    assert report.pct_genes_matched == pytest.approx(100 * 5 / 7)
    assert (report.min_tokens_per_cell, report.max_tokens_per_cell) == (4, 6)
    assert report.median_tokens_per_cell == 5.0 and report.mean_tokens_per_cell == 5.0
    assert report.tokenizer == "geneformer-V2" and report.to_dict()["n_cells_kept"] == 2


def test_geneformer_median_division_decides_order(tmp_path):
    """Raw counts G3 (12) > G2 (3) but G2's median is 8× smaller: the median division must flip them."""
    dicts = _tiny_dicts(tmp_path, "V2")
    counts = np.array([[0, 0, 3, 12, 0, 0, 0]])
    cells, _ = tokenize_geneformer(counts, GENE_COLS, [15], dicts, ["x"])
    assert cells.cell(0).input_ids.tolist() == [2, dicts.token_dict[G[2]], dicts.token_dict[G[3]], 3]


def test_geneformer_truncation_and_v1(tmp_path):
    v2 = _tiny_dicts(tmp_path / "v2", "V2")
    cells, report = tokenize_geneformer(COUNTS, GENE_COLS, N_COUNTS, v2, ["a", "b", "c"], max_tokens=4)
    assert cells.cell(0).input_ids.tolist() == [2, v2.token_dict[G[2]], v2.token_dict[G[0]], 3]
    assert cells.cell(1).input_ids.tolist() == [2, v2.token_dict[G[0]], v2.token_dict[G[3]], 3]
    assert report.n_cells_truncated == 1 and report.max_tokens_per_cell == 4

    v1 = _tiny_dicts(tmp_path / "v1", "V1")
    cells, report = tokenize_geneformer(COUNTS, GENE_COLS, N_COUNTS, v1, ["a", "b", "c"])
    t = v1.token_dict  # genes are 2..7: no <cls>/<eos> in V1
    assert cells.cell(0).input_ids.tolist() == [t[G[2]], t[G[0]], t[G[3]], t[G[1]]]
    assert cells.cell(1).input_ids.tolist() == [t[G[0]], t[G[3]]]
    assert report.tokenizer == "geneformer-V1"
    cells, _ = tokenize_geneformer(COUNTS, GENE_COLS, N_COUNTS, v1, ["a", "b", "c"], max_tokens=3)
    assert cells.cell(0).input_ids.tolist() == [t[G[2]], t[G[0]], t[G[3]]]


def test_geneformer_ties_follow_upstream_column_order(tmp_path):
    """Upstream appends summed duplicate IDs after the unique ones, then ranks with np.argsort(-v)."""
    dicts = _tiny_dicts(tmp_path, "V2")
    # G0 = 1 + 1 (two columns) → 2/100·1e4/1 = 200; G1 = 4/100·1e4/2 = 200: an exact tie
    counts = np.array([[1, 4, 0, 0, 1, 0, 0]])
    cells, _ = tokenize_geneformer(counts, GENE_COLS, [100], dicts, ["x"])
    upstream_cols = [G[1], G[0]]  # unique IDs first (G1), then the collapsed duplicate (G0)
    v = np.array([4 / 100 * 10000 / 2.0, 2 / 100 * 10000 / 1.0])
    expected = [dicts.token_dict[upstream_cols[i]] for i in np.argsort(-v)]
    assert cells.cell(0).input_ids.tolist() == [2, *expected, 3]


def test_geneformer_n_counts_is_a_per_cell_scale(tmp_path):
    """n_counts scales a whole cell: ranks do not change; too small a total is rejected."""
    dicts = _tiny_dicts(tmp_path, "V2")
    a, _ = tokenize_geneformer(COUNTS, GENE_COLS, N_COUNTS, dicts, ["a", "b", "c"])
    b, _ = tokenize_geneformer(COUNTS, GENE_COLS, N_COUNTS * 7, dicts, ["a", "b", "c"])
    np.testing.assert_array_equal(a.ids, b.ids)
    with pytest.raises(CtraceInputError, match="n_counts"):
        tokenize_geneformer(COUNTS, GENE_COLS, [30, 50, 10], dicts, ["a", "b", "c"])  # row 0 sums to 36
    with pytest.raises(CtraceInputError, match="n_counts_C: 2 values"):
        tokenize_geneformer(COUNTS, GENE_COLS, [100, 50], dicts, ["a", "b", "c"])


def test_geneformer_chunking_and_input_types_do_not_matter(tmp_path):
    dicts = _tiny_dicts(tmp_path, "V2")
    rng = np.random.default_rng(3)
    counts = rng.poisson(0.8, size=(37, 7)).astype(np.float64)
    n_counts = counts.sum(1) + 5
    names = [f"c{i}" for i in range(37)]
    ref, _ = tokenize_geneformer(counts, GENE_COLS, n_counts, dicts, names)
    inputs = [(sp.csr_matrix(counts), 1), (sp.csc_matrix(counts), 5), (sp.csr_array(counts), 512),
              (counts.astype(np.int32), 4)]
    for matrix, chunk in inputs:
        out, _ = tokenize_geneformer(matrix, GENE_COLS, n_counts, dicts, names, chunk_size=chunk)
        np.testing.assert_array_equal(out.ids, ref.ids)
        np.testing.assert_array_equal(out.offsets, ref.offsets)
        np.testing.assert_array_equal(out.obs_names, ref.obs_names)


# ---------------------------------------------------------------------------------------------------
# scGPT
# ---------------------------------------------------------------------------------------------------
def _tiny_vocab() -> dict[str, int]:
    genes = ["GAPDH", "ACTB", "CD3E", "MALAT1", "B2M"] + [f"G{i}" for i in range(60)]
    vocab = {g: i for i, g in enumerate(genes)}
    for s in ("<pad>", "<cls>", "<eoc>"):
        vocab[s] = len(vocab)
    return vocab


def test_scgpt_hand_computed_bins():
    """n_bins 5 → edges = quantiles at 0, 1/3, 2/3, 1 of [1, 3, 4, 6, 10] = [1, 3.333, 5.333, 10]."""
    vocab = _tiny_vocab()
    symbols = ["ACTB", "NOT_IN_VOCAB", "GAPDH", "CD3E", "MALAT1", "B2M", "<pad>"]
    counts = sp.csr_matrix(np.array([[3, 99, 1, 4, 10, 6, 50]]))
    cells, report = tokenize_scgpt(counts, symbols, vocab, ["x"], n_bins=5)
    cell = cells.cell(0)
    # unknown gene (and a gene column literally called "<pad>") dropped; <cls> first, column order kept
    assert cell.input_ids.tolist() == [vocab["<cls>"], vocab["ACTB"], vocab["GAPDH"], vocab["CD3E"],
                                       vocab["MALAT1"], vocab["B2M"]]
    # left digitize: 3→1, 1→1, 4→2, 10→4, 6→3 (1 and 10 sit on one edge each: ceil(left − u) = left)
    assert cell.values.tolist() == [-2.0, 1.0, 1.0, 2.0, 4.0, 3.0]
    assert cell.values.dtype == np.float32
    assert report.n_genes_matched == 5 and report.n_genes_in == 7 and report.seed == 0


def test_scgpt_default_bins_of_distinct_counts():
    """With 50 distinct values the 50 edges are the values themselves, so bin = rank (1..50)."""
    vocab = _tiny_vocab()
    counts = np.random.default_rng(0).permutation(np.arange(1, 51))[None, :]
    symbols = [f"G{i}" for i in range(50)]
    cells, _ = tokenize_scgpt(counts, symbols, vocab, ["x"])
    cell = cells.cell(0)
    assert cell.input_ids.tolist() == [vocab["<cls>"]] + [vocab[s] for s in symbols]
    assert cell.values[1:].tolist() == counts[0].astype(float).tolist()


def test_scgpt_seeded_tie_breaking():
    vocab = _tiny_vocab()
    row = np.array([[1] * 20 + [5, 9]])
    symbols = [f"G{i}" for i in range(22)]
    a, _ = tokenize_scgpt(row, symbols, vocab, ["x"], seed=7)
    b, _ = tokenize_scgpt(row, symbols, vocab, ["x"], seed=7)
    np.testing.assert_array_equal(a.values, b.values)
    # the 20 tied ones sit on edges 0..~44: each gets a random bin in 1..left
    edges = np.quantile(row[0].astype(np.float32), np.linspace(0, 1, 50))
    left = int(np.digitize(1.0, edges))
    assert set(a.values[1:21].tolist()) <= set(range(1, left + 1))
    others = [tokenize_scgpt(row, symbols, vocab, ["x"], seed=s)[0].values for s in range(8, 12)]
    assert any(not np.array_equal(a.values, o) for o in others)
    # direct check of the per-cell generator: same stream → same bins
    x = row[0, :21]
    np.testing.assert_array_equal(scgpt_bin(x, 51, np.random.default_rng([3, 0])),
                                  scgpt_bin(x, 51, np.random.default_rng([3, 0])))


def test_scgpt_bin_equals_upstream_with_the_same_random_stream():
    """scGPT's binning (preprocess.py `binning` → `_digitize(side="both")`) restated here, driven by the
    legacy global RNG; our Generator on the same MT19937 state must give identical bins."""

    def upstream_binning(row, n_bins):
        row = row.astype(np.float32)  # the collator's expressions tensor is float32
        edges = np.quantile(row, np.linspace(0, 1, n_bins - 1))
        lo, hi = np.digitize(row, edges), np.digitize(row, edges, right=True)
        return np.ceil(np.random.rand(len(row)) * (hi - lo) + lo).astype(np.int64)

    counts = np.random.default_rng(5).negative_binomial(1, 0.3, size=400) + 1  # many ties
    np.random.seed(123)
    state = np.random.get_state(legacy=False)
    expected = upstream_binning(counts, 51)
    bit_gen = np.random.MT19937()
    bit_gen.state = state
    np.testing.assert_array_equal(scgpt_bin(counts, 51, np.random.Generator(bit_gen)), expected)


def test_scgpt_downsampling_keeps_cls_and_length():
    vocab = _tiny_vocab()
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 30, size=(3, 60))
    counts[2, 5:] = 0  # a short cell: not sampled
    symbols = [f"G{i}" for i in range(60)]
    full, _ = tokenize_scgpt(counts, symbols, vocab, list("abc"), max_seq_len=1000, seed=4)
    short, report = tokenize_scgpt(counts, symbols, vocab, list("abc"), max_seq_len=10, seed=4)
    assert short.lengths().tolist() == [10, 10, 6] and report.n_cells_truncated == 2
    for i in range(2):
        ids, vals = short.cell(i).input_ids, short.cell(i).values
        assert ids[0] == vocab["<cls>"] and vals[0] == -2.0 and vocab["<cls>"] not in ids[1:]
        assert len(set(ids[1:].tolist())) == 9
        # binning happened before sampling: every kept gene carries its bin from the full cell
        ref = dict(zip(full.cell(i).input_ids.tolist(), full.cell(i).values.tolist()))
        assert all(ref[t] == v for t, v in zip(ids.tolist(), vals.tolist()))
    np.testing.assert_array_equal(short.cell(2).input_ids, full.cell(2).input_ids)
    # seeded per cell: chunking does not change anything
    again, _ = tokenize_scgpt(counts, symbols, vocab, list("abc"), max_seq_len=10, seed=4, chunk_size=1)
    np.testing.assert_array_equal(again.ids, short.ids)
    np.testing.assert_array_equal(again.values, short.values)


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_errors_are_user_errors(tmp_path):
    dicts = _tiny_dicts(tmp_path, "V2")
    vocab = _tiny_vocab()
    lognorm = sp.csr_matrix(np.log1p(np.array([[1.0, 0, 3], [2, 5, 0]])))
    with pytest.raises(CtraceInputError, match=r"adata\.h5ad:X.*log-normalised\? pass raw integer counts"):
        check_raw_counts(lognorm, "adata.h5ad:X")
    with pytest.raises(CtraceInputError, match="log-normalised"):
        check_raw_counts(np.array([[1, -2], [0, 3]]), "counts")
    check_raw_counts(np.array([[1.0, 0], [0, 3]]), "counts")  # integer-valued floats are fine
    with pytest.raises(CtraceInputError, match="log-normalised"):
        tokenize_scgpt(lognorm, ["GAPDH", "ACTB", "B2M"], vocab, ["a", "b"])
    with pytest.raises(CtraceInputError, match="log-normalised"):
        tokenize_geneformer(lognorm, G[:3], [10, 10], dicts, ["a", "b"])

    counts = np.array([[1, 2, 3]])
    with pytest.raises(CtraceInputError, match=r"none of the 3 genes.*'FOO1', 'FOO2', 'FOO3'.*symbols"):
        tokenize_scgpt(counts, ["FOO1", "FOO2", "FOO3"], vocab, ["a"])
    with pytest.raises(CtraceInputError, match=r"none of the 3 genes.*Ensembl"):
        tokenize_geneformer(counts, ["FOO1", "FOO2", "FOO3"], [6], dicts, ["a"])
    with pytest.raises(CtraceInputError, match=r"gene_symbols: 2 gene identifiers.*3 columns"):
        tokenize_scgpt(counts, ["GAPDH", "ACTB"], vocab, ["a"])
    with pytest.raises(CtraceInputError, match=r"gene_ids: 4 gene identifiers.*3 columns"):
        tokenize_geneformer(counts, G[:4], [6], dicts, ["a"])
    with pytest.raises(CtraceInputError, match="obs_names: 2 names"):
        tokenize_scgpt(counts, ["GAPDH", "ACTB", "B2M"], vocab, ["a", "b"])
    with pytest.raises(CtraceInputError, match="none of the 1 cells"):
        tokenize_scgpt(np.zeros((1, 3)), ["GAPDH", "ACTB", "B2M"], vocab, ["a"])


# ---------------------------------------------------------------------------------------------------
# container
# ---------------------------------------------------------------------------------------------------
def test_tokenized_cells_roundtrip_and_subset(tmp_path):
    cells = TokenizedCells(
        ids=np.array([5, 1, 2, 7, 8, 9], dtype=np.int32),
        offsets=np.array([0, 2, 3, 6]),
        values=np.array([-2, 1, 3, 4, 5, 6], dtype=np.float32),
        obs_names=np.array(["a", "b", "c"]),
    )
    assert len(cells) == 3 and cells.lengths().tolist() == [2, 1, 3]
    assert cells.cell(-1).input_ids.tolist() == [7, 8, 9] and cells.cell(0).values.tolist() == [-2, 1]
    sub = cells.subset([2, 0])
    assert sub.ids.tolist() == [7, 8, 9, 5, 1] and sub.offsets.tolist() == [0, 3, 5]
    assert sub.values.tolist() == [4, 5, 6, -2, 1] and sub.obs_names.tolist() == ["c", "a"]
    masked = cells.subset(np.array([False, True, True]))
    assert masked.ids.tolist() == [2, 7, 8, 9] and masked.obs_names.tolist() == ["b", "c"]
    assert len(cells.subset([])) == 0

    for obj in (cells, TokenizedCells(cells.ids, cells.offsets, None, cells.obs_names)):
        path = tmp_path / "cells.npz"
        obj.save(path)
        back = TokenizedCells.load(path)
        np.testing.assert_array_equal(back.ids, obj.ids)
        np.testing.assert_array_equal(back.offsets, obj.offsets)
        np.testing.assert_array_equal(back.obs_names, obj.obs_names)
        assert (back.values is None) == (obj.values is None)
        if obj.values is not None:
            np.testing.assert_array_equal(back.values, obj.values)
        assert back.ids.dtype == np.int32 and back.offsets.dtype == np.int64
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(CtraceInputError, match="not a tokenized-cells file"):
        TokenizedCells.load(tmp_path / "other.npz")


# ---------------------------------------------------------------------------------------------------
# a real dataset with the real vocabularies, against independent re-implementations
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbmc():
    sc = pytest.importorskip("scanpy")
    adata = sc.datasets.pbmc68k_reduced()
    counts = np.round(np.expm1(adata.raw.X.toarray()) * adata.obs.n_counts.values[:, None] / 1e4)
    return counts, list(adata.raw.var_names), adata.obs.n_counts.values, list(adata.obs_names)


def test_pbmc68k_geneformer_v2_real_dictionaries(pbmc):
    if not have_real_geneformer_dicts():
        pytest.skip(f"{REAL_GENEFORMER_DICTS} absent")
    counts, symbols, n_counts, obs = pbmc
    dicts = load_geneformer_dictionaries(REAL_GENEFORMER_DICTS, "V2")
    cells, report = tokenize_geneformer(sp.csr_matrix(counts), symbols, n_counts, dicts, obs)

    # independent: symbol → ID (exact name table, else upper-cased mapping restricted to token genes)
    tokens, medians = dicts.token_dict, dicts.gene_medians
    canon = []
    for s in symbols:
        gid = dicts.gene_name_id.get(s)
        if gid not in tokens:
            gid = dicts.ensembl_mapping.get(s.upper())
        canon.append(gid if gid in tokens and gid in medians and not gid.startswith("<") else None)
    n_per_id: dict[str, int] = {}
    for gid in canon:
        if gid is not None:
            n_per_id[gid] = n_per_id.get(gid, 0) + 1
    order = [g for g in canon if g is not None and n_per_id[g] == 1]
    order += [g for g in dict.fromkeys(canon) if g is not None and n_per_id[g] > 1]
    assert report.n_genes_matched == sum(g is not None for g in canon) > 600

    kept = 0
    for c in range(counts.shape[0]):
        summed: dict[str, float] = {}
        for j, gid in enumerate(canon):
            if gid is not None:
                summed[gid] = summed.get(gid, 0.0) + float(counts[c, j])
        genes = [g for g in order if summed[g] != 0]
        if not genes:
            continue
        values = np.array([summed[g] / float(n_counts[c]) * 10000 / medians[g] for g in genes])
        ranked = [tokens[genes[i]] for i in np.argsort(-values)][:4094]
        expected = [tokens["<cls>"], *ranked, tokens["<eos>"]]
        assert cells.obs_names[kept] == obs[c]
        assert cells.cell(kept).input_ids.tolist() == expected, f"cell {c}"
        kept += 1
    assert kept == len(cells) == report.n_cells_kept


def test_pbmc68k_scgpt_real_vocab(pbmc):
    if not have_real_scgpt_vocab():
        pytest.skip(f"{REAL_SCGPT_CENSUS_VOCAB} absent")
    counts, symbols, _, obs = pbmc
    vocab = load_scgpt_vocab(REAL_SCGPT_CENSUS_VOCAB)  # appends <pad>, <cls>, <eoc>
    raw = json.loads(REAL_SCGPT_CENSUS_VOCAB.read_text())
    assert (vocab["<pad>"], vocab["<cls>"], vocab["<eoc>"]) == (60694, 60695, 60696)
    cells, report = tokenize_scgpt(sp.csr_matrix(counts[:100]), symbols, vocab, obs[:100], seed=11)

    in_vocab = [j for j, s in enumerate(symbols) if s in raw]
    assert report.n_genes_matched == len(in_vocab) > 600
    assert report.pct_genes_matched == pytest.approx(100 * len(in_vocab) / len(symbols))
    kept = 0
    for c in range(100):
        genes = [j for j in in_vocab if counts[c, j] != 0]
        if not genes:
            continue
        cell = cells.cell(kept)
        assert cell.input_ids.tolist() == [60695] + [raw[symbols[j]] for j in genes]
        # bins: on no tied edges the bin is the left-digitize index; on ties it lies in (right, left]
        x = np.array([counts[c, j] for j in genes], dtype=np.float32)
        edges = np.quantile(x, np.linspace(0, 1, 50))
        left, right = np.digitize(x, edges), np.digitize(x, edges, right=True)
        b = cell.values[1:]
        assert cell.values[0] == -2.0
        assert np.all((b <= left) & (b >= np.minimum(left, right + 1)))
        assert 1 <= b.min() and b.max() <= 50
        kept += 1
    assert kept == len(cells)
    assert math.isclose(report.median_tokens_per_cell, float(np.median(cells.lengths())))
