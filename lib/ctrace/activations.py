"""Per-layer activation dumps (method.md §3): a seeded subsample of gene positions per cell, float16.

A dump of (model, condition, layer) is two files:
  `<stem>.npy`           float16 (n_rows, d_model), standard .npy (read with mmap_mode="r");
  `<stem>.rows.parquet`  int32 columns cell (index into the tokenized cells), position, token_id.
Rows are streamed into a memory-mapped file, so memory is bounded by one batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctrace.io import atomic_path, write_parquet
from ctrace.models.base import Backend


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
    write_parquet(stem.with_name(stem.name + ".rows.parquet"), rows)
    return n_rows
