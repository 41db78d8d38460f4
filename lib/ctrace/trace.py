"""Ablation sweep (method.md §6, §10): per-(source feature, target layer, target feature) sufficient statistics.

For a traced cell where source feature f (layer L) fires, the error-preserving zero-ablation is
h'_L = h_L − z_f · W_dec[:, f] at f's firing positions; blocks L+1..max(target) are run from h'_L and
δ_g = mean over the response positions of (a_ℓ,g − c_ℓ,g), a/c = SAE codes of the ablated/clean h_ℓ.

How the work is laid out (the levers of §10):
- cells are taken in order of length and go in chunks of `cells_per_clean_pass`; one clean pass per chunk
  (right-padded: little padding, as its cells have similar lengths), blocks 0..L only, and one source-SAE
  encode of all its gene positions;
- the source-feature list is cut into groups of `features_per_batch` consecutive features. Per chunk and
  group, the ablations (real and null) of the chunk's cells are packed, cells in order of length, into
  passes of at most `ablations_per_batch` ablated rows, each pass carrying one unablated copy of each of
  its cells (so cells of similar length share a pass: little padding, and the per-pass costs are shared
  by several cells); δ is taken against the in-batch copy, so batch-size-dependent numerics cancel. A
  pass never mixes groups, so a feature's statistics are bit-identical in every run whose group holds the
  same features (shards cut at multiples of features_per_batch merge to exactly the single run);
- blocks 0..L are never re-run; blocks L+1..stop−1 run in full and the last target block only at the
  positions that are read (`Backend.block_at`: keys/values everywhere, the rest at those queries);
  nothing after the last target layer is run;
- the ablated rows differ from their clean row only where their feature fires, so block L+1 projects
  q/k/v on the clean rows and at those positions only (`Edits` of `Backend.run_blocks`/`block_at`);
- ablated states are SAE-encoded only at the positions where the response is read; the in-batch clean
  copies only at the union of those positions (one encode for both, so identical states give identical codes);
- (cell, feature) pairs where the feature never fires are skipped (they contribute n = 0).
Statistics are float64 sums and counts, added per cell in a fixed order (deterministic on GPUs too), so
shards over source features merge exactly (`merge_stats`).

Null control: per source feature, `null_draws` random unit directions u_r (seeded by (seed, layer, f, r)
only, so they do not depend on sharding) ablated as h' = h − z_f ‖W_dec[:, f]‖ u_r: the same positions and
per-position norm as the real ablation, read at the same positions; their statistics are kept apart.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ctrace.errors import CtraceInputError
from ctrace.io import UNREADABLE_FILE_ERRORS, unreadable, write_npz
from ctrace.models.base import Backend, Batch, Cell, Edits
from ctrace.sae import TopKSAE

RESPONSES = ("firing", "all")
SELECTION_STRATEGIES = ("top_frequency", "annotated", "random", "explicit", "all")
STATS_FORMAT = "ctrace.sweep_stats/1"
# The sweep reduces (ablated − clean) codes to per-item δ in pieces of at most this many float64 bytes.
DELTA_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------------
# configuration and source-feature selection
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """How a sweep is run. `device` None = the backend's device.

    features_per_batch: the source-feature list handed to `run_sweep` is cut into groups of this many
    consecutive features, starting at its first entry. A forward pass only ever holds ablations (real and
    null) of ONE cell and ONE group, so what a pass contains — and hence every float bit of a feature's
    statistics — depends only on the cells, the group's features and this config, never on the other
    features of the run: sharding the list at multiples of features_per_batch reproduces the single run
    exactly. ablations_per_batch: at most this many ablated sequences per forward pass (plus the cell's one
    clean copy); a cell's ablations of one group are split into passes of that size (a memory cap).
    cells_per_clean_pass: the cells, in order of length, go in chunks of this many; each chunk has one clean
    pass (blocks 0..L, right-padded) and one source encode, and its ablations are packed into passes (see
    `_passes_of_chunk`). A cell's clean h_L depends on its chunk only to float rounding, and the chunks
    depend on the cell list only, so shards of one sweep stay bit-compatible. Memory: the clean pass holds
    about cells × tokens × (ffn + 4·d_model) floats at its peak.
    ablation_scale: multiplies the removed contribution (1 = zero-ablation; 0 = a no-op control whose
    δ must be exactly 0). autocast_bf16: run the transformer blocks under bf16 autocast (GPU only; the
    SAE encodes and δ stay fp32); check edge agreement with fp32 before relying on it.
    """

    features_per_batch: int = 8
    ablations_per_batch: int = 32
    cells_per_clean_pass: int = 16
    response: str = "firing"
    null_draws: int = 0
    seed: int = 0
    device: str | None = None
    ablation_scale: float = 1.0
    autocast_bf16: bool = False

    def __post_init__(self) -> None:
        for name in ("features_per_batch", "ablations_per_batch", "cells_per_clean_pass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise CtraceInputError(f"sweep: {name} must be an integer ≥ 1, got {value!r}")
        if self.response not in RESPONSES:
            raise CtraceInputError(f"sweep: response {self.response!r} is not one of {RESPONSES}")
        if self.null_draws < 0:
            raise CtraceInputError(f"sweep: null_draws must be ≥ 0, got {self.null_draws}")
        if not np.isfinite(self.ablation_scale):
            raise CtraceInputError(f"sweep: ablation_scale must be finite, got {self.ablation_scale}")


def select_source_features(
    strategy: str,
    frequency_F: np.ndarray,
    annotated_scores_F: np.ndarray | None,
    n: int,
    seed: int,
    explicit: Sequence[int] | None = None,
) -> np.ndarray:
    """Source feature ids (int64), in selection order.

    top_frequency: the n most frequently firing features (ties: lower id first).
    annotated: features with ≥1 significant term, richest first (most significant terms, ties by higher
      frequency, then lower id); at most n, fewer if fewer are annotated.
    random: n distinct features drawn (seeded) among those that fire at all; returned sorted.
    explicit: the given ids, validated (in range, unique), in the given order.
    all: every feature (features that never fire are skipped by the sweep at no cost).
    """
    freq = np.asarray(frequency_F, dtype=np.float64)
    n_features = freq.shape[0]
    if strategy not in SELECTION_STRATEGIES:
        raise CtraceInputError(f"source feature strategy {strategy!r} is not one of {SELECTION_STRATEGIES}")
    if strategy == "all":
        return np.arange(n_features, dtype=np.int64)
    if strategy == "explicit":
        if explicit is None:
            raise CtraceInputError("source feature strategy 'explicit' needs a list of feature ids")
        ids = np.asarray(list(explicit), dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n_features)]
        if bad.size:
            raise CtraceInputError(f"explicit source features out of range 0..{n_features - 1}: {bad.tolist()}")
        if np.unique(ids).size != ids.size:
            raise CtraceInputError("explicit source features contain duplicates")
        return ids
    if n < 0:
        raise CtraceInputError(f"number of source features must be ≥ 0, got {n}")
    ids = np.arange(n_features, dtype=np.int64)
    if strategy == "top_frequency":
        order = np.lexsort((ids, -freq))
        return order[:n].astype(np.int64)
    if strategy == "random":
        alive = ids[freq > 0]
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(alive, size=min(n, alive.size), replace=False)).astype(np.int64)
    # annotated
    if annotated_scores_F is None:
        raise CtraceInputError("source feature strategy 'annotated' needs per-feature annotation scores")
    score = np.asarray(annotated_scores_F, dtype=np.float64)
    if score.shape != freq.shape:
        raise CtraceInputError(f"annotation scores have shape {score.shape}, frequencies {freq.shape}")
    order = np.lexsort((ids, -freq, -score))
    order = order[score[order] > 0]
    return order[:n].astype(np.int64)


def null_directions(seed: int, source_layer: int, feature: int, draws: int, d_model: int) -> torch.Tensor:
    """u_RD: `draws` random unit directions, a function of (seed, source_layer, feature) only (float32, CPU)."""
    state = np.random.SeedSequence([int(seed), int(source_layer), int(feature)]).generate_state(2, np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    u = torch.randn(draws, d_model, generator=gen, dtype=torch.float64)
    return (u / u.norm(dim=1, keepdim=True)).float()


def cells_digest(cells: Sequence[Cell]) -> str:
    """SHA-1 over the cells' token ids (and values): shards may only be merged if traced on equal cells."""
    digest = hashlib.sha1()
    for cell in cells:
        ids = np.ascontiguousarray(cell.input_ids, dtype=np.int64)
        digest.update(np.int64(ids.size).tobytes())
        digest.update(ids.tobytes())
        if cell.values is not None:
            digest.update(np.ascontiguousarray(cell.values, dtype=np.float32).tobytes())
    return digest.hexdigest()


def saes_digest(saes: dict[int, TopKSAE], layers: Sequence[int]) -> str:
    """SHA-1 over the weights of the SAEs of `layers` (in order): shards may only be merged if swept with
    the same SAEs (not, e.g., one shard before and one after a refit)."""
    digest = hashlib.sha1()
    for layer in layers:
        digest.update(np.int64(layer).tobytes())
        for name, tensor in sorted(saes[layer].state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# statistics container
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SweepStats:
    """Sufficient statistics of one sweep (one source layer, a set of source features, fixed cells).

    S source features, L target layers, G target features (equal for all target layers), R null draws.
    n_S: cells where source feature s fired (= n of every (s, ℓ, g): each such cell gives one δ per
    target). sum/sumsq: Σδ, Σδ² (float64); pos/neg: #δ>0, #δ<0 (int64). `null_*` the same for the
    random-direction controls, per draw (their n is n_S too).
    """

    source_layer: int
    source_features_S: np.ndarray
    target_layers_L: np.ndarray
    n_target_features: int
    n_S: np.ndarray
    sum_SLG: np.ndarray
    sumsq_SLG: np.ndarray
    pos_SLG: np.ndarray
    neg_SLG: np.ndarray
    null_sum_SRLG: np.ndarray
    null_sumsq_SRLG: np.ndarray
    null_pos_SRLG: np.ndarray
    null_neg_SRLG: np.ndarray
    response: str = "firing"
    ablation_scale: float = 1.0
    seed: int = 0
    null_draws: int = 0
    n_cells: int = 0
    cells_digest: str = ""
    backend: str = ""
    model: str = ""  # the config's label of the model whose SAEs were used ("" = not recorded)
    saes_digest: str = ""  # `saes_digest` of the source and target SAEs ("" = not recorded)
    forward_passes: int = 0  # ablated sequences run (real source features)
    null_forward_passes: int = 0  # ablated sequences run for the null directions
    clean_passes: int = 0  # clean sequences run: one per cell (blocks 0..L) + one per cell of each ablation pass
    clean_block_tokens: int = 0  # Σ (padded) tokens × blocks of the cells' clean passes (blocks 0..L)
    downstream_block_tokens: int = 0  # Σ rows × tokens × blocks of the ablation batches (blocks L+1..)
    wall_time_s: float = 0.0

    @property
    def n_SLG(self) -> np.ndarray:
        """n broadcast to every (s, ℓ, g) (read-only view)."""
        shape = (self.n_S.shape[0], self.target_layers_L.shape[0], self.n_target_features)
        return np.broadcast_to(self.n_S[:, None, None], shape)

    # ---- persistence ------------------------------------------------------------------------------
    _ARRAYS = (
        "source_features_S",
        "target_layers_L",
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
    _INTS = (
        "source_layer",
        "n_target_features",
        "seed",
        "null_draws",
        "n_cells",
        "forward_passes",
        "null_forward_passes",
        "clean_passes",
        "clean_block_tokens",
        "downstream_block_tokens",
    )
    _FLOATS = ("ablation_scale", "wall_time_s")
    _STRS = ("response", "cells_digest", "backend", "model", "saes_digest")
    _OPTIONAL = {"model": "", "saes_digest": ""}  # absent from files written before they were recorded

    def save(self, path: str | os.PathLike) -> None:
        """Write an uncompressed .npz atomically (layout: see `SweepStats.load`)."""
        arrays: dict[str, np.ndarray] = {"format": np.array(STATS_FORMAT)}
        for name in self._ARRAYS:
            arrays[name] = np.ascontiguousarray(getattr(self, name))
        for name in self._INTS:
            arrays[name] = np.array(int(getattr(self, name)), dtype=np.int64)
        for name in self._FLOATS:
            arrays[name] = np.array(float(getattr(self, name)), dtype=np.float64)
        for name in self._STRS:
            arrays[name] = np.array(str(getattr(self, name)))
        write_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepStats:
        """Read a file written by `save`.

        Layout: `format` = "ctrace.sweep_stats/1"; int64 arrays source_features_S (S,), target_layers_L (L,),
        n_S (S,), pos_SLG/neg_SLG (S, L, G), null_pos_SRLG/null_neg_SRLG (S, R, L, G); float64 sum_SLG,
        sumsq_SLG (S, L, G), null_sum_SRLG, null_sumsq_SRLG (S, R, L, G); 0-d int64 scalars source_layer,
        n_target_features, seed, null_draws, n_cells, forward_passes, null_forward_passes, clean_passes,
        clean_block_tokens, downstream_block_tokens; 0-d float64 ablation_scale, wall_time_s; 0-d str
        response, cells_digest, backend, model and saes_digest (the last two optional: "" when absent).
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                if "format" not in data or str(data["format"]) != STATS_FORMAT:
                    raise CtraceInputError(f"{path}: not a ctrace sweep-statistics file ({STATS_FORMAT})")
                kwargs = {name: np.array(data[name]) for name in cls._ARRAYS}
                kwargs.update({name: int(data[name]) for name in cls._INTS})
                kwargs.update({name: float(data[name]) for name in cls._FLOATS})
                kwargs.update({name: str(data[name]) for name in cls._STRS if name not in cls._OPTIONAL})
                kwargs.update({name: str(data[name]) if name in data else default
                               for name, default in cls._OPTIONAL.items()})
        except CtraceInputError:
            raise
        except (KeyError, *UNREADABLE_FILE_ERRORS) as err:
            raise CtraceInputError(
                f"{path}: cannot read sweep statistics ({unreadable(err)}); re-run the sweep step"
            ) from None
        sums = ("sum_SLG", "sumsq_SLG", "null_sum_SRLG", "null_sumsq_SRLG")
        if not all(np.isfinite(kwargs[name]).all() for name in sums):
            raise CtraceInputError(f"{path}: sums of δ hold NaN or inf, which would silently drop tests; re-run the "
                                   "sweep in float32")
        return cls(**kwargs)


def _empty_stats(n_sources: int, n_layers: int, n_feats: int, draws: int) -> dict[str, np.ndarray]:
    return {
        "n_S": np.zeros(n_sources, np.int64),
        "sum_SLG": np.zeros((n_sources, n_layers, n_feats), np.float64),
        "sumsq_SLG": np.zeros((n_sources, n_layers, n_feats), np.float64),
        "pos_SLG": np.zeros((n_sources, n_layers, n_feats), np.int64),
        "neg_SLG": np.zeros((n_sources, n_layers, n_feats), np.int64),
        "null_sum_SRLG": np.zeros((n_sources, draws, n_layers, n_feats), np.float64),
        "null_sumsq_SRLG": np.zeros((n_sources, draws, n_layers, n_feats), np.float64),
        "null_pos_SRLG": np.zeros((n_sources, draws, n_layers, n_feats), np.int64),
        "null_neg_SRLG": np.zeros((n_sources, draws, n_layers, n_feats), np.int64),
    }


def merge_stats(parts: Sequence[SweepStats]) -> SweepStats:
    """Exact union of shards over disjoint source features (sorted by feature id); counters are summed.

    The result does not depend on how the source features were split: each feature's sums come from
    the same cells in the same order whatever shard it ran in.
    """
    if not parts:
        raise CtraceInputError("merge_stats: nothing to merge")
    first = parts[0]
    for key in (
        "source_layer",
        "n_target_features",
        "response",
        "ablation_scale",
        "seed",
        "null_draws",
        "n_cells",
        "cells_digest",
        "backend",
    ):
        values = {getattr(p, key) for p in parts}
        if len(values) > 1:
            raise CtraceInputError(f"merge_stats: shards disagree on {key}: {sorted(map(str, values))}")
    models = {p.model for p in parts} - {""}  # shards written before the label was recorded carry ""
    if len(models) > 1:
        raise CtraceInputError(f"merge_stats: shards disagree on model: {sorted(models)}")
    for p in parts[1:]:
        if not np.array_equal(p.target_layers_L, first.target_layers_L):
            raise CtraceInputError(
                f"merge_stats: shards disagree on target layers: {first.target_layers_L.tolist()} vs "
                f"{p.target_layers_L.tolist()}"
            )
    if len({p.saes_digest for p in parts} - {""}) > 1:
        raise CtraceInputError(
            "merge_stats: shards were swept with different SAEs (saes_digest differs: an SAE was refitted "
            "between shards); re-run the sweep shards of this layer"
        )
    feats = np.concatenate([p.source_features_S for p in parts])
    uniq, counts = np.unique(feats, return_counts=True)
    if (counts > 1).any():
        raise CtraceInputError(f"merge_stats: source features in more than one shard: {uniq[counts > 1].tolist()}")
    order = np.argsort(feats, kind="stable")
    arrays = {
        name: np.concatenate([getattr(p, name) for p in parts])[order]
        for name in SweepStats._ARRAYS
        if name not in ("target_layers_L",)
    }
    return SweepStats(
        source_layer=first.source_layer,
        target_layers_L=first.target_layers_L.copy(),
        n_target_features=first.n_target_features,
        response=first.response,
        ablation_scale=first.ablation_scale,
        seed=first.seed,
        null_draws=first.null_draws,
        n_cells=first.n_cells,
        cells_digest=first.cells_digest,
        backend=first.backend,
        model=models.pop() if models else "",
        saes_digest=next((p.saes_digest for p in parts if p.saes_digest), ""),
        forward_passes=sum(p.forward_passes for p in parts),
        null_forward_passes=sum(p.null_forward_passes for p in parts),
        clean_passes=sum(p.clean_passes for p in parts),
        clean_block_tokens=sum(p.clean_block_tokens for p in parts),
        downstream_block_tokens=sum(p.downstream_block_tokens for p in parts),
        wall_time_s=sum(p.wall_time_s for p in parts),
        **arrays,
    )


# ---------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What every ablation batch of one sweep shares (internal)."""

    backend: Backend
    source_layer: int
    stop: int  # last block run = deepest target layer
    sae_slots: dict[int, tuple[int, TopKSAE]]  # target layer → (accumulator slot, SAE on the device)
    dir_ID: torch.Tensor  # ablation directions: real (s < S) then null (S + s·R + r), scale applied
    response: str
    amp: dict
    acc_IXLG: torch.Tensor  # float64 (item, [Σδ, Σδ², #δ>0, #δ<0], target layer, target feature)


def _sae_on(sae: TopKSAE, device: torch.device) -> TopKSAE:
    """The SAE on `device` (a moved copy if needed; the caller's module is left where it is)."""
    if sae.W_dec_DF.device == device:
        return sae.eval()
    return copy.deepcopy(sae).to(device).eval()


def _check_inputs(
    backend: Backend, saes: dict[int, TopKSAE], source_layer: int, source_features: np.ndarray, target_layers: list[int]
) -> int:
    backend._check_layers([source_layer, *target_layers])
    if not target_layers:
        raise CtraceInputError("sweep: no target layers")
    early = [t for t in target_layers if t <= source_layer]
    if early:
        raise CtraceInputError(f"sweep: target layers {early} are not after the source layer {source_layer}")
    missing = [layer for layer in [source_layer, *target_layers] if layer not in saes]
    if missing:
        raise CtraceInputError(f"sweep: no SAE for layer(s) {missing}")
    for layer in [source_layer, *target_layers]:
        if saes[layer].shape.d_model != backend.d_model:
            raise CtraceInputError(
                f"sweep: SAE of layer {layer} has d_model {saes[layer].shape.d_model}, model has {backend.d_model}"
            )
    widths = {saes[t].shape.n_features for t in target_layers}
    if len(widths) != 1:
        raise CtraceInputError(f"sweep: target-layer SAEs must have equal widths, got {sorted(widths)}")
    n_src = saes[source_layer].shape.n_features
    bad = source_features[(source_features < 0) | (source_features >= n_src)]
    if bad.size:
        raise CtraceInputError(f"sweep: source features out of range 0..{n_src - 1}: {bad.tolist()}")
    if np.unique(source_features).size != source_features.size:
        raise CtraceInputError("sweep: duplicate source features")
    return widths.pop()


@dataclass(frozen=True)
class _Pass:
    """One ablation pass (internal): the clean rows of `cells_m` (chunk-local cell indices), then the
    ablated rows; ablated row i copies clean row base_I[i] and removes direction dir_I[i] scaled by the
    codes of source column src_I[i]; base_I is ascending."""

    cells_m: np.ndarray
    base_I: np.ndarray
    dir_I: np.ndarray
    src_I: np.ndarray
    n_real: int

    @property
    def segments_m(self) -> np.ndarray:
        """The ablated rows of clean row j are the contiguous run [segments_m[j], segments_m[j + 1])."""
        return np.concatenate([[0], np.cumsum(np.bincount(self.base_I, minlength=self.cells_m.size))])


def cell_chunks(cells: Sequence[Cell], size: int) -> list[np.ndarray]:
    """Indices of `cells` in order of length (ties: given order), cut into chunks of `size`: the chunks of
    one clean pass each, whose cells (of similar length) share little padding. Depends on the cells only."""
    by_length = np.argsort([len(cell.input_ids) for cell in cells], kind="stable")
    return [by_length[first : first + size] for first in range(0, len(cells), size)]


def _passes_of_chunk(fired_CS: np.ndarray, lengths_C: np.ndarray, n_sources: int, cfg: SweepConfig) -> list[_Pass]:
    """The ablation passes of one chunk of cells.

    fired_CS: per chunk cell, which entries of the source-feature list handed to `run_sweep` (n_sources
    entries) fire in it. Features go in groups [g·fpb, (g+1)·fpb) of that list; a cell's items in a group
    are its fired features' real ablations (direction row s), then their null draws (row n_sources + s·R
    + r). Per group, the cells' items are taken in order of cell length (ties: chunk order) and packed into
    passes of ≤ ablations_per_batch ablated rows, each cell of a pass with its own clean row, so that cells
    of similar length share a pass (little padding). A pass's content therefore depends on the chunk's
    cells and the group's features only; every item's cells come in the same order in every run.
    """
    fpb, cap, R = cfg.features_per_batch, cfg.ablations_per_batch, cfg.null_draws
    order = np.argsort(lengths_C, kind="stable")
    passes: list[_Pass] = []
    for lo in range(0, n_sources, fpb):
        pieces: list[tuple[int, np.ndarray, np.ndarray]] = []  # (cell, direction rows, source columns)
        filled = 0

        def flush() -> None:
            nonlocal pieces, filled
            if not pieces:
                return
            sizes = np.array([rows.size for _, rows, _ in pieces])
            dirs = np.concatenate([rows for _, rows, _ in pieces])
            passes.append(
                _Pass(
                    cells_m=np.array([c for c, _, _ in pieces], dtype=np.int64),
                    base_I=np.repeat(np.arange(len(pieces)), sizes),
                    dir_I=dirs,
                    src_I=np.concatenate([cols for _, _, cols in pieces]),
                    n_real=int((dirs < n_sources).sum()),
                )
            )
            pieces, filled = [], 0

        for c in order:
            f_g = lo + np.flatnonzero(fired_CS[c, lo : lo + fpb])
            if f_g.size == 0:
                continue
            rows = np.concatenate([f_g, n_sources + (f_g[:, None] * R + np.arange(R)[None, :]).reshape(-1)])
            cols = np.concatenate([f_g, np.repeat(f_g, R)])
            while rows.size:
                take = min(cap - filled, rows.size)
                pieces.append((int(c), rows[:take], cols[:take]))
                filled += take
                rows, cols = rows[take:], cols[take:]
                if filled == cap:
                    flush()
        flush()
    return passes


@torch.inference_mode()
def run_sweep(
    backend: Backend,
    saes: dict[int, TopKSAE],
    cells: Sequence[Cell],
    source_layer: int,
    source_features: Sequence[int],
    target_layers: Sequence[int],
    cfg: SweepConfig,
) -> SweepStats:
    """Ablate every source feature in every cell where it fires; accumulate δ statistics per target.

    δ_g = mean_{t ∈ response positions} (a_ℓ,g(t) − c_ℓ,g(t)),  h'_L(t) = h_L(t) − s·z_f(t)·W_dec[:, f].
    Cells, in order of length, go in chunks of `cfg.cells_per_clean_pass` (one clean pass of blocks 0..L and
    one source encode per chunk); per chunk and group of `cfg.features_per_batch` consecutive source
    features, passes of ≤ `cfg.ablations_per_batch` ablated rows plus one clean row per cell of the pass
    (`_passes_of_chunk`);
    blocks L+1..max(target) − 1 in full (block L+1's q/k/v only at the edited positions), the last block
    only at the response positions (`Backend.block_at`).
    """
    t_start = time.perf_counter()
    L = int(source_layer)
    src = np.asarray(list(source_features), dtype=np.int64)
    targets = sorted({int(t) for t in target_layers})
    n_feats = _check_inputs(backend, saes, L, src, targets)
    device = torch.device(cfg.device) if cfg.device is not None else torch.device(backend.device)
    if device.type != torch.device(backend.device).type:
        raise CtraceInputError(f"sweep: device {device} differs from the model's device {backend.device}")
    sae_src = _sae_on(saes[L], device)
    S, R, NL, D = src.size, cfg.null_draws, len(targets), backend.d_model
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)

    # Ablation directions: v = s·W_dec[:, f] (real) and s·‖W_dec[:, f]‖·u_r (null), rows (S·(1+R), D).
    # Everything per feature is computed so that its bits do not depend on the other features of the run.
    src_dev = torch.from_numpy(src).to(device)
    w_SD = sae_src.W_dec_DF.T[src_dev].float() * cfg.ablation_scale
    dirs = [w_SD]
    if R:
        u = torch.stack([null_directions(cfg.seed, L, int(f), R, D) for f in src]) if S else torch.zeros(0, R, D)
        norms = sae_src.W_dec_DF.norm(dim=0).float()[src_dev]  # all features' norms, then picked
        dirs.append((u.to(device) * (norms * cfg.ablation_scale)[:, None, None]).reshape(S * R, D))
    dir_ID = torch.cat(dirs)  # item kinds: s (real) for s < S, then S + s·R + r (null)

    # Accumulator on the device: items 0..S-1 real, S.. null (s·R + r); float64 sums and counts (exact
    # integers far beyond any cell count).
    n_items = S * (1 + R)
    plan = _Plan(
        backend=backend,
        source_layer=L,
        stop=targets[-1],
        sae_slots={t: (i, _sae_on(saes[t], device)) for i, t in enumerate(targets)},
        dir_ID=dir_ID,
        response=cfg.response,
        amp=amp,
        acc_IXLG=torch.zeros(n_items, 4, NL, n_feats, dtype=torch.float64, device=device),
    )
    n_S = np.zeros(S, np.int64)
    counters = dict(
        forward_passes=0, null_forward_passes=0, clean_passes=0, clean_block_tokens=0, downstream_block_tokens=0
    )

    chunks = cell_chunks(cells, cfg.cells_per_clean_pass) if S else []  # no source feature: nothing to run
    for chunk in chunks:
        batch_c = backend.collate([cells[i] for i in chunk])
        C, Tc = batch_c.input_ids_BT.shape
        with torch.autocast(**amp):
            h = backend.embed(batch_c)
            for _, h in backend.run_blocks(h, batch_c, 0, L):
                pass
        counters["clean_passes"] += C
        counters["clean_block_tokens"] += C * Tc * (L + 1)
        # The source codes of every gene position of the chunk in one encode, laid out (cell, source, position).
        with torch.autocast(device.type, enabled=False):
            z_CST = h.new_zeros(C, Tc, S, dtype=torch.float32)
            z_CST[batch_c.gene_BT] = sae_src.encode(h[batch_c.gene_BT].float())[:, src_dev]
            z_CST = z_CST.transpose(1, 2)
        fired_CS = (z_CST > 0).any(dim=2).cpu().numpy()
        n_S += fired_CS.sum(axis=0)
        lengths_C = np.array([len(cells[i].input_ids) for i in chunk])
        for p in _passes_of_chunk(fired_CS, lengths_C, S, cfg):
            T = int(lengths_C[p.cells_m].max())
            _ablation_batch(plan, batch_c, h, z_CST, p, T)
            counters["forward_passes"] += p.n_real
            counters["null_forward_passes"] += p.dir_I.size - p.n_real
            counters["clean_passes"] += p.cells_m.size
            counters["downstream_block_tokens"] += (p.cells_m.size + p.dir_I.size) * T * (plan.stop - L)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    acc = plan.acc_IXLG.cpu().numpy()
    bad_items = np.flatnonzero(~np.isfinite(acc).all(axis=(1, 2, 3)))
    if bad_items.size:
        # NaN/inf δ (an overflow in a half-precision model, a NaN in the weights) would silently drop tests
        bad = np.unique(src[np.where(bad_items < S, bad_items, (bad_items - S) // max(R, 1))])
        raise CtraceInputError(
            f"sweep: non-finite responses (NaN or inf) for {bad.size} source feature(s) of layer {L}, e.g. "
            f"{bad[:5].tolist()}; the model or SAEs produce non-finite activations (run the model in float32, "
            "without bf16 autocast, and check its weights)"
        )
    out_sum, out_sq = acc[:, 0], acc[:, 1]
    out_pos, out_neg = acc[:, 2].astype(np.int64), acc[:, 3].astype(np.int64)

    def _null(a: np.ndarray) -> np.ndarray:
        return a[S:].reshape(S, R, NL, n_feats)

    return SweepStats(
        source_layer=L,
        source_features_S=src.copy(),
        target_layers_L=np.asarray(targets, dtype=np.int64),
        n_target_features=n_feats,
        n_S=n_S,
        sum_SLG=out_sum[:S].copy(),
        sumsq_SLG=out_sq[:S].copy(),
        pos_SLG=out_pos[:S].copy(),
        neg_SLG=out_neg[:S].copy(),
        null_sum_SRLG=_null(out_sum).copy(),
        null_sumsq_SRLG=_null(out_sq).copy(),
        null_pos_SRLG=_null(out_pos).copy(),
        null_neg_SRLG=_null(out_neg).copy(),
        response=cfg.response,
        ablation_scale=float(cfg.ablation_scale),
        seed=int(cfg.seed),
        null_draws=R,
        n_cells=len(cells),
        cells_digest=cells_digest(cells),
        saes_digest=saes_digest(saes, [L, *targets]),
        backend=getattr(backend, "name", type(backend).__name__),
        wall_time_s=time.perf_counter() - t_start,
        **counters,
    )


def _ablation_batch(plan: _Plan, batch_c: Batch, h_CTD: torch.Tensor, z_CST: torch.Tensor, p: _Pass, T: int) -> None:
    """One pass: rows 0..m−1 = the clean cells `p.cells_m` (their chunk-clean-pass h_L, cut to T tokens),
    rows m.. = their ablations; δ added to plan.acc_IXLG.

    Blocks L+1..stop−1 run in full; block `stop` only at the read positions (`Backend.block_at`); block L+1
    projects q/k/v only where the rows differ from their clean row (`Edits`).
    """
    device = h_CTD.device
    backend, L, stop = plan.backend, plan.source_layer, plan.stop
    cells_m = torch.from_numpy(p.cells_m).to(device)
    base_I = torch.from_numpy(p.base_I).to(device)
    dir_I = torch.from_numpy(p.dir_I).to(device)
    m, I = cells_m.numel(), base_I.numel()
    # Ablation magnitudes per (item, position): z of the item's source feature (0 where it is silent).
    z_IT = z_CST[cells_m[base_I], torch.from_numpy(p.src_I).to(device), :T]
    fires_IT = z_IT > 0
    item_C, pos_C = torch.nonzero(fires_IT, as_tuple=True)
    # Every row a copy of its clean row; the ablated rows minus z·v where their feature fires.
    bases = torch.arange(m, device=device)
    slot_B = torch.cat([bases, base_I])
    cell_B = cells_m[slot_B]
    h_BTD = h_CTD[:, :T].index_select(0, cell_B)
    row_C = m + item_C
    h_BTD[row_C, pos_C] -= (z_IT[item_C, pos_C, None] * plan.dir_ID[dir_I[item_C]]).to(h_BTD.dtype)
    batch = batch_c.select(cell_B, length=T)
    # Read positions: each clean row at the union of its items' response positions (U pairs), then the
    # N (item, position) pairs; one gather (or one `block_at`) and one SAE encode per target layer.
    resp_IT = fires_IT if plan.response == "firing" else batch.gene_BT[m:]
    item_N, pos_N = (item_C, pos_C) if plan.response == "firing" else torch.nonzero(resp_IT, as_tuple=True)
    base_N = base_I[item_N]
    read_mT = torch.zeros(m, T, dtype=torch.bool, device=device)
    read_mT[base_N, pos_N] = True
    base_U, pos_U = torch.nonzero(read_mT, as_tuple=True)
    U = base_U.numel()
    lut_mT = torch.full((m, T), -1, dtype=torch.long, device=device)
    lut_mT[base_U, pos_U] = torch.arange(U, device=device)
    clean_of_N = lut_mT[base_N, pos_N]
    rows_M = torch.cat([base_U, m + item_N])
    pos_M = torch.cat([pos_U, pos_N])
    # δ_i = Σ_n w_in (a_n − c_n) with w_in = 1/#(response positions of item i) where item_n = i: one float64
    # matmul per layer (deterministic on GPUs, unlike scattered adds).
    inv_count_I = 1.0 / resp_IT.sum(dim=1).to(torch.float64)
    weight_IN = torch.zeros(I, item_N.numel(), dtype=torch.float64, device=device)
    weight_IN[item_N, torch.arange(item_N.numel(), device=device)] = inv_count_I[item_N]
    delta_ILG = torch.empty(I, len(plan.sae_slots), plan.acc_IXLG.shape[3], dtype=torch.float64, device=device)
    N = item_N.numel()
    chunk = max(1, DELTA_CHUNK_BYTES // (8 * delta_ILG.shape[2]))

    def response(slot: int, sae: TopKSAE, x_MD: torch.Tensor) -> None:
        with torch.autocast(device.type, enabled=False):
            # clean and ablated positions in ONE encode: identical inputs give bit-identical codes
            codes = sae.encode(x_MD.float())
            # over N in chunks: the float64 (a − c) of every (item, position) at once would be N × G × 8 bytes
            # (GBs with response "all" on long cells), several times a block's own activations
            delta_ILG[:, slot] = 0
            for lo in range(0, max(N, 1), chunk):
                diff_nG = (codes[U + lo:U + lo + chunk] - codes[clean_of_N[lo:lo + chunk]]).to(torch.float64)
                delta_ILG[:, slot] += weight_IN[:, lo:lo + chunk] @ diff_nG

    # The ablated rows differ from their clean row only where their source feature fires: block L+1
    # projects q/k/v there only.
    edits = Edits(bases_K=bases, slot_B=slot_B, rows_N=row_C, pos_N=pos_C)
    with torch.autocast(**plan.amp):
        if stop == L + 1:
            h_MD = backend.block_at(h_BTD, batch, stop, rows_M, pos_M, edits)
        else:
            for layer, h in backend.run_blocks(h_BTD, batch, L + 1, stop - 1, edits):
                if layer in plan.sae_slots:
                    response(*plan.sae_slots[layer], h[rows_M, pos_M])
            h_MD = backend.block_at(h, batch, stop, rows_M, pos_M)
        response(*plan.sae_slots[stop], h_MD)
    # Σδ, Σδ², #δ>0, #δ<0 per item; one index_add per cell of the pass, in order, so that every item's
    # cells are added in the same order whatever the device (the items of one cell are distinct).
    stats_IXLG = torch.stack([delta_ILG, delta_ILG * delta_ILG, (delta_ILG > 0).double(), (delta_ILG < 0).double()], 1)
    for j in range(m):
        lo, hi = int(p.segments_m[j]), int(p.segments_m[j + 1])
        plan.acc_IXLG.index_add_(0, dir_I[lo:hi], stats_IXLG[lo:hi])


__all__ = [
    "RESPONSES",
    "SELECTION_STRATEGIES",
    "SweepConfig",
    "SweepStats",
    "cell_chunks",
    "cells_digest",
    "merge_stats",
    "null_directions",
    "run_sweep",
    "saes_digest",
    "select_source_features",
]
