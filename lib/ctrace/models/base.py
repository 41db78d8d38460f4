"""One interface for both model back-ends: embed, run blocks from any layer, read hidden states.

Convention (method.md): layers 0..N-1; `h_L` = output of block L; "hidden[0]" = embedding output,
the input of block 0. Clean runs and ablation runs use the same `run_blocks` loop, so the two can
only differ by what is injected.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Cell:
    """One tokenized cell: token ids (specials included) and, for scGPT, the binned values."""

    input_ids: np.ndarray  # (T,) int64
    values: np.ndarray | None = None  # (T,) float32, scGPT only


@dataclass(frozen=True)
class Batch:
    """A right-padded batch on the model's device.

    keep_BT: True at real tokens (specials included), False at padding.
    gene_BT: True at gene positions (real, non-special tokens): where activations are read.
    """

    input_ids_BT: torch.Tensor
    values_BT: torch.Tensor | None
    keep_BT: torch.Tensor
    gene_BT: torch.Tensor

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.keep_BT.sum(dim=1)

    def select(self, rows_b: torch.Tensor) -> Batch:
        """Sub-batch (or repeated rows) by index along the batch dimension."""
        return Batch(
            input_ids_BT=self.input_ids_BT[rows_b],
            values_BT=None if self.values_BT is None else self.values_BT[rows_b],
            keep_BT=self.keep_BT[rows_b],
            gene_BT=self.gene_BT[rows_b],
        )


class Backend(abc.ABC):
    """A loaded transformer encoder that can be run block by block.

    Subclasses set: `name`, `n_layers`, `d_model`, `pad_token_id`, `special_token_ids`,
    `pad_value` (scGPT only), `device`, `dtype`.
    """

    name: str
    n_layers: int
    d_model: int
    pad_token_id: int
    special_token_ids: frozenset[int]
    pad_value: float | None = None
    device: torch.device
    dtype: torch.dtype

    # ---- batching -----------------------------------------------------------------------------
    def collate(self, cells: Sequence[Cell]) -> Batch:
        """Right-pad cells to the longest one (pad id / pad value), as the official collators do."""
        if not cells:
            raise ValueError("collate() needs at least one cell")
        length = max(len(c.input_ids) for c in cells)
        n = len(cells)
        ids = np.full((n, length), self.pad_token_id, dtype=np.int64)
        keep = np.zeros((n, length), dtype=bool)
        values = None
        if self.pad_value is not None:
            values = np.full((n, length), self.pad_value, dtype=np.float32)
        for i, cell in enumerate(cells):
            t = len(cell.input_ids)
            ids[i, :t] = cell.input_ids
            keep[i, :t] = True
            if values is not None:
                if cell.values is None:
                    raise ValueError(f"{self.name} needs per-token values for every cell")
                values[i, :t] = cell.values
        specials = np.isin(ids, np.fromiter(self.special_token_ids, dtype=np.int64))
        gene = keep & ~specials
        dev = self.device
        return Batch(
            input_ids_BT=torch.from_numpy(ids).to(dev),
            values_BT=None if values is None else torch.from_numpy(values).to(dev),
            keep_BT=torch.from_numpy(keep).to(dev),
            gene_BT=torch.from_numpy(gene).to(dev),
        )

    # ---- the two primitives subclasses implement ------------------------------------------------
    @abc.abstractmethod
    def embed(self, batch: Batch) -> torch.Tensor:
        """hidden[0]_BTD: the embedding output, input of block 0."""

    @abc.abstractmethod
    def run_blocks(
        self, h_BTD: torch.Tensor, batch: Batch, start: int, stop: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Run blocks start..stop (inclusive) on `h_BTD` (the input of block `start`).

        Yields (layer, h_layer_BTD) after each block. Padding is masked exactly as in the model's
        own forward; padded positions of the outputs are meaningless and must not be read.
        """

    # ---- derived ------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, batch: Batch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Clean h_L_BTD for each requested layer; blocks after the deepest one are not run."""
        wanted = sorted(set(int(x) for x in layers))
        self._check_layers(wanted)
        out: dict[int, torch.Tensor] = {}
        h = self.embed(batch)
        for layer, h in self.run_blocks(h, batch, 0, wanted[-1]):
            if layer in wanted:
                out[layer] = h
        return out

    def resume(
        self, h_L_BTD: torch.Tensor, batch: Batch, layer: int, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Continue from `h_L` (output of block `layer`): run blocks layer+1..stop (default last),
        without autograd. `run_blocks` itself stays differentiable for gradient-based callers."""
        stop = self.n_layers - 1 if stop is None else stop
        self._check_layers([layer, stop])
        if stop <= layer:
            return iter(())
        return _no_grad_iter(self.run_blocks(h_L_BTD, batch, layer + 1, stop))

    def _check_layers(self, layers: Sequence[int]) -> None:
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise ValueError(f"layer {layer} out of range 0..{self.n_layers - 1} for {self.name}")


@torch.no_grad()  # wraps a generator: every step of the iteration runs without grad
def _no_grad_iter(steps: Iterator[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
    yield from steps
