"""Per-layer activation dumps (method.md §3): a seeded subsample of gene positions per cell, float16.

A dump of (model, condition, layer) is two files:
  `<stem>.npy`           float16 (n_rows, d_model), standard .npy (read with mmap_mode="r");
  `<stem>.rows.parquet`  int32 columns cell (index into the tokenized cells), position, token_id; its
                         Parquet key-value metadata `ctrace.dump` holds the `DumpProvenance` as JSON.
Rows are streamed into a memory-mapped file, so memory is bounded by one batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from ctrace.errors import CtraceInputError
from ctrace.io import UNREADABLE_FILE_ERRORS, atomic_path, write_parquet
from ctrace.models.base import Backend

PROVENANCE_KEY = "ctrace.dump"


@dataclass(frozen=True)
class DumpProvenance:
    """The model and layer a dump was taken at. The checkpoint's path is not part of it: the same folder
    can be mounted at different paths on a cluster's nodes."""

    kind: str  # "geneformer" or "scgpt"
    n_layers: int
    d_model: int
    layer: int

    def describe(self) -> str:
        return f"layer {self.layer} of a {self.kind} model with {self.n_layers} blocks of width {self.d_model}"

    def same_model(self, other: DumpProvenance) -> bool:
        return (self.kind, self.n_layers, self.d_model) == (other.kind, other.n_layers, other.d_model)

    @classmethod
    def of_backend(cls, backend: Backend, layer: int) -> DumpProvenance:
        return cls(kind=backend.name, n_layers=backend.n_layers, d_model=backend.d_model, layer=layer)


def read_dump_provenance(rows_path: str | os.PathLike) -> DumpProvenance | None:
    """A dump's provenance from its rows table's metadata; None for dumps written before ctrace recorded it."""
    if not Path(rows_path).is_file():
        raise CtraceInputError(f"{rows_path}: activation dump file not found; (re-)run dump-activations")
    try:
        metadata = pq.read_schema(rows_path).metadata or {}
    except UNREADABLE_FILE_ERRORS as err:
        raise CtraceInputError(f"{rows_path}: not a readable Parquet row table ({type(err).__name__}: {err})") from None
    raw = metadata.get(PROVENANCE_KEY.encode())
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
    except ValueError:
        fields = None
    where = f"{rows_path}: Parquet metadata {PROVENANCE_KEY!r}"
    return _provenance(fields, where, "re-run dump-activations for this dump")


def sae_dump_provenance(sae_stem: str | os.PathLike, sidecar: dict) -> DumpProvenance | None:
    """The provenance of the dumps an SAE was fitted on (its sidecar's `dump_provenance`); None for SAEs
    fitted on dumps without one."""
    fields = sidecar.get("dump_provenance")
    if fields is None:
        return None
    return _provenance(fields, f"{sae_stem}: sidecar field dump_provenance", "re-run fit-sae for this SAE")


def check_sae_fitted_on(
    sae_stem: str | os.PathLike, sidecar: dict, model: DumpProvenance, checkpoint: str | os.PathLike
) -> None:
    """An SAE must have been fitted on dumps of `model` (kind, n_layers, d_model); SAEs without a record pass."""
    fitted_on = sae_dump_provenance(sae_stem, sidecar)
    if fitted_on is not None and not fitted_on.same_model(model):
        raise CtraceInputError(
            f"{sae_stem}: SAE fitted on dumps of {fitted_on.describe()}, not of the {model.kind} model {checkpoint} "
            f"({model.n_layers} blocks of width {model.d_model}); pass this model's SAEs"
        )


def _provenance(fields, where: str, fix: str) -> DumpProvenance:
    try:
        provenance = DumpProvenance(**fields)
        numbers = (provenance.n_layers, provenance.d_model, provenance.layer)
        valid = isinstance(provenance.kind, str) and all(isinstance(v, int) and not isinstance(v, bool) for v in numbers)
    except TypeError:  # not a mapping, or missing or unknown fields
        valid = False
    if not valid:
        raise CtraceInputError(
            f"{where} is not a dump provenance (kind, n_layers, d_model, layer): {fields!r:.200}; {fix}"
        )
    return provenance


def check_dumps(
    rows_paths: Sequence[str | os.PathLike], *, layer: int, model: DumpProvenance | None = None
) -> DumpProvenance | None:
    """The common provenance of dumps that must all be `layer` of one model (and of `model`'s, when given:
    its kind, n_layers and d_model). Dumps without a recorded provenance are not checked; None if none has one."""
    common, first = None, None
    for path in rows_paths:
        provenance = read_dump_provenance(path)
        if provenance is None:
            continue
        if provenance.layer != layer:
            raise CtraceInputError(
                f"{path}: a dump of {provenance.describe()}, but layer {layer} was asked for; pass this layer's dumps"
            )
        if model is not None and not provenance.same_model(model):
            raise CtraceInputError(
                f"{path}: a dump of {provenance.describe()}, not of the {model.kind} model given here "
                f"({model.n_layers} blocks of width {model.d_model}); pass dumps of this model"
            )
        if common is None:
            common, first = provenance, path
        elif provenance != common:
            raise CtraceInputError(
                f"{path}: a dump of {provenance.describe()}, but {first} is one of {common.describe()}; "
                "the dumps of one SAE come from one model"
            )
    return common


@dataclass(frozen=True)
class DumpPlan:
    """Which positions of which cells are dumped: rows (cell, position) in output order."""

    cell_R: np.ndarray
    position_R: np.ndarray
    offsets_C: np.ndarray  # rows of cell c are offsets_C[c]:offsets_C[c+1]


def plan_positions(
    gene_masks: list[np.ndarray], positions_per_cell: int, seed: int
) -> DumpPlan:
    """Per cell: min(P, n_gene_positions) gene positions drawn without replacement, sorted.

    The draw depends only on (seed, cell index), so every layer dumps the same positions.
    """
    cells, positions, counts = [], [], []
    for c, mask in enumerate(gene_masks):
        candidates = np.flatnonzero(mask)
        take = min(positions_per_cell, len(candidates))
        chosen = np.sort(np.random.default_rng([seed, c]).choice(candidates, size=take, replace=False))
        cells.append(np.full(take, c, dtype=np.int32))
        positions.append(chosen.astype(np.int32))
        counts.append(take)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return DumpPlan(
        cell_R=np.concatenate(cells) if cells else np.zeros(0, np.int32),
        position_R=np.concatenate(positions) if positions else np.zeros(0, np.int32),
        offsets_C=offsets,
    )


@torch.no_grad()
def dump_activations(
    backend: Backend,
    cells,
    layer: int,
    out_stem: str | os.PathLike,
    *,
    positions_per_cell: int,
    seed: int,
    batch_size: int,
) -> int:
    """Run cells to block `layer` and write the dump; returns the number of rows written.

    `cells` is a `ctrace.tokenize.TokenizedCells`. Cells are batched by similar length to limit
    padding; rows are written at their planned offsets, so the output order is fixed by the plan.
    """
    stem = Path(out_stem)
    rows_path = stem.with_name(stem.name + ".rows.parquet")
    # The rows file (with the provenance) is written last and an older one removed first, so that an
    # interrupted dump leaves no .npy that an older rows file would describe.
    rows_path.unlink(missing_ok=True)
    specials = np.fromiter(backend.special_token_ids, dtype=np.int64)
    token_ids = [cells.cell(i).input_ids for i in range(len(cells))]
    plan = plan_positions([~np.isin(ids, specials) for ids in token_ids], positions_per_cell, seed)
    n_rows = int(plan.offsets_C[-1])
    by_length = np.argsort([len(ids) for ids in token_ids], kind="stable")
    with atomic_path(stem.with_name(stem.name + ".npy")) as tmp:
        acts = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n_rows, backend.d_model))
        for start in range(0, len(by_length), batch_size):
            members = by_length[start : start + batch_size]
            batch = backend.collate([cells.cell(int(i)) for i in members])
            h_BTD = backend.hidden_states(batch, [layer])[layer]
            for row, c in enumerate(members):
                lo, hi = plan.offsets_C[c], plan.offsets_C[c + 1]
                positions = torch.from_numpy(plan.position_R[lo:hi]).to(h_BTD.device)
                acts[lo:hi] = h_BTD[row, positions].float().cpu().numpy().astype(np.float16)
        acts.flush()
        del acts
    rows = pd.DataFrame(
        {
            "cell": plan.cell_R,
            "position": plan.position_R,
            "token_id": np.concatenate(
                [token_ids[c][plan.position_R[plan.offsets_C[c] : plan.offsets_C[c + 1]]] for c in range(len(cells))]
            ).astype(np.int32)
            if n_rows
            else np.zeros(0, np.int32),
        }
    )
    provenance = DumpProvenance.of_backend(backend, layer)
    write_parquet(rows_path, rows, metadata={PROVENANCE_KEY: json.dumps(asdict(provenance))})
    return n_rows
