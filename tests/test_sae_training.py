"""TopK SAE training on streamed dumps: TopK math, decoder norm, AuxK, split, metrics vs numpy, determinism."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ctrace.errors import CtraceInputError
from ctrace.io import write_parquet
from ctrace.sae import SAEShape, TopKSAE, load_sae, save_sae
from ctrace.sae_training import (
    SAETrainConfig,
    data_hash,
    fit_sae_,
    open_dumps,
    project_decoder_grad_,
    split_cells,
    decode_topk,
    encode_topk,
    step_loss,
    train_sae,
)

D, K = 16, 4


def sparse_data(n_rows: int, d: int, n_atoms: int, k: int, noise: float, seed: int) -> np.ndarray:
    """Rows = k-sparse non-negative combinations of a random unit dictionary + offset + Gaussian noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    support = np.argsort(rng.random((n_rows, n_atoms)), axis=1)[:, :k]
    coef = rng.exponential(1.0, (n_rows, k)) + 0.5
    x = (coef[..., None] * atoms[support]).sum(1) + noise * rng.standard_normal((n_rows, d))
    return x + rng.standard_normal(d)  # a non-zero mean, removed by μ


def write_dump(folder, name, x, cells_per_source_rows, seed=0):
    """Write `<name>.npy` (float16) and `<name>.rows.parquet` with `cells_per_source_rows` rows per cell."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    cell = np.arange(n) // cells_per_source_rows
    npy, rows = folder / f"{name}.npy", folder / f"{name}.rows.parquet"
    np.save(npy, x.astype(np.float16))
    frame = pd.DataFrame({
        "cell": cell.astype(np.int32),
        "position": (np.arange(n) % cells_per_source_rows).astype(np.int32),
        "token_id": rng.integers(4, 60, n).astype(np.int32),
    })
    write_parquet(rows, frame)
    return npy, rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to a busy CI machine; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dumps")
    x = sparse_data(6000, D, n_atoms=48, k=K, noise=0.05, seed=1)
    return [write_dump(folder, "a", x[:3600], 40, seed=2), write_dump(folder, "b", x[3600:], 40, seed=3)]


CFG = SAETrainConfig(k=K, batch_size=256, n_steps=300, lr=3e-3, heldout_fraction=0.2, log_every=50, seed=7)


@pytest.fixture(scope="module")
def trained(dumps):
    return train_sae(dumps, CFG)


# --- TopK encode / decode on hand-set weights --------------------------------------------------------


def hand_sae() -> TopKSAE:
    sae = TopKSAE(SAEShape(d_model=3, n_features=4, k=2))
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
        sae.b_enc_F.copy_(torch.tensor([0.0, -0.5, 0.1, -3.0]))
        w_dec = torch.tensor([[3.0, 0, 0, 1], [0, 4, 0, 1], [0, 0, 1, 1]])
        sae.W_dec_DF.copy_(w_dec)
        sae.normalize_decoder_()
        sae.b_dec_D.copy_(torch.tensor([0.1, 0.2, 0.3]))
        sae.mean_D.copy_(torch.tensor([1.0, 1.0, 1.0]))
    return sae


def test_encode_decode_matches_hand_computation():
    sae = hand_sae()
    x = torch.tensor([[3.0, 2.0, 1.5], [0.0, 0.0, 0.0]])
    # row 0: x − μ = (2, 1, .5); pre = relu(2, .5, .6, 3.5 − 3) = (2, .5, .6, .5) → top2 = f0 (2), f2 (.6)
    # row 1: x − μ = (−1, −1, −1); pre = relu(−1, −1.5, −.9, −6) = 0 → no feature fires
    expected_codes = np.array([[2.0, 0, 0.6, 0], [0, 0, 0, 0]])
    codes = sae.encode(x).detach().numpy()
    np.testing.assert_allclose(codes, expected_codes, atol=1e-6)
    unit = np.array([[1.0, 0, 0, 1 / np.sqrt(3)], [0, 1, 0, 1 / np.sqrt(3)], [0, 0, 1, 1 / np.sqrt(3)]])
    expected_x_hat = expected_codes @ unit.T + np.array([0.1, 0.2, 0.3]) + 1.0
    np.testing.assert_allclose(sae.decode(torch.from_numpy(expected_codes).float()).detach().numpy(),
                               expected_x_hat, atol=1e-6)
    values, indices, _, _ = encode_topk(sae, x)
    sparse_codes = torch.zeros(2, 4).scatter(1, indices, values).detach().numpy()
    np.testing.assert_allclose(sparse_codes, expected_codes, atol=1e-6)
    np.testing.assert_allclose(decode_topk(sae, values, indices).detach().numpy(),
                               expected_codes @ unit.T + np.array([1.1, 1.2, 1.3]), atol=1e-6)


def test_topk_has_at_most_k_nonzeros_and_exactly_k_when_enough_positive():
    torch.manual_seed(0)
    sae = TopKSAE(SAEShape(d_model=8, n_features=32, k=5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.linspace(-3, 0.5, 32))
    x = torch.randn(500, 8) * torch.rand(500, 1) * 3
    pre = sae.pre_acts(x)
    nnz = (sae.encode(x) != 0).sum(1)
    n_pos = (pre > 0).sum(1)
    assert (nnz <= 5).all()
    assert torch.equal(nnz, torch.clamp(n_pos, max=5))
    assert (n_pos >= 5).any() and (n_pos < 5).any()  # both regimes exercised


def dense_reference_loss(sae, x, dead_F, k_aux, aux_coef, variance):
    """The loss written with dense codes and plain autograd (no sparse kernels)."""
    pre = sae.pre_acts(x)
    values, indices = pre.topk(sae.k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, values)
    err = x - sae.decode(codes)
    loss = err.pow(2).sum(-1).mean() / variance
    aux_vals, aux_idx = (pre * dead_F.float()).topk(k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, aux_idx, aux_vals) @ sae.W_dec_DF.T
    e = err.detach()
    return loss + aux_coef * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


def test_sparse_step_gradients_equal_dense_autograd():
    gen = torch.Generator().manual_seed(2)
    sae = TopKSAE(SAEShape(d_model=12, n_features=48, k=5), generator=gen)
    with torch.no_grad():
        sae.b_enc_F.uniform_(-0.3, 0.3, generator=gen)
        sae.b_dec_D.uniform_(-1, 1, generator=gen)
        sae.mean_D.uniform_(-1, 1, generator=gen)
    x = torch.randn(64, 12, generator=gen) * 2
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True  # 16 dead latents, some of them also in the top k: both gradients must add up
    loss, parts = step_loss(sae, x, dead, aux_k=6, aux_coef=0.5, total_variance=7.0)
    loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    reference = dense_reference_loss(sae, x, dead, 6, 0.5, 7.0)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert float(parts.aux) > 0
    for name, param in sae.named_parameters():
        np.testing.assert_allclose(sparse_grads[name].numpy(), param.grad.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    assert torch.equal(parts.fired_F, (sae.encode(x) > 0).any(0))


def test_decoder_gradient_projection_is_orthogonal_to_columns():
    sae = TopKSAE(SAEShape(d_model=6, n_features=12, k=3), generator=torch.Generator().manual_seed(1))
    sae.W_dec_DF.grad = torch.randn(6, 12)
    before = sae.W_dec_DF.grad.clone()
    project_decoder_grad_(sae)
    w = sae.W_dec_DF.detach()
    np.testing.assert_allclose((w * sae.W_dec_DF.grad).sum(0).numpy(), 0, atol=1e-6)
    expected = before - (w * before).sum(0, keepdim=True) * w
    np.testing.assert_allclose(sae.W_dec_DF.grad.numpy(), expected.numpy(), atol=1e-6)


# --- training on streamed dumps ----------------------------------------------------------------------


def test_decoder_columns_unit_norm_after_training(trained):
    norms = trained.sae.W_dec_DF.detach().norm(dim=0).numpy()
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_heldout_split_is_by_cell(dumps, trained):
    split = trained.split
    train = {tuple(k) for k in split.train_keys_K2.tolist()}
    heldout = {tuple(k) for k in split.heldout_keys_K2.tolist()}
    assert train.isdisjoint(heldout)
    opened = open_dumps(dumps)
    keys = list(zip(opened.source_R.tolist(), opened.cell_R.tolist()))
    assert set(keys) == train | heldout
    for (key, held) in zip(keys, split.heldout_row_mask_R.tolist()):
        assert (key in heldout) == held
    assert len(heldout) == round(0.2 * len(set(keys)))  # 150 cells → 30 held out
    # the same seed gives the same split; another seed a different one
    again = split_cells(opened.source_R, opened.cell_R, 0.2, seed=7)
    assert np.array_equal(again.heldout_keys_K2, split.heldout_keys_K2)
    other = split_cells(opened.source_R, opened.cell_R, 0.2, seed=8)
    assert not np.array_equal(other.heldout_keys_K2, split.heldout_keys_K2)


def test_gather_reads_the_right_rows(dumps):
    opened = open_dumps(dumps)
    full = np.concatenate([np.load(npy) for npy, _ in dumps])
    rows = np.sort(np.random.default_rng(0).choice(len(full), 500, replace=False))
    np.testing.assert_array_equal(opened.gather(rows), full[rows])


def test_mean_and_metrics_match_independent_numpy(dumps, trained):
    full = np.concatenate([np.load(npy) for npy, _ in dumps]).astype(np.float64)
    held = trained.split.heldout_row_mask_R
    train_x, held_x = full[~held], full[held]
    mu = train_x.mean(0)
    np.testing.assert_allclose(trained.sae.mean_D.numpy(), mu, rtol=1e-5, atol=1e-5)

    sst = ((held_x - held_x.mean(0)) ** 2).sum()
    with torch.no_grad():
        x_hat = trained.sae(torch.from_numpy(held_x).float()).double().numpy()
        codes = trained.sae.encode(torch.from_numpy(held_x).float()).numpy()
    m = trained.metrics
    assert m.fvu == pytest.approx(((held_x - x_hat) ** 2).sum() / sst, rel=1e-4)
    assert m.mean_l0 == pytest.approx((codes > 0).sum(1).mean())
    np.testing.assert_allclose(m.firing_frequency_F, (codes > 0).mean(0))
    assert m.dead_fraction == pytest.approx(((codes > 0).sum(0) == 0).mean())
    assert m.hist_counts.sum() == ((codes > 0).sum(0) > 0).sum()

    evals, evecs = np.linalg.eigh(np.cov(train_x.T, bias=True))
    v = evecs[:, np.argsort(evals)[::-1][:K]]
    r = held_x - mu
    assert m.pca_fvu == pytest.approx(((r - r @ v @ v.T) ** 2).sum() / sst, rel=1e-6)


def test_sae_beats_pca_on_sparse_data(trained):
    m = trained.metrics
    assert m.fvu < 0.5 * m.pca_fvu, (m.fvu, m.pca_fvu)
    assert m.mean_l0 <= K


def test_same_seed_gives_identical_results(dumps):
    cfg = SAETrainConfig(k=K, batch_size=256, n_steps=40, lr=3e-3, dead_tokens=256, log_every=10, seed=3)
    first, again = train_sae(dumps, cfg), train_sae(dumps, cfg)
    for name, tensor in first.sae.state_dict().items():
        assert torch.equal(tensor, again.sae.state_dict()[name]), name
    assert first.metrics_dict() == again.metrics_dict()
    assert first.loss_history == again.loss_history
    other = train_sae(dumps, SAETrainConfig(**{**cfg.__dict__, "seed": 4}))
    assert not torch.equal(first.sae.W_dec_DF, other.sae.W_dec_DF)


def test_sidecar_roundtrip(tmp_path, dumps, trained):
    sidecar = trained.sidecar(model_id="synthetic")
    assert sidecar["data_hash"] == data_hash(dumps) and len(sidecar["data_hash"]) == 64
    assert sidecar["seed"] == 7 and sidecar["config"]["k"] == K and sidecar["model_id"] == "synthetic"
    for key in ("heldout_fvu", "heldout_pca_fvu", "fvu_over_pca_fvu", "mean_l0", "dead_fraction",
                "firing_frequency", "firing_hist_log10_edges", "firing_hist_counts", "train_dead_fraction_end"):
        assert key in sidecar["metrics"]
    save_sae(tmp_path / "sae", trained.sae, sidecar)
    loaded, meta = load_sae(tmp_path / "sae")
    assert meta["metrics"] == json.loads(json.dumps(sidecar["metrics"]))
    assert torch.equal(loaded.W_dec_DF, trained.sae.W_dec_DF)


def test_data_hash_changes_with_content(tmp_path, dumps):
    a = write_dump(tmp_path, "x", np.ones((80, D)), 40)
    h = data_hash([a])
    np.save(a[0], np.full((80, D), 2.0, np.float16))
    assert data_hash([a]) != h


def test_bad_inputs_raise_clear_errors(tmp_path, dumps):
    npy, _ = dumps[0]
    short = write_dump(tmp_path, "short", np.ones((40, D)), 40)
    with pytest.raises(CtraceInputError, match="rows but"):
        open_dumps([(npy, short[1])])
    wide = write_dump(tmp_path, "wide", np.ones((80, D + 1)), 40)
    with pytest.raises(CtraceInputError, match="d_model"):
        open_dumps([dumps[0], wide])
    with pytest.raises(CtraceInputError, match="not found"):
        open_dumps([(tmp_path / "missing.npy", short[1])])
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(CtraceInputError, match="empty.npy: not a readable .npy activation dump"):
        open_dumps([(empty, short[1])])
    csv_rows = tmp_path / "csv.rows.parquet"
    csv_rows.write_text("cell,position,token_id\n0,0,5\n")
    with pytest.raises(CtraceInputError, match="csv.rows.parquet: not a readable Parquet row table"):
        open_dumps([(short[0], csv_rows)])


def test_non_finite_activations_are_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(80, D))
    x[::7, 2] = np.nan  # in training and held-out cells alike
    with pytest.raises(CtraceInputError, match="nan.npy: the training activations contain NaN or inf"):
        train_sae([write_dump(tmp_path, "nan", x, 40)], CFG)


def test_unreadable_sae_checkpoints_are_refused(tmp_path, trained):
    save_sae(tmp_path / "sae", trained.sae, trained.sidecar())
    weights, meta = tmp_path / "sae.safetensors", tmp_path / "sae.json"
    good = meta.read_text()
    def with_shape(**shape) -> str:
        return json.dumps({**json.loads(good), "shape": {"d_model": D, "n_features": 4 * D, "k": K, **shape}})

    for text, message in [("", "sae.json: not valid JSON"), ("{}", "not an SAE sidecar with a 'shape'"),
                          (with_shape(k=0), "shape.k must be a positive integer, found 0"),
                          (with_shape(d_model=-1), "shape.d_model must be a positive integer, found -1"),
                          (with_shape(n_features="64"), "shape.n_features must be a positive integer, found '64'"),
                          (with_shape(k=4 * D + 1), f"shape.k {4 * D + 1} exceeds shape.n_features {4 * D}"),
                          (with_shape(d_model=D + 1),
                           rf"do not match sae.json's shape .*W_enc_FD: file \({4 * D}, {D}\), expected "
                           rf"\({4 * D}, {D + 1}\)")]:
        meta.write_text(text)
        with pytest.raises(CtraceInputError, match=message):
            load_sae(tmp_path / "sae")
    meta.write_text(good)
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CtraceInputError, match="sae.safetensors: SAE weights unreadable"):
        load_sae(tmp_path / "sae")


def test_stems_with_dots_keep_their_files_apart(tmp_path, trained):
    save_sae(tmp_path / "gf.layer1", trained.sae, {**trained.sidecar(), "layer": 1})
    save_sae(tmp_path / "gf.layer2", trained.sae, {**trained.sidecar(), "layer": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gf.layer1.json", "gf.layer1.safetensors", "gf.layer2.json", "gf.layer2.safetensors"
    ]
    for layer in (1, 2):
        for given in (f"gf.layer{layer}", f"gf.layer{layer}.safetensors", f"gf.layer{layer}.json"):
            assert load_sae(tmp_path / given)[1]["layer"] == layer


def test_an_interrupted_save_leaves_no_weights_under_an_older_sidecar(tmp_path, trained, monkeypatch):
    import ctrace.sae as sae_module

    save_sae(tmp_path / "sae", trained.sae, {**trained.sidecar(), "layer": 1})

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # the job is killed after the weights' rename, before the sidecar

    monkeypatch.setattr(sae_module, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_sae(tmp_path / "sae", trained.sae, {**trained.sidecar(), "layer": 2})
    with pytest.raises(CtraceInputError, match="sae.json: SAE checkpoint file not found"):
        load_sae(tmp_path / "sae")


# --- AuxK revives a dead latent ----------------------------------------------------------------------


def _fit_with_dead_latent(aux_k: int) -> tuple[float, float]:
    """Train from one init in which latent 0 is dead (encoder row ×1e-3, never in the top k)."""
    x = torch.from_numpy(sparse_data(4096, D, n_atoms=24, k=K, noise=0.05, seed=5)).float()
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(SAEShape(d_model=D, n_features=4 * D, k=K), generator=gen)
    with torch.no_grad():
        sae.mean_D.copy_(x.mean(0))
        sae.W_enc_FD[0] *= 1e-3
    before = float((sae.encode(x)[:, 0] > 0).float().mean())
    cfg = SAETrainConfig(k=K, lr=3e-3, aux_coef=1 / 32, log_every=1000)
    variance = float(((x - x.mean(0)) ** 2).sum(1).mean())
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    batches = (x[order[i * 256 : (i + 1) * 256]] for _ in range(12) for i in range(16))
    fit_sae_(sae, batches, cfg, aux_k=aux_k, dead_tokens=512, total_variance=variance)
    with torch.no_grad():
        after = float((sae.encode(x)[:, 0] > 0).float().mean())
    return before, after


def test_auxk_revives_dead_latent_only_when_on():
    before_off, after_off = _fit_with_dead_latent(aux_k=0)
    before_on, after_on = _fit_with_dead_latent(aux_k=D // 2)
    assert before_off == before_on == 0.0
    assert after_off == 0.0
    assert after_on > 0.005, after_on
