"""Train a TopK SAE on memory-mapped activation dumps (method.md §4), evaluated on held-out cells.

loss = ‖x − x̂‖² / E‖x − μ‖²  +  aux_coef · ‖e − ê_aux‖² / ‖e − ē‖²,   e = x − x̂ (detached),
ê_aux = W_dec TopK_{k_aux}(dead latents' pre-activations)   (AuxK, Gao et al. 2024, openai/sparse_autoencoder).

Streaming: activations stay on disk (np.load mmap); every mini-batch is a sorted gather of shuffled row
indices, read by a worker thread while the previous step runs, so memory is O(batch), never O(dataset).
Sparse kernels: only the encoder's forward matmul is dense; the decode is an embedding_bag gather and the
encoder backward a sparse (N·k) product, so a step costs ≈ 1 dense N×D×F matmul instead of ≈ 5.
The train/held-out split is by cell, keyed by (source index, cell): no cell has rows on both sides.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ctrace.device import resolve_device
from ctrace.errors import CtraceInputError
from ctrace.io import UNREADABLE_FILE_ERRORS, unreadable
from ctrace.sae import SAEShape, TopKSAE

DATA_HASH_METHOD = (
    "sha256-sampled-v1: sha256 over, for each source in order and for its .npy then its .rows.parquet, "
    "the file size (8 bytes, little-endian) followed by the whole file if it is at most 64 MiB, otherwise "
    "64 evenly spaced 1 MiB blocks (the first, which holds the .npy header, and the last included)"
)
_HASH_FULL_LIMIT = 64 << 20
_HASH_BLOCK = 1 << 20
_HASH_N_BLOCKS = 64
# Independent random streams derived from the one seed: np.random.default_rng([seed, stream]).
_SPLIT_STREAM, _PCA_STREAM, _SHUFFLE_STREAM = 1, 2, 3


@dataclass(frozen=True)
class SAETrainConfig:
    """Defaults follow Gao et al. 2024 scaled to single-cell dumps; None fields are resolved from the data."""

    expansion: int = 4  # n_features = expansion · d_model
    k: int = 32
    aux_k: int | None = None  # None → d_model // 2; per batch min(aux_k, n_dead) latents are used
    aux_coef: float = 1 / 32
    dead_tokens: int | None = None  # dead = not fired for this many training rows; None → min(10M, n_train_rows)
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    batch_size: int = 4096
    n_steps: int | None = None  # None → max(min_steps, ceil(epochs · n_train_rows / batch_size))
    epochs: float = 10.0
    min_steps: int = 1000
    heldout_fraction: float = 0.1  # fraction of cells (not rows) held out
    pca_max_rows: int | None = 1_000_000  # PCA baseline covariance from at most this many random train rows
    stream_rows: int = 65_536  # rows per contiguous block in the μ / covariance pass
    log_every: int = 100
    hist_bin_width: float = 0.5  # log10 units
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto


# ----------------------------------------------------------------------------------------------------
# Activation dumps


@dataclass(frozen=True, eq=False)
class ActivationDumps:
    """Several dumps of one (model, layer) viewed as one row space; activations stay memory-mapped."""

    paths: tuple[tuple[Path, Path], ...]
    acts: tuple[np.ndarray, ...]  # memmaps, float16 (n_rows_s, d_model)
    offsets_S1: np.ndarray  # global rows of source s are offsets[s]:offsets[s+1]
    cell_R: np.ndarray  # int64, cell index within its source
    token_R: np.ndarray  # int64 token ids
    d_model: int

    @property
    def n_rows(self) -> int:
        return int(self.offsets_S1[-1])

    @property
    def source_R(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.acts)), np.diff(self.offsets_S1))

    def gather(self, rows_sorted: np.ndarray) -> np.ndarray:
        """Rows (global indices, ascending) as a float16 (len, d_model) array read from the memmaps."""
        parts = []
        bounds = np.searchsorted(rows_sorted, self.offsets_S1)
        for s, acts in enumerate(self.acts):
            lo, hi = bounds[s], bounds[s + 1]
            if hi > lo:
                parts.append(np.asarray(acts[rows_sorted[lo:hi] - self.offsets_S1[s]]))
        if not parts:
            return np.zeros((0, self.d_model), np.float16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def blocks(self, row_mask_R: np.ndarray | None, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Contiguous blocks of ≤ block_rows rows (within one source) → (global rows selected, float16 rows)."""
        for s, acts in enumerate(self.acts):
            base, n = int(self.offsets_S1[s]), acts.shape[0]
            for lo in range(0, n, block_rows):
                hi = min(n, lo + block_rows)
                if row_mask_R is None:
                    yield np.arange(base + lo, base + hi), np.array(acts[lo:hi])
                    continue
                keep = np.flatnonzero(row_mask_R[base + lo : base + hi])
                if len(keep) == hi - lo:
                    yield np.arange(base + lo, base + hi), np.array(acts[lo:hi])
                elif len(keep):
                    yield base + lo + keep, np.asarray(acts[lo:hi][keep])


def open_dumps(sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> ActivationDumps:
    """Open (acts.npy, rows.parquet) pairs; check dtype, shape, row counts and a common d_model."""
    if not sources:
        raise CtraceInputError("no activation dumps given (sources is empty)")
    acts, cells, tokens, counts, paths = [], [], [], [], []
    d_model = None
    for npy, parquet in sources:
        npy, parquet = Path(npy), Path(parquet)
        for path in (npy, parquet):
            if not path.is_file():
                raise CtraceInputError(f"{path}: activation dump file not found")
        try:
            arr = np.load(npy, mmap_mode="r")
        except UNREADABLE_FILE_ERRORS as err:
            raise CtraceInputError(f"{npy}: not a readable .npy activation dump ({unreadable(err)})") from None
        if arr.ndim != 2 or arr.dtype not in (np.float16, np.float32):
            raise CtraceInputError(
                f"{npy}: expected a 2-D float16 array (n_rows, d_model), got {arr.dtype} with shape {arr.shape}"
            )
        if d_model is None:
            d_model = arr.shape[1]
        elif arr.shape[1] != d_model:
            raise CtraceInputError(
                f"{npy}: d_model {arr.shape[1]} differs from {d_model} of {paths[0][0]}; an SAE set trains on "
                "dumps of one (model, layer)"
            )
        try:
            table = pq.read_table(parquet)
        except UNREADABLE_FILE_ERRORS as err:
            raise CtraceInputError(f"{parquet}: not a readable Parquet row table ({type(err).__name__}: {err})") from None
        missing = {"cell", "token_id"} - set(table.column_names)
        if missing:
            raise CtraceInputError(
                f"{parquet}: missing column(s) {sorted(missing)} (need cell, position, token_id)"
            )
        if table.num_rows != arr.shape[0]:
            raise CtraceInputError(
                f"{parquet}: {table.num_rows} rows but {npy} has {arr.shape[0]}; "
                "the two files of a dump must match"
            )
        acts.append(arr)
        cells.append(table.column("cell").to_numpy().astype(np.int64))
        tokens.append(table.column("token_id").to_numpy().astype(np.int64))
        counts.append(arr.shape[0])
        paths.append((npy, parquet))
    return ActivationDumps(
        paths=tuple(paths),
        acts=tuple(acts),
        offsets_S1=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        cell_R=np.concatenate(cells),
        token_R=np.concatenate(tokens),
        d_model=int(d_model),
    )


def data_hash(sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> str:
    """Fingerprint of the input files, fast for multi-GB dumps; see DATA_HASH_METHOD for what it covers."""
    digest = hashlib.sha256(b"ctrace-data-hash-v1")
    for pair in sources:
        for path in pair:
            size = os.path.getsize(path)
            digest.update(size.to_bytes(8, "little"))
            with open(path, "rb") as handle:
                if size <= _HASH_FULL_LIMIT:
                    for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                        digest.update(block)
                    continue
                for offset in np.linspace(0, size - _HASH_BLOCK, _HASH_N_BLOCKS).astype(np.int64):
                    handle.seek(int(offset))
                    digest.update(handle.read(_HASH_BLOCK))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Split by cell


@dataclass(frozen=True, eq=False)
class CellSplit:
    """Cells keyed by (source index, cell); heldout_row_mask_R marks the rows of held-out cells."""

    train_keys_K2: np.ndarray
    heldout_keys_K2: np.ndarray
    heldout_row_mask_R: np.ndarray

    @property
    def n_train_rows(self) -> int:
        return int((~self.heldout_row_mask_R).sum())

    @property
    def n_heldout_rows(self) -> int:
        return int(self.heldout_row_mask_R.sum())


def split_cells(source_R: np.ndarray, cell_R: np.ndarray, heldout_fraction: float, seed: int) -> CellSplit:
    """Hold out round(fraction · n_cells) cells (≥ 1, leaving ≥ 1), chosen by a seeded permutation."""
    if not 0 < heldout_fraction < 1:
        raise CtraceInputError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    key_R = (np.asarray(source_R, np.int64) << 32) | np.asarray(cell_R, np.int64)
    keys = np.unique(key_R)
    if len(keys) < 2:
        raise CtraceInputError(f"need at least 2 cells to hold some out, the dumps contain {len(keys)}")
    n_heldout = min(len(keys) - 1, max(1, round(heldout_fraction * len(keys))))
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(keys))
    heldout, train = np.sort(keys[perm[:n_heldout]]), np.sort(keys[perm[n_heldout:]])

    def as_pairs(k: np.ndarray) -> np.ndarray:
        return np.stack([k >> 32, k & 0xFFFFFFFF], axis=1)

    return CellSplit(as_pairs(train), as_pairs(heldout), np.isin(key_R, heldout))


# ----------------------------------------------------------------------------------------------------
# Training statistics (one streamed pass): μ, E‖x − μ‖², PCA covariance


@dataclass(frozen=True, eq=False)
class TrainStats:
    mean_D: torch.Tensor  # float64, CPU
    total_variance: float  # E‖x − μ‖² per row over the training rows
    pca_components_DK: torch.Tensor  # float64, CPU, top principal directions (columns), descending
    pca_eigenvalues_K: torch.Tensor
    n_rows: int
    n_pca_rows: int


@torch.no_grad()
def training_stats(
    dumps: ActivationDumps, train_mask_R: np.ndarray, pca_k: int, pca_max_rows: int | None, block_rows: int,
    seed: int, device: torch.device,
) -> TrainStats:
    """μ and E‖x − μ‖² over all training rows; covariance (eigh) over all or a seeded random subset of them.

    Sums are of (x − s), s = the first block's mean, accumulated in float64 (products in float32 per block).
    """
    train_rows = np.flatnonzero(train_mask_R)
    pca_mask = train_mask_R.copy()
    if pca_max_rows is not None and len(train_rows) > pca_max_rows:
        chosen = np.random.default_rng([seed, _PCA_STREAM]).choice(train_rows, pca_max_rows, replace=False)
        pca_mask[:] = False
        pca_mask[chosen] = True
    d = dumps.d_model
    shift = None
    n = n_p = 0
    s1 = torch.zeros(d, dtype=torch.float64, device=device)
    s1_p = torch.zeros(d, dtype=torch.float64, device=device)
    ss = torch.zeros((), dtype=torch.float64, device=device)
    s2_p = torch.zeros(d, d, dtype=torch.float64, device=device)
    for rows, x16 in dumps.blocks(train_mask_R, block_rows):
        x = torch.from_numpy(x16).to(device).float()
        if shift is None:
            shift = x.double().mean(0).float()
        xc = x - shift
        n += len(rows)
        s1 += xc.sum(0, dtype=torch.float64)
        ss += xc.pow(2).sum(dtype=torch.float64)
        in_pca = torch.from_numpy(pca_mask[rows]).to(device)
        if bool(in_pca.all()):
            xp = xc
        else:
            xp = xc[in_pca]
        n_p += xp.shape[0]
        s1_p += xp.sum(0, dtype=torch.float64)
        s2_p += (xp.T @ xp).double()
    if n == 0:
        raise CtraceInputError("no training rows (every cell was held out)")
    mean_c = s1 / n  # μ − s
    total_variance = float(ss / n - mean_c.pow(2).sum())
    if not math.isfinite(total_variance):
        files = ", ".join(str(npy) for npy, _ in dumps.paths)
        raise CtraceInputError(
            f"{files}: the training activations contain NaN or inf (a model run in a too-narrow dtype?); "
            "re-dump the activations in float32"
        )
    if not total_variance > 0:
        raise CtraceInputError("the training activations have zero variance; nothing to fit")
    m_p = s1_p / n_p
    cov = s2_p / n_p - torch.outer(m_p, mean_c) - torch.outer(mean_c, m_p) + torch.outer(mean_c, mean_c)
    evals, evecs = torch.linalg.eigh(((cov + cov.T) / 2).cpu())
    order = torch.argsort(evals, descending=True)[:pca_k]
    return TrainStats(
        mean_D=(mean_c + shift.double()).cpu(),
        total_variance=total_variance,
        pca_components_DK=evecs[:, order],
        pca_eigenvalues_K=evals[order],
        n_rows=n,
        n_pca_rows=n_p,
    )


# ----------------------------------------------------------------------------------------------------
# One training step


@dataclass(frozen=True)
class StepLosses:
    mse: torch.Tensor  # batch ‖x − x̂‖² / E‖x − μ‖² (detached)
    aux: torch.Tensor  # normalised AuxK loss (0 when no latent is dead)
    fired_F: torch.Tensor  # bool, latents that fired in this batch


class _SparseTopKEncode(torch.autograd.Function):
    """(values, indices) of TopK_k(ReLU(x̃ W_encᵀ + b_enc)) and of the AuxK TopK over the dead latents.

    Only the forward pre-activation matmul is dense; the backward touches the selected entries only:
    ∂W_enc = Sᵀ x̃ and ∂b_enc = Sᵀ 1 with S the sparse (N × F) gradient of the selected values (as openai).
    """

    @staticmethod
    def forward(ctx, x_ND, w_enc_FD, b_enc_F, k, dead_F, k_aux):  # noqa: D102 - autograd API
        pre = torch.relu(torch.addmm(b_enc_F, x_ND, w_enc_FD.T))
        values, indices = pre.topk(k, dim=-1, sorted=False)
        if k_aux > 0:
            aux_values, aux_indices = (pre * dead_F.to(pre.dtype)).topk(k_aux, dim=-1, sorted=False)
        else:
            aux_values, aux_indices = pre.new_zeros(len(pre), 0), indices.new_zeros(len(pre), 0)
        ctx.save_for_backward(x_ND, values, indices, aux_values, aux_indices)
        ctx.n_features = w_enc_FD.shape[0]
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_indices, g_aux, _g_aux_indices):  # noqa: D102 - autograd API
        x_ND, values, indices, aux_values, aux_indices = ctx.saved_tensors
        g_values = torch.zeros_like(values) if g_values is None else g_values
        g_aux = torch.zeros_like(aux_values) if g_aux is None else g_aux
        grad_NK = torch.cat([g_values * (values > 0), g_aux * (aux_values > 0)], dim=1)  # ReLU′
        feat = torch.cat([indices, aux_indices], dim=1).flatten()
        rows = torch.arange(len(x_ND), device=x_ND.device).repeat_interleave(grad_NK.shape[1])
        grad = grad_NK.flatten().to(x_ND.dtype)
        grad_b = torch.zeros(ctx.n_features, dtype=grad.dtype, device=grad.device).index_add_(0, feat, grad)
        s_FN = torch.sparse_coo_tensor(
            torch.stack([feat, rows]), grad, (ctx.n_features, len(x_ND)), check_invariants=False
        )
        return None, torch.sparse.mm(s_FN, x_ND), grad_b, None, None, None


def encode_topk(
    sae: TopKSAE, x_ND: torch.Tensor, dead_F: torch.Tensor | None = None, aux_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values_NK, indices_NK, aux_values, aux_indices): the same selection as sae.encode, kept sparse."""
    x_c = (x_ND - sae.mean_D).to(sae.W_enc_FD.dtype)
    if dead_F is None:
        dead_F = torch.zeros(sae.shape.n_features, dtype=torch.bool, device=x_ND.device)
    return _SparseTopKEncode.apply(x_c, sae.W_enc_FD, sae.b_enc_F, sae.k, dead_F, aux_k)


def decode_topk(
    sae: TopKSAE, values_NK: torch.Tensor, indices_NK: torch.Tensor, biases: bool = True,
    w_dec_FD: torch.Tensor | None = None,
) -> torch.Tensor:
    """x̂_ND = Σ_j values[:, j] W_dec[:, indices[:, j]] (+ b_dec + μ): a gather (embedding_bag), no dense matmul.

    `w_dec_FD` = W_dec_DF.T made contiguous (differentiable); pass it to reuse one copy across calls
    (embedding_bag on the strided transpose is several times slower on CPU).
    """
    if w_dec_FD is None:
        w_dec_FD = sae.W_dec_DF.T.contiguous()
    out = torch.nn.functional.embedding_bag(
        indices_NK, w_dec_FD, per_sample_weights=values_NK.to(w_dec_FD.dtype), mode="sum"
    )
    return out + sae.b_dec_D + sae.mean_D if biases else out


def step_loss(
    sae: TopKSAE, x_ND: torch.Tensor, dead_F: torch.Tensor, aux_k: int, aux_coef: float, total_variance: float
) -> tuple[torch.Tensor, StepLosses]:
    """Differentiable loss of one batch: normalised MSE + aux_coef · AuxK on the latents flagged dead."""
    n_dead = int(dead_F.sum())
    k_aux = min(aux_k, n_dead) if aux_coef > 0 else 0
    values, indices, aux_values, aux_indices = encode_topk(sae, x_ND, dead_F, k_aux)
    w_dec_FD = sae.W_dec_DF.T.contiguous()
    err = x_ND - decode_topk(sae, values, indices, w_dec_FD=w_dec_FD)
    mse = err.pow(2).sum(-1).mean() / total_variance
    loss = mse
    aux = torch.zeros((), device=x_ND.device)
    if k_aux > 0:
        e = err.detach()
        e_hat = decode_topk(sae, aux_values, aux_indices, biases=False, w_dec_FD=w_dec_FD)
        aux = torch.nan_to_num((e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum(), nan=0.0, posinf=0.0)
        loss = loss + aux_coef * aux
    fired_F = torch.zeros(sae.shape.n_features, dtype=torch.bool, device=x_ND.device)
    fired_F[indices[values > 0]] = True
    return loss, StepLosses(mse.detach(), aux.detach(), fired_F)


@torch.no_grad()
def project_decoder_grad_(sae: TopKSAE) -> None:
    """Remove from each decoder column's gradient its component along that (unit) column."""
    w, g = sae.W_dec_DF, sae.W_dec_DF.grad
    if g is not None:
        g -= (w * g).sum(0, keepdim=True) * w


@torch.no_grad()
def scale_encoder_init_(sae: TopKSAE, generator: torch.Generator, n_probe: int = 256) -> None:
    """Rescale W_enc so that random unit inputs (around μ) reconstruct with unit mean norm (as openai)."""
    u = torch.randn(n_probe, sae.shape.d_model, generator=generator, dtype=sae.W_enc_FD.dtype)
    u = u / u.norm(dim=-1, keepdim=True)
    out = sae.decode(sae.encode(u.to(sae.mean_D.device) + sae.mean_D)) - sae.mean_D - sae.b_dec_D
    norm = float(out.norm(dim=-1).mean())
    if norm > 0:
        sae.W_enc_FD /= norm


@dataclass(frozen=True, eq=False)
class FitLog:
    rows_since_fired_F: torch.Tensor  # training rows seen since each latent last fired
    dead_F: torch.Tensor  # latents dead by the dead_tokens rule after the last step
    history: list[dict[str, float]]
    n_steps: int


def fit_sae_(
    sae: TopKSAE, batches: Iterable[torch.Tensor], cfg: SAETrainConfig, *, aux_k: int, dead_tokens: int,
    total_variance: float,
) -> FitLog:
    """Adam on `step_loss` for every batch (x_ND, any float dtype/device), in place on `sae`'s device.

    Per step: backward → drop the gradient component along each decoder column → Adam step → renormalise
    decoder columns. A latent is dead once more than `dead_tokens` rows passed since it last fired.
    """
    device = sae.W_dec_DF.device
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    since_fired_F = torch.zeros(sae.shape.n_features, dtype=torch.int64, device=device)
    history: list[dict[str, float]] = []
    step = 0
    for step, batch in enumerate(batches, start=1):
        x = batch.to(device, non_blocking=True).float()
        dead_F = since_fired_F > dead_tokens
        loss, parts = step_loss(sae, x, dead_F, aux_k, cfg.aux_coef, total_variance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        project_decoder_grad_(sae)
        opt.step()
        sae.normalize_decoder_()
        since_fired_F += x.shape[0]
        since_fired_F[parts.fired_F] = 0
        last = (step, parts.mse, parts.aux, dead_F.sum())
        if step % cfg.log_every == 0:
            history.append(_log_entry(*last))
    if step % cfg.log_every != 0:
        history.append(_log_entry(*last))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sae.eval()
    return FitLog(since_fired_F, since_fired_F > dead_tokens, history, step)


def _log_entry(step: int, mse: torch.Tensor, aux: torch.Tensor, n_dead: torch.Tensor) -> dict[str, Any]:
    return {"step": step, "mse_over_variance": float(mse), "aux_loss": float(aux), "n_dead": int(n_dead)}


def _prefetched(items: Iterator[Any]) -> Iterator[Any]:
    """Yield the items of `items`, computing the next one in a worker thread (memmap reads overlap compute)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, items, _DONE)
        while True:
            item = pending.result()
            if item is _DONE:
                return
            pending = pool.submit(next, items, _DONE)
            yield item


_DONE = object()


# ----------------------------------------------------------------------------------------------------
# Held-out evaluation


@dataclass(frozen=True, eq=False)
class HeldoutMetrics:
    fvu: float  # Σ‖x − x̂‖² / Σ‖x − x̄_heldout‖²
    pca_fvu: float  # same with x̂ = μ + V_k V_kᵀ (x − μ), V_k from the training covariance
    mean_l0: float
    dead_fraction: float  # features that never fire on held-out rows
    firing_frequency_F: np.ndarray  # fraction of held-out rows where each feature fires
    hist_edges: np.ndarray  # log10(frequency) bin edges
    hist_counts: np.ndarray  # features per bin (features that never fire are not in any bin)
    n_rows: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "heldout_fvu": self.fvu,
            "heldout_pca_fvu": self.pca_fvu,
            "fvu_over_pca_fvu": self.fvu / self.pca_fvu if self.pca_fvu > 0 else float("nan"),
            "mean_l0": self.mean_l0,
            "dead_fraction": self.dead_fraction,
            "n_dead": int((self.firing_frequency_F == 0).sum()),
            "n_heldout_rows": self.n_rows,
            "firing_frequency": [float(f) for f in self.firing_frequency_F],
            "firing_hist_log10_edges": [float(e) for e in self.hist_edges],
            "firing_hist_counts": [int(c) for c in self.hist_counts],
        }


def firing_histogram(freq_F: np.ndarray, n_rows: int, bin_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of log10(frequency) of the features that fire, bins of `bin_width` from ⌊log10(1/n)⌋ to 0."""
    lo = math.floor(math.log10(1 / max(n_rows, 1)) / bin_width) * bin_width
    n_bins = max(1, round(-lo / bin_width))
    edges = np.linspace(min(lo, -bin_width), 0.0, n_bins + 1)
    fired = freq_F[freq_F > 0]
    counts, _ = np.histogram(np.log10(fired), bins=edges)
    return edges, counts


@torch.no_grad()
def evaluate_heldout(
    sae: TopKSAE, dumps: ActivationDumps, heldout_mask_R: np.ndarray, stats: TrainStats, batch_rows: int,
    hist_bin_width: float, device: torch.device,
) -> HeldoutMetrics:
    """FVU, PCA-k FVU, L0 and firing frequencies over the held-out rows (streamed, float64 sums)."""
    mu = stats.mean_D.to(device)
    v = stats.pca_components_DK.to(device)
    n = 0
    sse = sse_pca = ss = l0 = torch.zeros((), dtype=torch.float64, device=device)
    s1 = torch.zeros(dumps.d_model, dtype=torch.float64, device=device)
    fires = torch.zeros(sae.shape.n_features, dtype=torch.float64, device=device)
    for rows, x16 in dumps.blocks(heldout_mask_R, batch_rows):
        x = torch.from_numpy(x16).to(device).float()
        values, indices, _, _ = encode_topk(sae, x)
        x_hat = decode_topk(sae, values, indices)
        xc = x.double() - mu
        sse = sse + (x - x_hat).double().pow(2).sum()
        sse_pca = sse_pca + (xc - (xc @ v) @ v.T).pow(2).sum()
        ss = ss + xc.pow(2).sum()
        s1 = s1 + xc.sum(0)
        fired = values > 0
        l0 = l0 + fired.sum()
        fires.index_add_(0, indices[fired], torch.ones_like(values[fired], dtype=torch.float64))
        n += len(rows)
    if n == 0:
        raise CtraceInputError("no held-out rows to evaluate")
    sst = float(ss - s1.pow(2).sum() / n)
    freq = (fires / n).cpu().numpy()
    edges, counts = firing_histogram(freq, n, hist_bin_width)
    return HeldoutMetrics(
        fvu=float(sse) / sst,
        pca_fvu=float(sse_pca) / sst,
        mean_l0=float(l0) / n,
        dead_fraction=float((freq == 0).mean()),
        firing_frequency_F=freq,
        hist_edges=edges,
        hist_counts=counts,
        n_rows=n,
    )


# ----------------------------------------------------------------------------------------------------
# Training driver


@dataclass(frozen=True, eq=False)
class SAETrainResult:
    sae: TopKSAE  # on CPU, eval mode
    config: SAETrainConfig
    resolved: dict[str, Any]  # d_model, n_features, aux_k, dead_tokens, n_steps, batch_size, device
    data_hash: str
    sources: tuple[tuple[str, str, int], ...]  # (acts path, rows path, n_rows)
    split: CellSplit
    stats: TrainStats
    metrics: HeldoutMetrics
    train_dead_fraction_end: float  # latents flagged dead (dead_tokens rule) at the last step
    loss_history: list[dict[str, float]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    def metrics_dict(self) -> dict[str, Any]:
        return {**self.metrics.as_dict(), "train_dead_fraction_end": self.train_dead_fraction_end}

    def sidecar(self, **extra: Any) -> dict[str, Any]:
        """JSON-ready sidecar for ctrace.sae.save_sae (μ itself is in the weights file as mean_D)."""
        return {
            "trainer": "ctrace.sae_training.train_sae",
            "config": asdict(self.config),
            "resolved": self.resolved,
            "seed": self.config.seed,
            "data_hash": self.data_hash,
            "data_hash_method": DATA_HASH_METHOD,
            "sources": [{"acts": a, "rows": r, "n_rows": n} for a, r, n in self.sources],
            "split": {
                "by": "cell, keyed by (source index, cell)",
                "n_train_cells": len(self.split.train_keys_K2),
                "n_heldout_cells": len(self.split.heldout_keys_K2),
                "n_train_rows": self.split.n_train_rows,
                "n_heldout_rows": self.split.n_heldout_rows,
                "heldout_cells": self.split.heldout_keys_K2.tolist(),
            },
            "pca_baseline": {"k": self.config.k, "n_rows": self.stats.n_pca_rows},
            "metrics": self.metrics_dict(),
            "loss_history": self.loss_history,
            "timing": self.timing,
            **extra,
        }


def _check_config(cfg: SAETrainConfig) -> None:
    problems = []
    for name in ("expansion", "k", "batch_size", "min_steps", "stream_rows", "log_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be ≥ 1 (got {getattr(cfg, name)})")
    for name in ("aux_k", "dead_tokens", "n_steps", "pca_max_rows"):
        value = getattr(cfg, name)
        if value is not None and value < (0 if name == "aux_k" else 1):
            problems.append(f"{name} must be positive or None (got {value})")
    if cfg.lr <= 0 or cfg.aux_coef < 0 or cfg.epochs <= 0 or cfg.hist_bin_width <= 0:
        problems.append("lr, epochs and hist_bin_width must be > 0 and aux_coef ≥ 0")
    if problems:
        raise CtraceInputError("SAE training config: " + "; ".join(problems))


def _batch_plan(n_train: int, batch_size: int, n_steps: int, seed: int) -> Iterator[np.ndarray]:
    """Per step the sorted indices (into the training rows) of one mini-batch; a fresh permutation per epoch."""
    rng = np.random.default_rng([seed, _SHUFFLE_STREAM])
    per_epoch = max(1, n_train // batch_size)
    perm = None
    for step in range(n_steps):
        i = step % per_epoch
        if i == 0:
            perm = rng.permutation(n_train)
        yield np.sort(perm[i * batch_size : (i + 1) * batch_size])


def train_sae(
    sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]], cfg: SAETrainConfig
) -> SAETrainResult:
    """Fit a TopK SAE on the training cells of `sources` and evaluate it on the held-out cells."""
    _check_config(cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    dumps = open_dumps(sources)
    digest = data_hash(dumps.paths)
    split = split_cells(dumps.source_R, dumps.cell_R, cfg.heldout_fraction, cfg.seed)
    train_rows = np.flatnonzero(~split.heldout_row_mask_R)
    n_train = len(train_rows)
    d, n_features = dumps.d_model, cfg.expansion * dumps.d_model
    if cfg.k > n_features:
        raise CtraceInputError(f"k={cfg.k} exceeds the number of features {n_features}")
    batch_size = min(cfg.batch_size, n_train)
    n_steps = cfg.n_steps or max(cfg.min_steps, math.ceil(cfg.epochs * n_train / batch_size))
    aux_k = min(d // 2 if cfg.aux_k is None else cfg.aux_k, n_features)
    dead_tokens = cfg.dead_tokens if cfg.dead_tokens is not None else min(10_000_000, n_train)

    stats = training_stats(
        dumps, ~split.heldout_row_mask_R, min(cfg.k, d), cfg.pca_max_rows, cfg.stream_rows, cfg.seed, device
    )
    t_stats = time.perf_counter()

    generator = torch.Generator().manual_seed(cfg.seed)
    sae = TopKSAE(SAEShape(d_model=d, n_features=n_features, k=cfg.k), generator=generator)
    sae.mean_D.copy_(stats.mean_D.float())
    scale_encoder_init_(sae, generator)
    sae.to(device)

    def load(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(dumps.gather(train_rows[batch]))

    batches = _prefetched(map(load, _batch_plan(n_train, batch_size, n_steps, cfg.seed)))
    log = fit_sae_(
        sae, batches, cfg, aux_k=aux_k, dead_tokens=dead_tokens, total_variance=stats.total_variance
    )
    t_train = time.perf_counter()

    sae.eval()
    metrics = evaluate_heldout(
        sae, dumps, split.heldout_row_mask_R, stats, batch_size, cfg.hist_bin_width, device
    )
    t_eval = time.perf_counter()
    sae = sae.cpu()
    return SAETrainResult(
        sae=sae,
        config=cfg,
        resolved={
            "d_model": d, "n_features": n_features, "aux_k": aux_k, "dead_tokens": dead_tokens,
            "n_steps": n_steps, "batch_size": batch_size, "device": str(device),
        },
        data_hash=digest,
        sources=tuple((str(a), str(r), int(n)) for (a, r), n in zip(dumps.paths, np.diff(dumps.offsets_S1))),
        split=split,
        stats=stats,
        metrics=metrics,
        train_dead_fraction_end=float(log.dead_F.float().mean()),
        loss_history=log.history,
        timing={
            "stats_seconds": t_stats - t0,
            "train_seconds": t_train - t_stats,
            "eval_seconds": t_eval - t_train,
            "train_rows_per_second": n_steps * batch_size / max(t_train - t_stats, 1e-9),
        },
    )
