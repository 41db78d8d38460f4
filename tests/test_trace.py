"""ctrace.trace: the batched ablation sweep against an independent one-(cell, feature)-at-a-time loop."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ctrace.edges import edge_statistics, edge_table
from ctrace.errors import CtraceInputError
from ctrace.models.base import Backend, Batch, Cell
from ctrace.sae import SAEShape, TopKSAE
from ctrace.trace import (
    _passes_of_chunk,
    SweepConfig,
    SweepStats,
    merge_stats,
    null_directions,
    run_sweep,
    select_source_features,
)

pytestmark = pytest.mark.usefixtures("linear_route")  # every test on both linear routes (conftest.py)

STAT_NAMES = (
    "n_S",
    "sum_SLG",
    "sumsq_SLG",
    "pos_SLG",
    "neg_SLG",
    "null_sum_SRLG",
    "null_sumsq_SRLG",
    "null_pos_SRLG",
    "null_neg_SRLG",
)


# ---------------------------------------------------------------------------------------------------
# a toy transformer back-end (pre-LN or post-LN), padding-masked attention, run block by block
# ---------------------------------------------------------------------------------------------------
class ToyTransformer(Backend):
    """n_layers blocks of MHA + ReLU MLP. pre_ln: h + SA(LN h); post-LN (BERT): LN(h + SA(h))."""

    name = "toy"
    pad_token_id = 0
    special_token_ids = frozenset({0, 1, 2})  # <pad>, <cls>, <eos>

    def __init__(
        self, n_layers=3, d_model=16, n_heads=2, d_ff=32, vocab=48, max_len=64, pre_ln=True, seed=0, device="cpu"
    ):
        g = torch.Generator().manual_seed(seed)
        self.n_layers, self.d_model, self.n_heads, self.pre_ln = n_layers, d_model, n_heads, pre_ln
        self.device, self.dtype = torch.device(device), torch.float32

        def w(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(self.device)

        d = d_model
        self.tok_VD, self.pos_TD = w(vocab, d), w(max_len, d, scale=0.3)
        self.blocks = [
            dict(
                Wqkv=w(3 * d, d, scale=d**-0.5),
                bqkv=w(3 * d, scale=0.1),
                Wo=w(d, d, scale=d**-0.5),
                bo=w(d, scale=0.1),
                W1=w(d_ff, d, scale=d**-0.5),
                b1=w(d_ff, scale=0.1),
                W2=w(d, d_ff, scale=d_ff**-0.5),
                b2=w(d, scale=0.1),
                g1=1 + w(d, scale=0.1),
                e1=w(d, scale=0.1),
                g2=1 + w(d, scale=0.1),
                e2=w(d, scale=0.1),
            )
            for _ in range(n_layers)
        ]

    def embed(self, batch: Batch) -> torch.Tensor:
        T = batch.input_ids_BT.shape[1]
        return self.tok_VD[batch.input_ids_BT] + self.pos_TD[:T]

    def _attn(self, p, x_BTD, keep_BT):
        B, T, D = x_BTD.shape
        hd = D // self.n_heads
        q, k, v = F.linear(x_BTD, p["Wqkv"], p["bqkv"]).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, hd).transpose(1, 2) for t in (q, k, v))
        mask = keep_BT[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.linear(o.transpose(1, 2).reshape(B, T, D), p["Wo"], p["bo"])

    def _mlp(self, p, x):
        return F.linear(torch.relu(F.linear(x, p["W1"], p["b1"])), p["W2"], p["b2"])

    def run_blocks(self, h_BTD, batch, start, stop, edits=None) -> Iterator[tuple[int, torch.Tensor]]:
        D = self.d_model
        for i in range(start, stop + 1):
            p = self.blocks[i]
            if self.pre_ln:
                h_BTD = h_BTD + self._attn(p, F.layer_norm(h_BTD, (D,), p["g1"], p["e1"]), batch.keep_BT)
                h_BTD = h_BTD + self._mlp(p, F.layer_norm(h_BTD, (D,), p["g2"], p["e2"]))
            else:
                h_BTD = F.layer_norm(h_BTD + self._attn(p, h_BTD, batch.keep_BT), (D,), p["g1"], p["e1"])
                h_BTD = F.layer_norm(h_BTD + self._mlp(p, h_BTD), (D,), p["g2"], p["e2"])
            yield i, h_BTD


def toy_cells(n, vocab=48, min_genes=6, max_genes=14, seed=0) -> list[Cell]:
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n):
        genes = rng.choice(np.arange(3, vocab), size=int(rng.integers(min_genes, max_genes + 1)), replace=False)
        cells.append(Cell(input_ids=np.concatenate([[1], genes, [2]]).astype(np.int64)))
    return cells


@torch.no_grad()
def fitted_saes(backend: Backend, cells, layers, n_features=24, k=4, seed=0) -> dict[int, TopKSAE]:
    """Random TopK SAEs centred on each layer's mean gene-position activation (so features fire)."""
    batch = backend.collate(cells)
    hs = backend.hidden_states(batch, layers)
    saes = {}
    for i, layer in enumerate(layers):
        g = torch.Generator().manual_seed(seed + 101 * i)
        sae = TopKSAE(SAEShape(backend.d_model, n_features, k), generator=g)
        sae.mean_D.copy_(hs[layer][batch.gene_BT].mean(dim=0))
        saes[layer] = sae.eval()
    return saes


# ---------------------------------------------------------------------------------------------------
# the independent reference: one (cell, feature, direction) per forward, clean codes from a batch-1 pass
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def sweep_one_at_a_time(
    backend, saes, cells, L, feats, targets, response="firing", null_draws=0, seed=0, scale=1.0
) -> dict[str, np.ndarray]:
    targets = sorted(targets)
    S, R, NL, G = len(feats), null_draws, len(targets), saes[targets[0]].shape.n_features
    out = {
        "n_S": np.zeros(S, np.int64),
        "sum_SLG": np.zeros((S, NL, G)),
        "sumsq_SLG": np.zeros((S, NL, G)),
        "pos_SLG": np.zeros((S, NL, G), np.int64),
        "neg_SLG": np.zeros((S, NL, G), np.int64),
        "null_sum_SRLG": np.zeros((S, R, NL, G)),
        "null_sumsq_SRLG": np.zeros((S, R, NL, G)),
        "null_pos_SRLG": np.zeros((S, R, NL, G), np.int64),
        "null_neg_SRLG": np.zeros((S, R, NL, G), np.int64),
    }
    for cell in cells:
        b = backend.collate([cell])
        hs = backend.hidden_states(b, [L, *targets])
        gene_T = b.gene_BT[0]
        codes_TF = saes[L].encode(hs[L][0])
        for si, f in enumerate(feats):
            z_T = codes_TF[:, f] * gene_T
            if not bool((z_T > 0).any()):
                continue
            out["n_S"][si] += 1
            resp_T = (z_T > 0) if response == "firing" else gene_T
            w_D = saes[L].W_dec_DF[:, f]
            u_RD = null_directions(seed, L, f, R, backend.d_model)
            vs = [(None, w_D)] + [(r, w_D.norm() * u_RD[r]) for r in range(R)]
            for r, v_D in vs:
                h_abl = hs[L].clone()
                h_abl[0] = h_abl[0] - (scale * z_T)[:, None] * v_D[None, :]
                for layer, h in backend.resume(h_abl, b, L, max(targets)):
                    if layer not in targets:
                        continue
                    li = targets.index(layer)
                    a = saes[layer].encode(h[0][resp_T]).double()
                    c = saes[layer].encode(hs[layer][0][resp_T]).double()
                    d = (a - c).mean(dim=0).numpy()
                    key = (si, li) if r is None else (si, r, li)
                    pre = "" if r is None else "null_"
                    suf = "_SLG" if r is None else "_SRLG"
                    out[pre + "sum" + suf][key] += d
                    out[pre + "sumsq" + suf][key] += d * d
                    out[pre + "pos" + suf][key] += d > 0
                    out[pre + "neg" + suf][key] += d < 0
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: one intra-op thread avoids OpenMP spin-waits on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["pre_ln", "post_ln"])
def toy(request):
    backend = ToyTransformer(n_layers=3, pre_ln=request.param == "pre_ln", seed=3)
    cells = toy_cells(14, seed=4)
    saes = fitted_saes(backend, cells, [0, 1, 2], seed=5)
    with torch.no_grad():
        saes[0].b_enc_F[7] = -1e4  # feature 7 of layer 0 never fires
    return backend, cells, saes


@pytest.mark.parametrize("delta_chunk_rows", [None, 3])
@pytest.mark.parametrize("response", ["firing", "all"])
def test_batched_sweep_equals_one_at_a_time(toy, response, delta_chunk_rows, monkeypatch):
    """delta_chunk_rows 3: the (ablated − clean) codes reduced to δ three (item, position) rows at a time."""
    import ctrace.trace as trace

    backend, cells, saes = toy
    if delta_chunk_rows:
        monkeypatch.setattr(trace, "DELTA_CHUNK_BYTES", 8 * saes[1].shape.n_features * delta_chunk_rows)
    feats = [0, 3, 5, 7, 11, 19]
    # groups of 4 features ([0, 3, 5, 7], [11, 19]); a cell's ≤ 12 items of a group split into passes of ≤ 5
    cfg = SweepConfig(features_per_batch=4, ablations_per_batch=5, response=response, null_draws=2, seed=9)
    stats = run_sweep(backend, saes, cells, 0, feats, [1, 2], cfg)
    ref = sweep_one_at_a_time(backend, saes, cells, 0, feats, [1, 2], response, null_draws=2, seed=9)
    assert stats.n_S.sum() > 20 and (stats.n_S[[0, 1, 2, 4, 5]] > 0).all()
    for name in STAT_NAMES:
        diff = np.abs(getattr(stats, name) - ref[name]).max()
        assert diff <= 1e-5, (name, diff)
    assert np.abs(stats.sum_SLG).max() > 0.01  # the ablations do something
    # every fired (cell, feature) pair is one ablated sequence, plus null_draws null sequences
    assert stats.forward_passes == stats.n_S.sum()
    assert stats.null_forward_passes == 2 * stats.n_S.sum()


@pytest.mark.parametrize("cells_per_clean_pass", [1, 3])
def test_clean_pass_chunks_do_not_change_the_statistics(toy, cells_per_clean_pass):
    """Chunks of 1 (no padding) or 3 cells (padded clean passes; passes packing 1-3 cells) give the
    one-at-a-time statistics too, and the no-op control stays exactly 0."""
    backend, cells, saes = toy
    feats = [0, 3, 5, 11]
    cfg = SweepConfig(ablations_per_batch=7, null_draws=1, seed=3, cells_per_clean_pass=cells_per_clean_pass)
    stats = run_sweep(backend, saes, cells, 0, feats, [1, 2], cfg)
    ref = sweep_one_at_a_time(backend, saes, cells, 0, feats, [1, 2], null_draws=1, seed=3)
    for name in STAT_NAMES:
        assert np.abs(getattr(stats, name) - ref[name]).max() <= 1e-5, name
    zero = run_sweep(backend, saes, cells, 0, feats, [1, 2], dataclasses.replace(cfg, ablation_scale=0.0))
    _assert_exactly_zero(zero)


def test_passes_of_chunk_cover_every_item_once():
    """Every (cell, fired feature) item and its null draws run exactly once; a pass holds ≤ cap ablated rows
    of one feature group, each of its cells once (clean row) with a contiguous run of distinct items, and
    cells come in order of length."""
    rng = np.random.default_rng(0)
    n_cells, S, R, fpb, cap = 9, 10, 2, 4, 7
    fired_CS = rng.random((n_cells, S)) < 0.5
    lengths_C = rng.integers(5, 30, n_cells)
    cfg = SweepConfig(features_per_batch=fpb, ablations_per_batch=cap, null_draws=R)
    passes = _passes_of_chunk(fired_CS, lengths_C, S, cfg)
    seen = []
    for p in passes:
        assert 0 < p.dir_I.size <= cap and len(set(p.cells_m.tolist())) == p.cells_m.size
        assert np.array_equal(p.base_I, np.repeat(np.arange(p.cells_m.size), np.diff(p.segments_m)))
        groups = {int(s) // fpb for s in p.src_I}
        assert len(groups) == 1
        assert p.n_real == int((p.dir_I < S).sum())
        for j, c in enumerate(p.cells_m):
            lo, hi = p.segments_m[j], p.segments_m[j + 1]
            assert hi > lo and np.unique(p.dir_I[lo:hi]).size == hi - lo
            for d, s in zip(p.dir_I[lo:hi], p.src_I[lo:hi]):
                assert fired_CS[c, s] and (d == s or (d - S) // R == s)
                seen.append((int(c), int(d)))
        assert np.all(np.diff(lengths_C[p.cells_m]) >= 0)
    expected = [(c, s) for c in range(n_cells) for s in range(S) if fired_CS[c, s]]
    expected += [(c, S + s * R + r) for c, s in expected for r in range(R)]
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("source, targets", [(1, [2]), (0, [2])])
def test_middle_source_layer_and_unmeasured_layers(toy, source, targets):
    backend, cells, saes = toy
    cfg = SweepConfig(ablations_per_batch=64, null_draws=1, seed=1)
    stats = run_sweep(backend, saes, cells, source, [2, 4, 6, 8], targets, cfg)
    ref = sweep_one_at_a_time(backend, saes, cells, source, [2, 4, 6, 8], targets, null_draws=1, seed=1)
    assert stats.n_S.sum() > 0
    for name in STAT_NAMES:
        assert np.abs(getattr(stats, name) - ref[name]).max() <= 1e-5, name
    # clean passes: blocks 0..L of chunks of cfg.cells_per_clean_pass cells taken in order of length,
    # right-padded to the chunk's longest
    lengths = np.sort([len(c.input_ids) for c in cells])
    chunk = cfg.cells_per_clean_pass
    padded = sum(lengths[i : i + chunk].max() * lengths[i : i + chunk].size for i in range(0, len(cells), chunk))
    assert stats.clean_block_tokens == padded * (source + 1)
    # one clean row per cell in each ablation pass that holds it: every firing cell at least once, and a
    # cell more than once only where the items (n_S · (1 + null_draws), one group) are cut into passes of ≤ 64
    firing = np.count_nonzero([any(_fires(backend, saes[source], c, source, f) for f in [2, 4, 6, 8]) for c in cells])
    n_passes = -(-int(stats.n_S.sum()) * 2 // 64)
    assert firing <= stats.clean_passes - len(cells) <= firing + n_passes - 1


def _fires(backend, sae, cell, layer, feature) -> bool:
    batch = backend.collate([cell])
    with torch.no_grad():
        h = backend.hidden_states(batch, [layer])[layer][0]
        return bool((sae.encode(h[batch.gene_BT[0]])[:, feature] > 0).any())


def test_stops_at_last_target_layer():
    class Counting(ToyTransformer):
        ran: list

        def run_blocks(self, h, batch, start, stop, edits=None):
            self.ran.append((start, stop, h.shape[0]))
            return super().run_blocks(h, batch, start, stop, edits)

    backend = Counting(n_layers=4, seed=0)
    backend.ran = []
    cells = toy_cells(3, seed=1)
    saes = fitted_saes(backend, cells, [0, 1, 2, 3])
    backend.ran.clear()
    run_sweep(backend, saes, cells, 1, [0, 1, 2], [2], SweepConfig(ablations_per_batch=8, cells_per_clean_pass=2))
    assert backend.ran, "nothing was run"
    # clean passes: blocks 0..1 of chunks of 2 cells; ablation batches: blocks 2..2 only, never block 3 or 0..1
    assert all((start, stop) in ((0, 1), (2, 2)) for start, stop, _ in backend.ran)
    assert [rows for start, _, rows in backend.ran if start == 0] == [2, 1]


def _assert_exactly_zero(stats) -> None:
    for name in STAT_NAMES[1:]:
        assert not getattr(stats, name).any(), name


def test_never_firing_feature_has_n_zero(toy):
    backend, cells, saes = toy
    stats = run_sweep(backend, saes, cells, 0, [7, 0], [1, 2], SweepConfig(null_draws=1))
    assert stats.n_S[0] == 0 and stats.n_S[1] > 0
    for name in STAT_NAMES[1:]:
        assert not getattr(stats, name)[0].any(), name
    assert stats.forward_passes == stats.n_S[1]


def test_zero_norm_ablation_gives_exactly_zero(toy):
    backend, cells, saes = toy
    cfg = SweepConfig(ablations_per_batch=3, null_draws=2, ablation_scale=0.0)
    stats = run_sweep(backend, saes, cells, 0, [0, 3, 5, 11], [1, 2], cfg)
    assert stats.n_S.sum() > 0 and stats.forward_passes > 0
    _assert_exactly_zero(stats)  # exactly zero, not merely small


def test_non_finite_responses_are_an_error_not_dropped_tests(toy):
    import copy

    backend, cells, saes = toy
    broken = {**saes, 0: copy.deepcopy(saes[0])}
    with torch.no_grad():
        broken[0].W_dec_DF[:, 3] = float("inf")  # ablating feature 3 writes inf, then NaN, downstream
    # (the δ of one pass are one matmul, so the NaN reaches the other features of feature 3's passes too)
    with pytest.raises(CtraceInputError, match=r"non-finite responses \(NaN or inf\) for \d source feature\(s\) of "
                                               r"layer 0, e.g. \[(\d, )*3(, \d)*\]"):
        run_sweep(backend, broken, cells, 0, [0, 3, 5], [1, 2], SweepConfig(null_draws=1))


@pytest.mark.parametrize("features_per_batch", [4, 8])
def test_shards_merge_to_the_single_run(toy, tmp_path, features_per_batch):
    """Acceptance: 1 shard vs 3 shards (consecutive slices, multiples of features_per_batch) give
    bit-identical statistics and identical edge tables, because a forward pass never mixes groups."""
    backend, cells, saes = toy
    feats = [int(f) for f in np.random.default_rng(0).permutation(24)]  # all 24 features, shuffled order
    cfg = SweepConfig(features_per_batch=features_per_batch, ablations_per_batch=32, null_draws=2, seed=2)
    whole = run_sweep(backend, saes, cells, 0, feats, [1, 2], cfg)
    shards = [run_sweep(backend, saes, cells, 0, feats[i : i + 8], [1, 2], cfg) for i in (0, 8, 16)]
    paths = []
    for i, shard in enumerate(shards):
        paths.append(tmp_path / f"shard{i}.npz")
        shard.save(paths[i])
    merged = merge_stats([SweepStats.load(p) for p in reversed(paths)])
    assert merged.source_features_S.tolist() == list(range(24))
    order = np.argsort(whole.source_features_S)
    single = merge_stats([whole])  # the single run in the merged (sorted) layout
    assert single.source_features_S.tolist() == list(range(24))
    assert whole.n_S.sum() > 100 and whole.n_S[feats.index(7)] == 0  # feature 7 never fires
    for name in STAT_NAMES:
        assert np.array_equal(getattr(merged, name), getattr(whole, name)[order]), name
        assert np.array_equal(getattr(merged, name), getattr(single, name)), name
    for name in ("forward_passes", "null_forward_passes", "downstream_block_tokens"):
        assert getattr(merged, name) == getattr(whole, name), name
    for mode in ("corrected", "reference"):
        a, b = edge_table(single, "toy", mode), edge_table(merged, "toy", mode)
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(edge_statistics(single, "toy"), edge_statistics(merged, "toy"), check_exact=True)
    # a split that cuts a group changes batch composition: still equal to float tolerance
    cut = [run_sweep(backend, saes, cells, 0, part, [1, 2], cfg) for part in (feats[:5], feats[5:])]
    recut = merge_stats(cut)
    for name in STAT_NAMES:
        assert np.abs(getattr(recut, name) - getattr(single, name)).max() <= 1e-5, name


def test_sweep_config_batch_fields_are_checked():
    assert SweepConfig().features_per_batch >= 1 and SweepConfig().ablations_per_batch >= 1
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(CtraceInputError, match="features_per_batch must be an integer ≥ 1"):
            SweepConfig(features_per_batch=bad)
        with pytest.raises(CtraceInputError, match="ablations_per_batch must be an integer ≥ 1"):
            SweepConfig(ablations_per_batch=bad)
    assert SweepConfig(features_per_batch=np.int64(3)).features_per_batch == 3


def test_merge_rejects_overlap_and_mismatch(toy):
    backend, cells, saes = toy
    cfg = SweepConfig()
    a = run_sweep(backend, saes, cells[:4], 0, [0, 3], [1], cfg)
    b = run_sweep(backend, saes, cells[:4], 0, [3, 5], [1], cfg)
    with pytest.raises(CtraceInputError, match="more than one shard"):
        merge_stats([a, b])
    c = run_sweep(backend, saes, cells[:5], 0, [5], [1], cfg)
    with pytest.raises(CtraceInputError, match="n_cells|cells_digest"):
        merge_stats([a, c])
    d = run_sweep(backend, saes, cells[:4], 0, [5], [2], cfg)
    with pytest.raises(CtraceInputError, match="target layers"):
        merge_stats([a, d])
    e = run_sweep(backend, saes, cells[:4], 0, [5], [1], cfg)
    with pytest.raises(CtraceInputError, match=r"disagree on model: \['gf', 'gf_v2'\]"):
        merge_stats([dataclasses.replace(a, model="gf"), dataclasses.replace(e, model="gf_v2")])
    # a shard swept after one SAE was refitted: same everything else, different weights
    refit = {layer: copy.deepcopy(sae) for layer, sae in saes.items()}
    with torch.no_grad():
        refit[1].b_enc_F += 0.01
    f = run_sweep(backend, refit, cells[:4], 0, [5], [1], cfg)
    assert f.saes_digest != a.saes_digest == e.saes_digest != ""
    with pytest.raises(CtraceInputError, match="swept with different SAEs"):
        merge_stats([a, f])
    assert merge_stats([a, e]).saes_digest == a.saes_digest
    assert merge_stats([dataclasses.replace(a, saes_digest=""), f]).saes_digest == f.saes_digest  # older shard
    # a shard written before the model label was recorded ("") merges with labelled ones
    assert merge_stats([a, dataclasses.replace(e, model="gf")]).model == "gf"
    assert merge_stats([a, e]).model == ""


def test_save_load_roundtrip(toy, tmp_path):
    backend, cells, saes = toy
    stats = run_sweep(backend, saes, cells[:5], 0, [0, 3], [1, 2], SweepConfig(null_draws=1, seed=4))
    stats.save(tmp_path / "s.npz")
    back = SweepStats.load(tmp_path / "s.npz")
    for name in SweepStats._ARRAYS:
        a, b = getattr(stats, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    for name in SweepStats._INTS + SweepStats._FLOATS + SweepStats._STRS:
        assert getattr(stats, name) == getattr(back, name), name
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CtraceInputError):
        SweepStats.load(tmp_path / "bad.npz")
    dataclasses.replace(stats, model="gf").save(tmp_path / "labelled.npz")
    assert SweepStats.load(tmp_path / "labelled.npz").model == "gf"
    # files written before the model label and the SAE digest were recorded load with ""
    with np.load(tmp_path / "labelled.npz") as data:
        older = {name: data[name] for name in data.files if name not in ("model", "saes_digest")}
    np.savez(tmp_path / "older.npz", **older)
    assert SweepStats.load(tmp_path / "older.npz").model == "" == SweepStats.load(tmp_path / "older.npz").saes_digest
    assert len(back.saes_digest) == 40


def test_input_checks(toy):
    backend, cells, saes = toy
    with pytest.raises(CtraceInputError, match="not after"):
        run_sweep(backend, saes, cells, 1, [0], [1], SweepConfig())
    with pytest.raises(CtraceInputError, match="out of range"):
        run_sweep(backend, saes, cells, 0, [99], [1], SweepConfig())
    with pytest.raises(CtraceInputError, match="no SAE"):
        run_sweep(backend, {0: saes[0]}, cells, 0, [1], [1], SweepConfig())
    with pytest.raises(CtraceInputError, match="response"):
        SweepConfig(response="max")


def test_null_directions_are_seeded_unit_vectors():
    u = null_directions(1, 0, 5, 3, 32)
    assert u.shape == (3, 32)
    np.testing.assert_allclose(u.norm(dim=1).numpy(), 1.0, atol=1e-6)
    assert torch.equal(u, null_directions(1, 0, 5, 3, 32))
    assert not torch.equal(u, null_directions(1, 0, 6, 3, 32))
    assert not torch.equal(u, null_directions(2, 0, 5, 3, 32))
    assert torch.equal(u[:2], null_directions(1, 0, 5, 2, 32))


def test_select_source_features():
    freq = np.array([0.1, 0.5, 0.0, 0.5, 0.3, 0.05])
    scores = np.array([2, 0, 0, 2, 5, 1])
    assert select_source_features("top_frequency", freq, None, 3, 0).tolist() == [1, 3, 4]
    # annotated: most significant terms first, ties by frequency; unannotated never chosen
    assert select_source_features("annotated", freq, scores, 3, 0).tolist() == [4, 3, 0]
    assert select_source_features("annotated", freq, scores, 10, 0).tolist() == [4, 3, 0, 5]
    r1 = select_source_features("random", freq, None, 3, seed=7)
    assert r1.tolist() == select_source_features("random", freq, None, 3, seed=7).tolist()
    assert len(set(r1.tolist())) == 3 and 2 not in r1  # dead feature 2 is never drawn
    assert select_source_features("explicit", freq, None, 0, 0, explicit=[5, 0]).tolist() == [5, 0]
    assert select_source_features("all", freq, None, 0, 0).tolist() == list(range(6))
    with pytest.raises(CtraceInputError):
        select_source_features("explicit", freq, None, 0, 0, explicit=[6])
    with pytest.raises(CtraceInputError):
        select_source_features("explicit", freq, None, 0, 0, explicit=[1, 1])
    with pytest.raises(CtraceInputError):
        select_source_features("best", freq, None, 3, 0)
    with pytest.raises(CtraceInputError):
        select_source_features("annotated", freq, None, 3, 0)


TINY_FEATS = [0, 5, 9, 17, 30, 47]


def _tiny_real_model(tmp_path, kind: str = "geneformer") -> tuple:
    """A tiny model in the official format (3 blocks): load_backend's (checkpoint, dictionaries) arguments."""
    fixtures = pytest.importorskip("model_fixtures")
    if kind == "geneformer":
        dicts = fixtures.write_synthetic_geneformer_dictionaries(tmp_path / "dicts")
        return fixtures.write_tiny_geneformer(tmp_path, dictionary_dir=dicts, n_layers=3, seed=1)
    vocab = fixtures.synthetic_scgpt_gene_vocab()
    return fixtures.write_tiny_scgpt(tmp_path, n_layers=3, seed=2, gene_vocab=vocab), None


def _tiny_cells_and_saes(backend) -> tuple[list, dict]:
    """8 random cells and SAEs (48 features, k 6) at layers 0-2, fitted on the backend's activations."""
    fixtures = pytest.importorskip("model_fixtures")
    cells = fixtures.random_cells(backend, 8, 10, 24, seed=3)
    return cells, fitted_saes(backend, cells, [0, 1, 2], n_features=48, k=6, seed=2)


@pytest.mark.parametrize("kind", ["geneformer", "scgpt"])
@pytest.mark.parametrize("source, targets", [(0, [1, 2]), (1, [2])])
def test_tiny_real_model_batched_equals_one_at_a_time(tmp_path, kind, source, targets):
    """The fast paths (q/k/v of block L+1 only at the edited positions; the last block only at the read
    positions) against whole blocks run one (cell, feature) at a time; source 1 → 2 puts both in one block."""
    from ctrace.models import load_backend

    backend = load_backend(kind, *_tiny_real_model(tmp_path, kind))
    cells, saes = _tiny_cells_and_saes(backend)
    cfg = SweepConfig(ablations_per_batch=4, null_draws=1, seed=5)
    stats = run_sweep(backend, saes, cells, source, TINY_FEATS, targets, cfg)
    ref = sweep_one_at_a_time(backend, saes, cells, source, TINY_FEATS, targets, null_draws=1, seed=5)
    assert stats.n_S.sum() >= 10 and stats.backend == kind
    for name in STAT_NAMES:
        diff = np.abs(getattr(stats, name) - ref[name]).max()
        assert diff <= 1e-5, (name, diff)
    assert np.abs(stats.sum_SLG).max() > 1e-3
    # the no-op control through the same fast paths: exactly 0
    zero_cfg = SweepConfig(null_draws=1, ablation_scale=0.0)
    zero = run_sweep(backend, saes, cells, source, TINY_FEATS, targets, zero_cfg)
    assert zero.n_S.sum() == stats.n_S.sum()
    _assert_exactly_zero(zero)


@pytest.mark.parametrize("kind", ["geneformer", "scgpt"])
def test_tiny_real_model_sweep_under_bf16_autocast(tmp_path, kind):
    """autocast_bf16 (a GPU option; CPU autocast runs the same code path): bf16 really changes the sums
    (autocast is not ignored), yet they stay close to fp32's; firing counts differ by at most one cell
    (the clean pass, hence the source codes, run in bf16 too); the no-op control is still exactly 0."""
    from ctrace.models import load_backend

    backend = load_backend(kind, *_tiny_real_model(tmp_path, kind))
    cells, saes = _tiny_cells_and_saes(backend)
    fp32 = run_sweep(backend, saes, cells, 0, TINY_FEATS, [1, 2], SweepConfig(ablations_per_batch=4))
    bf16 = run_sweep(
        backend, saes, cells, 0, TINY_FEATS, [1, 2], SweepConfig(ablations_per_batch=4, autocast_bf16=True)
    )
    assert np.abs(bf16.n_S - fp32.n_S).max() <= 1
    same = bf16.n_S == fp32.n_S  # sums over the same cells are comparable
    assert same.sum() >= len(same) - 1
    assert bf16.sum_SLG.dtype == np.float64 and np.abs(bf16.sum_SLG).max() > 1e-3
    diff = np.abs(bf16.sum_SLG - fp32.sum_SLG)[same]
    # TopK membership can flip under bf16 (a target entering or leaving the top k), so bound the overall
    # relative error (measured: Geneformer 1e-4, scGPT 0.13), not every entry
    assert np.linalg.norm(diff) <= 0.25 * np.linalg.norm(fp32.sum_SLG[same])
    assert 0 < diff.max()  # autocast was not ignored
    assert np.corrcoef(bf16.sum_SLG[same].ravel(), fp32.sum_SLG[same].ravel())[0, 1] > 0.95
    zero_cfg = SweepConfig(ablation_scale=0.0, null_draws=1, autocast_bf16=True)
    _assert_exactly_zero(run_sweep(backend, saes, cells, 0, TINY_FEATS, [1, 2], zero_cfg))


@pytest.mark.parametrize("kind", ["geneformer", "scgpt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sweep_with_half_precision_model_weights(tmp_path, kind, dtype):
    """A model loaded in bf16/fp16 (the config's `dtype`, GPU only in the workflow; the library runs the
    same code on the CPU): statistics close to fp32's and the no-op control still exactly 0."""
    from ctrace.models import load_backend

    files = _tiny_real_model(tmp_path, kind)
    full, half = load_backend(kind, *files), load_backend(kind, *files, dtype=dtype)
    assert half.dtype == dtype
    cells, saes = _tiny_cells_and_saes(full)
    cfg = SweepConfig(ablations_per_batch=4)
    fp32 = run_sweep(full, saes, cells, 0, TINY_FEATS, [1, 2], cfg)
    low = run_sweep(half, saes, cells, 0, TINY_FEATS, [1, 2], cfg)
    assert low.sum_SLG.dtype == np.float64 and np.abs(low.sum_SLG).max() > 1e-3
    assert np.abs(low.n_S - fp32.n_S).max() <= 1  # the source codes themselves are computed in half precision
    assert np.corrcoef(low.sum_SLG.ravel(), fp32.sum_SLG.ravel())[0, 1] > 0.95
    zero_cfg = SweepConfig(ablation_scale=0.0, null_draws=1)
    _assert_exactly_zero(run_sweep(half, saes, cells, 0, TINY_FEATS, [1, 2], zero_cfg))
