"""TopK sparse autoencoder (Gao et al. 2024) with mean-centred input and unit-norm decoder columns.

z_F = TopK_k(ReLU(W_enc (x − μ) + b_enc)),   x̂_D = W_dec z + b_dec + μ,   ‖W_dec[:, f]‖₂ = 1 ∀f.
Checkpoint: `<name>.safetensors` (weights and μ) + `<name>.json` sidecar (config, seed, metrics, …).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ctrace.errors import CtraceInputError
from ctrace.io import atomic_path, write_json
from ctrace.linear import linear


@dataclass(frozen=True)
class SAEShape:
    d_model: int
    n_features: int
    k: int


class TopKSAE(nn.Module):
    """Parameters: W_enc_FD, b_enc_F, W_dec_DF (unit-norm columns), b_dec_D; buffer mean_D."""

    def __init__(self, shape: SAEShape, generator: torch.Generator | None = None):
        super().__init__()
        d, f = shape.d_model, shape.n_features
        if not 0 < shape.k <= f:
            raise ValueError(f"k must be in 1..{f}, got {shape.k}")
        self.shape = shape
        w_dec = torch.randn(d, f, generator=generator)
        w_dec /= w_dec.norm(dim=0, keepdim=True)
        self.W_dec_DF = nn.Parameter(w_dec)
        self.W_enc_FD = nn.Parameter(w_dec.T.clone())  # tied init, as Gao et al.
        self.b_enc_F = nn.Parameter(torch.zeros(f))
        self.b_dec_D = nn.Parameter(torch.zeros(d))
        self.register_buffer("mean_D", torch.zeros(d))

    @property
    def k(self) -> int:
        return self.shape.k

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        """ReLU(W_enc (x − μ) + b_enc), before the TopK selection."""
        x = (x_ND - self.mean_D).to(self.W_enc_FD.dtype)
        return torch.relu(linear(x, self.W_enc_FD, self.b_enc_F))

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Dense codes_NF with at most k non-zeros per row."""
        pre = self.pre_acts(x_ND)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def decode(self, codes_NF: torch.Tensor) -> torch.Tensor:
        """x̂_ND = W_dec z + b_dec + μ."""
        return codes_NF @ self.W_dec_DF.T + self.b_dec_D + self.mean_D

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_ND))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each decoder column (one feature's direction) to unit L2 norm."""
        self.W_dec_DF /= self.W_dec_DF.norm(dim=0, keepdim=True).clamp_min(1e-12)


def save_sae(path_stem: str | os.PathLike, sae: TopKSAE, sidecar: dict[str, Any]) -> None:
    """Write `<stem>.safetensors` and `<stem>.json` atomically; the JSON records the shape."""
    stem = Path(path_stem)
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    write_json(stem.with_suffix(".json"), {"shape": asdict(sae.shape), **sidecar})


def load_sae(path_stem: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[TopKSAE, dict]:
    """Load an SAE written by `save_sae` (pass the stem, or either file)."""
    stem = Path(path_stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for path in (weights, meta):
        if not path.is_file():
            raise CtraceInputError(f"{path}: SAE checkpoint file not found")
    try:
        sidecar = json.loads(meta.read_text())
        sae = TopKSAE(SAEShape(**sidecar["shape"]))
    except (ValueError, KeyError, TypeError) as err:  # bad JSON, no/odd "shape", k out of range
        raise CtraceInputError(
            f"{meta}: not an SAE sidecar with a valid 'shape' ({type(err).__name__}: {err}); re-run fit-sae"
        ) from None
    try:
        sae.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError) as err:  # unreadable file, wrong keys or shapes
        raise CtraceInputError(
            f"{weights}: SAE weights unreadable or not matching {meta.name}'s shape {sae.shape} "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); re-run fit-sae"
        ) from None
    return sae.to(device).eval(), sidecar
