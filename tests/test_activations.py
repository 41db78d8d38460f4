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
