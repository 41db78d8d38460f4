"""ctrace.data: demo counts, condition loading, bad-input errors, the seeded cell split."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from ctrace.data import demo_anndata, load_condition, split_cells
from ctrace.tokenize import check_raw_counts
from ctrace.errors import CtraceInputError


@pytest.fixture(scope="module")
def demo_h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.h5ad"
    demo_anndata().write_h5ad(path)
    return path


def test_demo_counts_invert_the_stored_normalisation():
    adata = demo_anndata()
    reduced = sc.datasets.pbmc68k_reduced()
    counts = adata.X.toarray()
    assert np.array_equal(counts, np.round(counts)) and counts.min() == 0
    # independent check: normalise-total to 1e4 then log1p gives back the stored raw.X
    n_counts_orig = reduced.obs["n_counts"].to_numpy()
    relog = np.log1p(counts / n_counts_orig[:, None] * 1e4)
    assert np.abs(relog - reduced.raw.X.toarray()).max() < 0.05
    assert adata.var["ensembl_id"].str.startswith("ENSG").sum() == 700
    assert adata.var.loc["HES4", "ensembl_id"] == "ENSG00000188290"


def test_load_condition_filters_and_orders_cells(demo_h5ad):
    data = load_condition(demo_h5ad, obs_filter='bulk_labels == "CD56+ NK"')
    assert data.counts_CG.shape == (31, 765)
    assert (data.obs["bulk_labels"] == "CD56+ NK").all()
    np.testing.assert_allclose(data.n_counts_C, np.asarray(data.counts_CG.sum(axis=1)).ravel())
    wanted = data.obs_names[[5, 0, 3]]
    again = load_condition(demo_h5ad, cells=wanted, obs_filter='bulk_labels == "CD56+ NK"')
    assert list(again.obs_names) == list(wanted)
    np.testing.assert_array_equal(again.counts_CG.toarray(), data.counts_CG[[5, 0, 3]].toarray())


def test_log_normalised_input_is_rejected(tmp_path):
    reduced = sc.datasets.pbmc68k_reduced()
    path = tmp_path / "lognorm.h5ad"
    ad.AnnData(X=sp.csr_matrix(reduced.raw.X), obs=reduced.obs[["bulk_labels"]], var=pd.DataFrame(index=reduced.raw.var_names)).write_h5ad(path)
    with pytest.raises(CtraceInputError, match="expected raw integer counts.*log-normalised"):
        load_condition(path)


def test_missing_gene_column_and_layer(demo_h5ad):
    with pytest.raises(CtraceInputError, match="gene_column.*'gene_ids' not in.*ensembl_id"):
        load_condition(demo_h5ad, gene_column="gene_ids")
    with pytest.raises(CtraceInputError, match="layer 'counts' not in"):
        load_condition(demo_h5ad, counts="counts")
    data = load_condition(demo_h5ad, gene_column="ensembl_id", obs_filter='bulk_labels == "CD19+ B"')
    assert data.gene_ids[0] == "ENSG00000188290"  # HES4, the first var


def test_a_file_without_x_names_its_layers(tmp_path):
    demo = demo_anndata()
    path = tmp_path / "layers_only.h5ad"
    ad.AnnData(obs=demo.obs, var=demo.var, layers={"counts": demo.X}).write_h5ad(path)
    with pytest.raises(CtraceInputError, match=r"counts: .*layers_only.h5ad has no X matrix; use a layer name "
                                               r"\(layers: \['counts'\]\) or 'raw'"):
        load_condition(path)
    assert load_condition(path, counts="counts").counts_CG.shape == demo.shape


def test_obs_filter_that_selects_no_cell(demo_h5ad):
    with pytest.raises(CtraceInputError, match="selects no cell.*CD56\\+ NK"):
        load_condition(demo_h5ad, obs_filter='bulk_labels == "NK cells"')
    with pytest.raises(CtraceInputError, match="cannot evaluate"):
        load_condition(demo_h5ad, obs_filter="no_such_column == 1")


def test_negative_values_rejected():
    with pytest.raises(CtraceInputError, match="expected raw integer counts"):
        check_raw_counts(sp.csr_matrix(np.array([[1.0, -2.0]])), "x.h5ad")


def test_split_is_disjoint_seeded_and_sized():
    names = np.array([f"c{i}" for i in range(50)])
    trace, sae = split_cells(names, 10, None, seed=3)
    assert len(trace) == 10 and len(sae) == 40 and not set(trace) & set(sae)
    again = split_cells(names, 10, None, seed=3)
    assert list(again[0]) == list(trace)
    assert len(split_cells(names, 10, 5, seed=3)[1]) == 5
    with pytest.raises(CtraceInputError, match="trace_cells = 60 but only 50"):
        split_cells(names, 60, None, seed=0)
    with pytest.raises(CtraceInputError, match="sae_cells = 41 but only 40 cells are left after 10 traced"):
        split_cells(names, 10, 41, seed=3)


def test_split_with_sae_including_the_traced_cells():
    names = np.array([f"c{i}" for i in range(50)])
    disjoint_trace, _ = split_cells(names, 10, None, seed=3)
    trace, sae = split_cells(names, 10, None, seed=3, sae_includes_traced=True)
    assert list(trace) == list(disjoint_trace)  # the option never changes which cells are traced
    assert sorted(sae) == sorted(names)
    trace, sae = split_cells(names, 10, 25, seed=3, sae_includes_traced=True)
    assert len(sae) == 25 and set(trace) <= set(sae)
    assert len(split_cells(names, 10, 4, seed=3, sae_includes_traced=True)[1]) == 4
    split_cells(names, 10, 50, seed=3, sae_includes_traced=True)
    with pytest.raises(CtraceInputError, match="sae_cells = 51 but only 50 cells pass the filter"):
        split_cells(names, 10, 51, seed=3, sae_includes_traced=True)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_unreadable_h5ad_and_duplicate_cell_names_are_refused(tmp_path, demo_h5ad):
    fake = tmp_path / "fake.h5ad"
    fake.write_text("cell,gene\n1,2\n")
    with pytest.raises(CtraceInputError, match="b_cell.h5ad: .*fake.h5ad cannot be read as an AnnData .h5ad"):
        load_condition(fake, where="b_cell")
    import anndata as ad

    adata = ad.read_h5ad(demo_h5ad)
    names = adata.obs_names.to_list()
    names[5] = names[4]
    adata.obs_names = names
    dup = tmp_path / "dup.h5ad"
    adata.write_h5ad(dup)
    with pytest.raises(CtraceInputError, match="duplicate obs names.*obs_names_make_unique"):
        load_condition(dup, where="b_cell")


def test_non_numeric_n_counts_column_is_refused(demo_h5ad):
    with pytest.raises(CtraceInputError, match="n_counts_column: obs column 'bulk_labels' .* is not numeric"):
        load_condition(demo_h5ad, n_counts_column="bulk_labels", where="b_cell")
