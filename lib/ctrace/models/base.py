"""One interface for both model back-ends: embed, run blocks from any layer, read hidden states.

Convention (method.md): layers 0..N-1; `h_L` = output of block L; "hidden[0]" = embedding output,
the input of block 0. Clean runs and ablation runs use the same `run_blocks` loop, so the two can
only differ by what is injected.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctrace.errors import CtraceInputError
from ctrace.linear import linear


@dataclass(frozen=True)
class Edits:
    """A promise about a batch (an ablation batch): every row is a copy of one of its base rows, edited only
    at the (rows_N, pos_N) pairs.

    bases_K: the K base rows (edited nowhere; each is its own copy); slot_B: for every row, the index into
    bases_K of the row it copies. Row r then equals row bases_K[slot_B[r]] everywhere except where
    (r, t) is listed. Back-ends may use it to project only the base rows and the listed pairs (same result
    to float tolerance, and bit-identical copies where an edit is 0) or ignore it.
    """

    bases_K: torch.Tensor
    slot_B: torch.Tensor
    rows_N: torch.Tensor
    pos_N: torch.Tensor


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

    def select(self, rows_b: torch.Tensor, length: int | None = None) -> Batch:
        """Sub-batch (or repeated rows) by index along the batch dimension, optionally cut to the first
        `length` positions (which must hold every real token of the rows)."""
        cut = slice(None, length)
        return Batch(
            input_ids_BT=self.input_ids_BT[rows_b, cut],
            values_BT=None if self.values_BT is None else self.values_BT[rows_b, cut],
            keep_BT=self.keep_BT[rows_b, cut],
            gene_BT=self.gene_BT[rows_b, cut],
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
        self, h_BTD: torch.Tensor, batch: Batch, start: int, stop: int, edits: Edits | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Run blocks start..stop (inclusive) on `h_BTD` (the input of block `start`).

        Yields (layer, h_layer_BTD) after each block. Padding is masked exactly as in the model's
        own forward; padded positions of the outputs are meaningless and must not be read.
        edits: a promise about h_BTD (see `Edits`); back-ends may use it in block `start` or ignore it.
        """

    def block_at(
        self,
        h_BTD: torch.Tensor,
        batch: Batch,
        layer: int,
        rows_N: torch.Tensor,
        pos_N: torch.Tensor,
        edits: Edits | None = None,
    ) -> torch.Tensor:
        """Output of block `layer` (input `h_BTD`) read only at the (row, position) pairs: h_layer[rows_N, pos_N].

        For a last block whose output is read at a few positions. This default runs the whole block;
        back-ends override it to compute keys/values everywhere and the rest at the N queries only.
        edits: as in `run_blocks`.
        """
        ((_, out_BTD),) = self.run_blocks(h_BTD, batch, layer, layer, edits)
        return out_BTD[rows_N, pos_N]

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
                raise CtraceInputError(
                    f"layer {layer} out of range 0..{self.n_layers - 1} for {self.name}; use a layer this model has"
                )


def check_block_range(start: int, stop: int, n_layers: int) -> None:
    """Blocks start..stop (inclusive) must lie in 0..n_layers-1."""
    if not 0 <= start <= stop < n_layers:
        raise ValueError(f"blocks {start}..{stop} out of range 0..{n_layers - 1}")


# ---- post-LN encoder blocks (BERT layers; torch TransformerEncoderLayer with norm_first=False) ------------
Linear = tuple[torch.Tensor, torch.Tensor]  # (weight_OI, bias_O)


@dataclass(frozen=True)
class PostLNBlock:
    """One post-LN encoder block on plain tensors (inference only).

    h = LN₁(x + W_o·MHA(x) + b_o),  out = LN₂(h + W₂·act(W₁·h + b₁) + b₂);  MHA = softmax(q·kᵀ/√d_head)·v.
    `qkv` is the fused (3D, D) in-projection [W_q; W_k; W_v] (one matmul for all three). Attention runs as
    torch's `scaled_dot_product_attention`, with a key mask only when there is padding.
    """

    n_heads: int
    qkv: Linear
    o: Linear
    ff1: Linear
    ff2: Linear
    ln1: tuple[torch.Tensor, torch.Tensor, float]  # (weight, bias, eps)
    ln2: tuple[torch.Tensor, torch.Tensor, float]
    act: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x_BTD: torch.Tensor, keep_BT: torch.Tensor, edits: Edits | None = None) -> torch.Tensor:
        """The block's output (B, T, D). edits: see `_project`."""
        B, T, D = x_BTD.shape
        q, k, v = self._heads(_project(x_BTD, *self.qkv, edits)).unbind(0)
        o_BHTd = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(keep_BT))
        return self._after_attention(x_BTD, o_BHTd.transpose(1, 2).reshape(B, T, D))

    def at(
        self,
        x_BTD: torch.Tensor,
        keep_BT: torch.Tensor,
        rows_N: torch.Tensor,
        pos_N: torch.Tensor,
        edits: Edits | None = None,
    ) -> torch.Tensor:
        """out[rows_N, pos_N] (N, D): keys and values at every position, everything else at the N queries only.

        The queries are laid out as chunks of ≤ Q queries of one row each (`_query_chunks`), the chunk's
        row's keys and values are repeated per chunk, and the padding slots of the chunks are dropped.
        edits: see `_project`.
        """
        D, N = x_BTD.shape[2], rows_N.numel()
        w, b = self.qkv
        row_C, chunk_N, slot_N, Q = _query_chunks(rows_N, x_BTD.shape[0])
        x_ND = x_BTD[rows_N, pos_N]
        q_ND = linear(x_ND, w[:D], b[:D])  # bf16 under autocast: the chunks take its dtype
        q_CQD = q_ND.new_zeros(row_C.numel(), Q, D)
        q_CQD[chunk_N, slot_N] = q_ND
        k, v = self._heads(_project(x_BTD, w[D:], b[D:], edits).index_select(0, row_C)).unbind(0)
        mask = _key_mask(keep_BT.index_select(0, row_C))
        (q,) = self._heads(q_CQD).unbind(0)
        o_CHQd = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._after_attention(x_ND, o_CHQd.transpose(1, 2)[chunk_N, slot_N].reshape(N, D))

    def _heads(self, y_BTnD: torch.Tensor) -> torch.Tensor:
        """(B, T, n·D) → (n, B, heads, T, D/heads): n stacked projections split into heads."""
        B, T, nD = y_BTnD.shape
        D = self.o[0].shape[0]
        return y_BTnD.view(B, T, nD // D, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)

    def _after_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        h = F.layer_norm(linear(attn, *self.o) + x, (D,), *self.ln1)
        return F.layer_norm(linear(self.act(linear(h, *self.ff1)), *self.ff2) + h, (D,), *self.ln2)


class PostLNBackend(Backend):
    """A back-end whose blocks are `PostLNBlock`s: subclasses provide `_block(index)`; the blocks run with
    both sweep shortcuts (`edits` in the first block, `block_at` at the read queries only)."""

    @abc.abstractmethod
    def _block(self, index: int) -> PostLNBlock:
        """Block `index` as a `PostLNBlock` on the model's own parameters."""

    def run_blocks(
        self, h_BTD: torch.Tensor, batch: Batch, start: int, stop: int, edits: Edits | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        check_block_range(start, stop, self.n_layers)
        for index in range(start, stop + 1):
            h_BTD = self._block(index)(h_BTD, batch.keep_BT, edits if index == start else None)
            yield index, h_BTD

    def block_at(
        self,
        h_BTD: torch.Tensor,
        batch: Batch,
        layer: int,
        rows_N: torch.Tensor,
        pos_N: torch.Tensor,
        edits: Edits | None = None,
    ) -> torch.Tensor:
        check_block_range(layer, layer, self.n_layers)
        return self._block(layer).at(h_BTD, batch.keep_BT, rows_N, pos_N, edits)


def _project(x_BTD: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, edits: Edits | None) -> torch.Tensor:
    """linear(x_BTD, weight, bias), (B, T, O).

    With `edits` (every row a copy of a base row except at the listed pairs: an ablation batch, the clean
    cells in the base rows and their few edited positions in the others) only the base rows and the N
    pairs are projected — in ONE matmul, so an edited position whose value equals its base row's still
    gets bit-identical outputs — and the base rows' results are copied to their copies.
    """
    if edits is None:
        return linear(x_BTD, weight, bias)
    B, T, D = x_BTD.shape
    K = edits.bases_K.numel()
    x_base = x_BTD.index_select(0, edits.bases_K).view(K * T, D)
    y = linear(torch.cat([x_base, x_BTD[edits.rows_N, edits.pos_N]]), weight, bias)
    out_BTO = y[: K * T].view(K, T, -1).index_select(0, edits.slot_B)
    out_BTO[edits.rows_N, edits.pos_N] = y[K * T :]
    return out_BTO


def _key_mask(keep_BT: torch.Tensor) -> torch.Tensor | None:
    """SDPA's boolean mask (B, 1, 1, T), True = attend; None without padding (the unmasked kernel)."""
    return None if bool(keep_BT.all()) else keep_BT[:, None, None, :]


def _query_chunks(rows_N: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Lay N queries out as C chunks of Q = ⌈N / n_rows⌉ slots, each chunk within one row.

    Returns row_C (the row of each chunk), chunk_N and slot_N (where each query goes), Q. A row with
    n queries gets ⌈n/Q⌉ chunks, so a few long rows do not pad every row to their length.
    """
    N, device = rows_N.numel(), rows_N.device
    Q = max(1, -(-N // n_rows))
    count_B = torch.bincount(rows_N, minlength=n_rows)
    order_N = torch.argsort(rows_N, stable=True)
    rank_N = torch.empty_like(rows_N)
    rank_N[order_N] = torch.arange(N, device=device) - (torch.cumsum(count_B, 0) - count_B)[rows_N[order_N]]
    chunks_B = (count_B + Q - 1) // Q
    first_B = torch.cumsum(chunks_B, 0) - chunks_B
    row_C = torch.repeat_interleave(torch.arange(n_rows, device=device), chunks_B)
    return row_C, first_B[rows_N] + rank_N // Q, rank_N % Q, Q


def load_plain_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A weights-only `torch.load` of a plain state dict (name → tensor); clear errors for anything else."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise CtraceInputError(
            f"{path}: cannot be read as a weights-only torch file ({type(err).__name__}: {err}); "
            f"expected {what}, a plain state dict saved with torch.save"
        ) from None
    if not isinstance(obj, dict):
        raise CtraceInputError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CtraceInputError(
            f"{path}: entries {not_tensors[:10]} are not tensors; this looks like a training-checkpoint "
            f"wrapper. Save the plain state dict (model.state_dict()) as {path.name}"
        )
    return obj


def key_listing(label: str, items: list[str], limit: int = 20) -> str:
    """One indented line of an error message listing checkpoint keys (at most `limit`)."""
    if not items:
        return ""
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {label}: {shown}{more}"


@torch.no_grad()  # wraps a generator: every step of the iteration runs without grad
def _no_grad_iter(steps: Iterator[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
    yield from steps
