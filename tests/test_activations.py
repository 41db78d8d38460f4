"""ctrace.activations: dumped rows equal the model's hidden states at the planned gene positions."""

import numpy as np
import pandas as pd
import pytest

from ctrace.activations import dump_activations, plan_positions
from ctrace.models import load_backend
from ctrace.tokenize import TokenizedCells
from model_fixtures import random_cells, write_tiny_geneformer, write_tiny_scgpt


def _as_tokenized(cells):
    ids = np.concatenate([c.input_ids for c in cells]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(c.input_ids) for c in cells])]).astype(np.int64)
    values = None
    if cells[0].values is not None:
        values = np.concatenate([c.values for c in cells]).astype(np.float32)
    return TokenizedCells(ids, offsets, values, np.array([f"cell{i}" for i in range(len(cells))]))


@pytest.fixture(scope="module", params=["geneformer", "scgpt"])
def backend(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "geneformer":
        model_dir, dict_dir = write_tiny_geneformer(root, n_layers=3, hidden=32, heads=4)
        return load_backend("geneformer", model_dir, dict_dir)
    return load_backend("scgpt", write_tiny_scgpt(root, n_layers=3, embsize=32, nheads=4))


def test_plan_is_seeded_bounded_and_on_gene_positions():
    masks = [np.array([False, True, True, True, False]), np.array([False] + [True] * 9 + [False])]
    plan = plan_positions(masks, positions_per_cell=4, seed=7)
    assert list(plan.offsets_C) == [0, 3, 7]
    for c, mask in enumerate(masks):
        chosen = plan.position_R[plan.offsets_C[c] : plan.offsets_C[c + 1]]
        assert mask[chosen].all() and len(set(chosen)) == len(chosen) and list(chosen) == sorted(chosen)
    again = plan_positions(masks, positions_per_cell=4, seed=7)
    assert np.array_equal(plan.position_R, again.position_R)


def test_dump_equals_hidden_states_of_each_cell_alone(backend, tmp_path):
    cells = random_cells(backend, n=7, min_len=6, max_len=30, seed=3)
    tokenized = _as_tokenized(cells)
    for layer in (0, 2):
        stem = tmp_path / f"layer{layer}"
        n = dump_activations(backend, tokenized, layer, stem, positions_per_cell=5, seed=11, batch_size=3)
        acts = np.load(f"{stem}.npy", mmap_mode="r")
        rows = pd.read_parquet(f"{stem}.rows.parquet")
        assert acts.dtype == np.float16 and acts.shape == (n, backend.d_model) and len(rows) == n
        for c, cell in enumerate(cells):
            mine = rows.index[rows["cell"] == c]
            positions = rows.loc[mine, "position"].to_numpy()
            alone = backend.collate([cell])
            h = backend.hidden_states(alone, [layer])[layer][0].numpy()
            assert alone.gene_BT[0, positions].all()
            np.testing.assert_array_equal(rows.loc[mine, "token_id"].to_numpy(), cell.input_ids[positions])
            np.testing.assert_allclose(acts[mine], h[positions].astype(np.float16), rtol=2e-3, atol=2e-3)
    same = pd.read_parquet(tmp_path / "layer0.rows.parquet").equals(pd.read_parquet(tmp_path / "layer2.rows.parquet"))
    assert same, "every layer dumps the same positions"


def test_dump_records_its_model_and_layer_and_checks_refuse_others(backend, tmp_path):
    import json
    from dataclasses import asdict

    import pyarrow.parquet as pq

    from ctrace.activations import PROVENANCE_KEY, DumpProvenance, check_dumps, read_dump_provenance
    from ctrace.errors import CtraceInputError

    tokenized = _as_tokenized(random_cells(backend, n=3, min_len=6, max_len=12, seed=4))
    rows = {}
    for layer in (0, 1):
        dump_activations(backend, tokenized, layer, tmp_path / f"l{layer}", positions_per_cell=3, seed=1, batch_size=2)
        rows[layer] = tmp_path / f"l{layer}.rows.parquet"
    want = DumpProvenance(kind=backend.name, n_layers=3, d_model=32, layer=1)
    assert read_dump_provenance(rows[1]) == want
    assert check_dumps([rows[1]], layer=1, model=want) == want
    with pytest.raises(CtraceInputError, match=r"l0.rows.parquet: a dump of layer 0 of a .* model with 3 blocks of "
                                               r"width 32, but layer 1 was asked for"):
        check_dumps([rows[1], rows[0]], layer=1)
    other = DumpProvenance(kind="scgpt" if backend.name == "geneformer" else "geneformer", n_layers=3, d_model=32,
                           layer=1)
    with pytest.raises(CtraceInputError, match=f"l1.rows.parquet: a dump of .*, not of the {other.kind} model"):
        check_dumps([rows[1]], layer=1, model=other)

    table = pq.read_table(rows[1])
    unrecorded, corrupt = tmp_path / "old.rows.parquet", tmp_path / "bad.rows.parquet"
    pq.write_table(table.replace_schema_metadata({}), unrecorded)  # a dump written before provenance existed
    assert read_dump_provenance(unrecorded) is None and check_dumps([unrecorded], layer=0) is None
    assert check_dumps([unrecorded, rows[1]], layer=1) == want
    pq.write_table(table.replace_schema_metadata({PROVENANCE_KEY: '{"kind": "scgpt", "layer": "1"}'}), corrupt)
    with pytest.raises(CtraceInputError, match="bad.rows.parquet: Parquet metadata 'ctrace.dump' is not a dump "
                                               "provenance .*re-run dump-activations"):
        read_dump_provenance(corrupt)
    wider = tmp_path / "wider.rows.parquet"
    pq.write_table(table.replace_schema_metadata({PROVENANCE_KEY: json.dumps({**asdict(want), "d_model": 64})}), wider)
    with pytest.raises(CtraceInputError, match=r"wider.rows.parquet: a dump of .* width 64, but .*l1.rows.parquet is "
                                               r"one of .* width 32; the dumps of one SAE come from one model"):
        check_dumps([rows[1], wider], layer=1)


def test_an_interrupted_dump_leaves_no_activations_under_an_older_rows_table(backend, tmp_path, monkeypatch):
    import ctrace.activations as activations
    from ctrace.activations import check_dumps
    from ctrace.errors import CtraceInputError

    tokenized = _as_tokenized(random_cells(backend, n=3, min_len=6, max_len=12, seed=4))
    dump_activations(backend, tokenized, 2, tmp_path / "x", positions_per_cell=3, seed=1, batch_size=2)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # the job is killed after the .npy's rename, before the rows table

    monkeypatch.setattr(activations, "write_parquet", killed)
    with pytest.raises(KeyboardInterrupt):
        dump_activations(backend, tokenized, 1, tmp_path / "x", positions_per_cell=3, seed=1, batch_size=2)
    with pytest.raises(CtraceInputError, match="x.rows.parquet: activation dump file not found"):
        check_dumps([tmp_path / "x.rows.parquet"], layer=2)


def test_sae_sidecar_provenance_is_checked_against_the_model():
    from dataclasses import asdict

    from ctrace.activations import DumpProvenance, check_sae_fitted_on, sae_dump_provenance
    from ctrace.errors import CtraceInputError

    gf = DumpProvenance(kind="geneformer", n_layers=18, d_model=1152, layer=4)
    assert sae_dump_provenance("old_sae", {"layer": 4}) is None  # fitted before dumps recorded their model
    assert sae_dump_provenance("sae", {"dump_provenance": asdict(gf)}) == gf
    check_sae_fitted_on("sae", {"dump_provenance": asdict(gf)}, DumpProvenance("geneformer", 18, 1152, 7), "ckpt")
    check_sae_fitted_on("old_sae", {"layer": 4}, gf, "ckpt")
    with pytest.raises(CtraceInputError, match=r"^sae: SAE fitted on dumps of layer 4 of a geneformer model with 18 "
                                               r"blocks of width 1152, not of the geneformer model ckpt \(12 blocks"):
        check_sae_fitted_on("sae", {"dump_provenance": asdict(gf)}, DumpProvenance("geneformer", 12, 1152, 4), "ckpt")
    for bad in ({"kind": "geneformer"}, [1, 2], {**asdict(gf), "layer": True}):
        with pytest.raises(CtraceInputError, match="sae: sidecar field dump_provenance is not a dump provenance"):
            sae_dump_provenance("sae", {"dump_provenance": bad})
