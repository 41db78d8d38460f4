"""Gene-level validation: Replogle-layout perturbation tables, directional accuracy, TRRUST precision."""

import math

import anndata
import numpy as np
import pandas as pd
import pytest

from ctrace.errors import CtraceInputError
from ctrace.validation import (
    accuracy_frame,
    directional_accuracy,
    gene_pairs_from_edges,
    load_perturbation_table,
    load_tf_targets,
    tf_target_precision,
)
from model_fixtures import SHARED_DATA

TRRUST_REAL = SHARED_DATA / "trrust_rawdata.human.tsv"

MEASURED = ["GA", "GB", "GC", "GD"]
ENSG = [f"ENSG0000000000{i}" for i in range(len(MEASURED))]


def replogle_bulk(path, X, perturbed, extra_obs=None, var=None):
    """Write an .h5ad in the layout of Replogle 2022's *_bulk_01.h5ad files.

    obs index 'gene_transcript' = '<id>_<GENE>_<guide>_<ENSG>' (controls: '<id>_non-targeting_…'),
    obs core_control / num_cells_filtered, var index = Ensembl id with a gene_name column.
    """
    index = []
    for i, (gene, guide) in enumerate(perturbed):
        if gene == "non-targeting":
            index.append(f"{10000 + i}_non-targeting_non-targeting_non-targeting")
        else:
            index.append(f"{i}_{gene}_{guide}_ENSG{9000 + i:011d}")
    obs = pd.DataFrame({"core_control": [g == "non-targeting" for g, _ in perturbed],
                        "num_cells_filtered": np.full(len(perturbed), 100)},
                       index=pd.Index(index, name="gene_transcript"))
    if extra_obs is not None:
        for k, v in extra_obs.items():
            obs[k] = v
    if var is None:
        var = pd.DataFrame({"gene_name": MEASURED}, index=pd.Index(ENSG, name="gene_id"))
    anndata.AnnData(X=np.asarray(X, dtype=np.float32), obs=obs, var=var).write_h5ad(path)
    return path


def test_normalized_bulk_layout_loads(tmp_path):
    X = [[-2.0, 0.5, 0.0, 1.0],   # GA, guide P1
         [-1.0, 1.5, 0.2, 3.0],   # GA, guide P2 → averaged with P1
         [0.3, -4.0, -0.1, 0.0],  # GB
         [0.1, -0.1, 0.05, 0.0],  # control
         [0.0, 0.1, -0.05, 0.0]]  # control
    path = replogle_bulk(tmp_path / "K562_essential_normalized_bulk_01.h5ad", X,
                         [("GA", "P1"), ("GA", "P2"), ("GB", "P1P2"), ("non-targeting", ""), ("non-targeting", "")])
    table = load_perturbation_table(path)
    assert table.cell_lines == ["K562"]
    assert table.value_kind["K562"] == "as_is" and table.n_controls["K562"] == 2
    frame = table.lfc["K562"]
    assert list(frame.index) == ["GA", "GB"] and list(frame.columns) == MEASURED
    np.testing.assert_allclose(frame.loc["GA"].to_numpy(), [-1.5, 1.0, 0.1, 2.0], rtol=1e-6)
    np.testing.assert_allclose(table.lookup("K562", ["GB", "GA", "ZZ"], ["GB", "GD", "GA"]), [-4.0, 2.0, np.nan])


def test_raw_bulk_gives_log2_ratio_to_control_mean(tmp_path):
    X = np.array([[10.0, 20.0, 30.0, 40.0],   # GA knock-down
                  [20.0, 20.0, 20.0, 40.0],   # control
                  [40.0, 40.0, 40.0, 80.0]])  # control with twice the depth: same profile after scaling
    path = replogle_bulk(tmp_path / "rpe1_raw_bulk_01.h5ad", X, [("GA", "P1"), ("non-targeting", ""), ("non-targeting", "")])
    table = load_perturbation_table(path, pseudocount=0.0)
    assert table.cell_lines == ["rpe1"] and table.value_kind["rpe1"] == "log2_ratio_to_control"
    ga = X[0] / X[0].sum() * 1e4
    ctrl = X[1] / X[1].sum() * 1e4
    np.testing.assert_allclose(table.lfc["rpe1"].loc["GA"].to_numpy(), np.log2(ga / ctrl), rtol=1e-5)
    # X non-negative without controls cannot be turned into fold changes
    no_ctrl = replogle_bulk(tmp_path / "x_raw.h5ad", X[:1], [("GA", "P1")])
    with pytest.raises(CtraceInputError, match="control rows"):
        load_perturbation_table(no_ctrl)


def test_cell_line_column_gene_column_and_several_files(tmp_path):
    X = [[-1.0, 1.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]]
    path = replogle_bulk(tmp_path / "two_lines.h5ad", X, [("GA", "P1"), ("GA", "P1"), ("GB", "P1")],
                         extra_obs={"cell_line": ["K562", "RPE1", "RPE1"], "gene": ["GA", "GA", "GB"]})
    table = load_perturbation_table(path)
    assert sorted(table.cell_lines) == ["K562", "RPE1"]
    assert table.lfc["RPE1"].loc["GA", "GA"] == 1.0 and table.lfc["K562"].loc["GA", "GA"] == -1.0
    single = replogle_bulk(tmp_path / "K562_gwps_normalized_bulk_01.h5ad", X[:1], [("GC", "P1")])
    both = load_perturbation_table([single, tmp_path / "two_lines.h5ad"], cell_line={single.name: "K562_gwps"})
    assert sorted(both.cell_lines) == ["K562", "K562_gwps", "RPE1"]
    with pytest.raises(CtraceInputError, match="already read"):
        load_perturbation_table([single, single])


def test_layout_errors_name_the_missing_field(tmp_path):
    X = [[-1.0, 1.0, 0.0, 0.0]]
    no_name = replogle_bulk(tmp_path / "a.h5ad", X, [("GA", "P1")],
                            var=pd.DataFrame({"chr": ["1"] * 4}, index=pd.Index(ENSG, name="gene_id")))
    with pytest.raises(CtraceInputError, match="gene_name"):
        load_perturbation_table(no_name)
    obs = pd.DataFrame({"x": [1]}, index=["cellA"])
    bad = tmp_path / "b.h5ad"
    anndata.AnnData(X=np.asarray(X, np.float32), obs=obs,
                    var=pd.DataFrame({"gene_name": MEASURED}, index=ENSG)).write_h5ad(bad)
    with pytest.raises(CtraceInputError, match="'gene'"):
        load_perturbation_table(bad)
    with pytest.raises(CtraceInputError, match="not found"):
        load_perturbation_table(tmp_path / "missing.h5ad")
    with pytest.raises(CtraceInputError, match="no column 'target'"):
        load_perturbation_table(no_name, perturbation_column="target", gene_column=None)


def test_gene_pairs_sign_convention_and_aggregation():
    features = pd.DataFrame({
        "layer": [0, 0, 5, 5], "feature": [1, 2, 7, 8],
        "top_genes": [["TF1", "X"], ["TF1"], ["T1", "TF1"], ["T2"]],
    })
    edges = pd.DataFrame({
        "source_layer": [0, 0, 0], "source_feature": [1, 2, 1], "target_layer": [5, 5, 5],
        "target_feature": [7, 7, 8], "cohens_d": [-2.0, 0.5, 1.0],
    })
    pairs = gene_pairs_from_edges(edges, features)
    got = {(r.source_gene, r.target_gene): (r.sign, r.weight, r.n_edges, r.n_opposite) for r in pairs.itertuples()}
    # edge 1 (d=-2): TF1→T1, X→T1, X→TF1 (TF1→TF1 self pair dropped), all sign −1 weight 2
    # edge 2 (d=+0.5): TF1→T1 (+0.5), TF1→TF1 dropped;  edge 3 (d=+1): TF1→T2, X→T2 sign +1
    assert got == {
        ("TF1", "T1"): (-1, 1.5, 2, 1),
        ("X", "T1"): (-1, 2.0, 1, 0),
        ("X", "TF1"): (-1, 2.0, 1, 0),
        ("TF1", "T2"): (1, 1.0, 1, 0),
        ("X", "T2"): (1, 1.0, 1, 0),
    }
    uniform = gene_pairs_from_edges(edges, features, weight="uniform")
    # with uniform weights the two edges' votes on TF1→T1 (−1, +1) cancel: the pair is dropped
    assert ("TF1", "T1") not in set(zip(uniform.source_gene, uniform.target_gene))
    assert len(uniform) == 4 and set(uniform["weight"]) == {1.0}
    ranked = gene_pairs_from_edges(edges, features, weight="abs_d_rank")
    assert ranked.set_index(["source_gene", "target_gene"]).loc[("X", "TF1"), "weight"] == pytest.approx(2.0 / 4)
    with pytest.raises(CtraceInputError, match="weight"):
        gene_pairs_from_edges(edges, features, weight="bogus")
    other_layers = features.assign(layer=features["layer"] + 6)  # another SAE set's (or model's) table
    with pytest.raises(CtraceInputError, match=r"none of its 3 edges has both features in the features table \(edge "
                                               r"layers \[0, 5\], features with top genes at layers \[6, 11\]\)"):
        gene_pairs_from_edges(edges, other_layers)
    assert gene_pairs_from_edges(edges.iloc[:0], other_layers).empty


def test_directional_accuracy_equals_hand_computation(tmp_path):
    # knock-downs SA and SB; measured genes GA..GD
    X = [[-1.0, 2.0, -0.5, 0.0],   # SA
         [0.4, -0.3, 1.0, -2.0]]   # SB
    path = replogle_bulk(tmp_path / "K562_essential_normalized_bulk_01.h5ad", X, [("SA", "P1"), ("SB", "P1")])
    table = load_perturbation_table(path)
    pairs = pd.DataFrame({
        "source_gene": ["SA", "SA", "SA", "SA", "SB", "SB", "SB", "ZZ"],
        "target_gene": ["GA", "GB", "GC", "GD", "GA", "GB", "GD", "GA"],
        "sign":        [-1,   -1,    1,   -1,   1,    -1,   -1,   1],
        "weight":      [1.0,  3.0,  1.0,  5.0,  2.0,  1.0,  4.0, 9.0],
    })
    res = directional_accuracy(pairs, table)["K562"]
    # tested: SA-GD has observed 0 (excluded), ZZ not knocked down → 6 tested pairs
    # obs signs: SA-GA −, SA-GB +, SA-GC −, SB-GA +, SB-GB −, SB-GD −
    # pred:           −        −        +        +        −        −     → correct: 1,0,0,1,1,1 = 4/6
    assert (res.n_tested, res.n_correct, res.n_below_threshold, res.n_source_genes) == (6, 4, 1, 2)
    assert res.accuracy == pytest.approx(4 / 6)
    assert res.weighted_accuracy == pytest.approx((1 + 2 + 1 + 4) / (1 + 3 + 1 + 2 + 1 + 4))
    pp, po = 2 / 6, 2 / 6
    assert res.baseline == pytest.approx(pp * po + (1 - pp) * (1 - po))
    wpp, wpo = (1 + 2) / 12, (3 + 2) / 12
    assert res.weighted_baseline == pytest.approx(wpp * wpo + (1 - wpp) * (1 - wpo))
    # one-sided binomial tails P(X ≥ 4 | n = 6, p), by hand
    def tail(p):
        return sum(math.comb(6, k) * p**k * (1 - p) ** (6 - k) for k in range(4, 7))

    assert res.p_vs_baseline == pytest.approx(tail(res.baseline), rel=1e-12)
    assert res.p_vs_half == pytest.approx(tail(0.5), rel=1e-12) and tail(0.5) == pytest.approx(22 / 64)
    strict = directional_accuracy(pairs, table, min_abs_lfc=0.35)["K562"]
    assert strict.n_tested == 5 and strict.n_below_threshold == 2  # SB-GB (|−0.3|) dropped too
    assert list(accuracy_frame({"K562": res})["cell_line"]) == ["K562"]


TRRUST_TOY = (
    "TF1\tT1\tActivation\t111\n"
    "TF1\tT2\tRepression\t112;113\n"
    "TF1\tT3\tActivation\t114\n"
    "TF1\tT3\tRepression\t115\n"
    "TF2\tT1\tUnknown\t116\n"
    "TF2\tT4\tActivation\t117\n"
    "TF2\tT5\tRepression\t118\n"
)


def test_trrust_layout_loads_and_errors(tmp_path):
    path = tmp_path / "trrust_toy.tsv"
    path.write_text(TRRUST_TOY)
    tf = load_tf_targets(path)
    assert list(tf.columns) == ["tf", "target", "mode", "pmids"] and len(tf) == 7
    assert tf.loc[1, "pmids"] == "112;113"
    with_header = tmp_path / "h.tsv"
    with_header.write_text("TF\tTarget\tMode\tPMID\n" + TRRUST_TOY)
    assert len(load_tf_targets(with_header)) == 7
    bad = tmp_path / "bad.tsv"
    bad.write_text(TRRUST_TOY + "TF3\tT9\tActivates\t1\n")
    with pytest.raises(CtraceInputError, match="line 8"):
        load_tf_targets(bad)
    commas = tmp_path / "c.tsv"
    commas.write_text("TF1,T1,Activation,1\n")
    with pytest.raises(CtraceInputError, match="1 tab-separated"):
        load_tf_targets(commas)


def test_tf_target_precision_hand_computation(tmp_path):
    path = tmp_path / "trrust_toy.tsv"
    path.write_text(TRRUST_TOY)
    tf = load_tf_targets(path)
    pairs = pd.DataFrame({
        "source_gene": ["TF1", "TF1", "TF1", "TF2", "TF2", "TF2", "T1", "TF9"],
        "target_gene": ["T1", "T2", "T3", "T1", "T4", "T5", "TF1", "T1"],
        "sign":        [-1,    -1,    -1,   1,    -1,    1,    -1,    -1],
        "weight":      [2.0,  1.0,   1.0,  1.0,  3.0,   1.0,  1.0,   1.0],
    })
    res = tf_target_precision(pairs, tf, n_shuffles=500, seed=0)
    # matched (one known mode): TF1-T1 Act, TF1-T2 Rep, TF2-T4 Act, TF2-T5 Rep; TF1-T3 ambiguous,
    # TF2-T1 Unknown only; T1→TF1 is the wrong direction; TF9 absent.
    assert (res.n_matched, res.n_ambiguous, res.n_unknown_only) == (4, 1, 1)
    # predicted: act, act, act, rep → correct: yes, no, yes, yes
    assert res.precision == pytest.approx(3 / 4)
    assert res.weighted_precision == pytest.approx((2 + 3 + 1) / (2 + 1 + 3 + 1))
    assert res.precision_activation == pytest.approx(2 / 3) and res.precision_repression == 1.0
    assert res.baseline == pytest.approx(0.75 * 0.5 + 0.25 * 0.5)
    assert res.null_mean == pytest.approx(res.baseline, abs=0.03)
    # shuffles of 3 act / 1 rep over 2 act / 2 rep: precision 0.75 in half of them, else 0.25
    assert res.p_value == pytest.approx(0.5, abs=0.06)


@pytest.mark.skipif(not TRRUST_REAL.is_file(), reason="real TRRUST file not available")
def test_real_trrust_file_loads():
    tf = load_tf_targets(TRRUST_REAL)
    assert len(tf) == 9396
    assert tf["mode"].value_counts().to_dict() == {"Unknown": 4325, "Activation": 3149, "Repression": 1922}
    assert tf["tf"].nunique() == 795 and tf["target"].nunique() == 2492
    assert len(tf.drop_duplicates(["tf", "target"])) == 8427
