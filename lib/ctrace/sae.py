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


def sae_files(path_stem: str | os.PathLike) -> tuple[Path, Path]:
    """(`<stem>.safetensors`, `<stem>.json`) of a stem or of either file; dots in the stem are kept."""
    stem = Path(path_stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_sae(path_stem: str | os.PathLike, sae: TopKSAE, sidecar: dict[str, Any]) -> None:
    """Write `<stem>.safetensors` and `<stem>.json` atomically; the JSON records the shape.

    The sidecar is written last and an older one removed first, so that an interrupted save leaves no
    weights that an older sidecar would describe (`load_sae` then reports the missing sidecar)."""
    weights, meta = sae_files(path_stem)
    meta.unlink(missing_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp))
    write_json(meta, {"shape": asdict(sae.shape), **sidecar})


def _sidecar_shape(meta: Path, sidecar: Any) -> SAEShape:
    shape = sidecar.get("shape") if isinstance(sidecar, dict) else None
    fields = ("d_model", "n_features", "k")
    if not isinstance(shape, dict) or set(shape) != set(fields):
        raise CtraceInputError(f"{meta}: not an SAE sidecar with a 'shape' of {', '.join(fields)}; re-run fit-sae")
    for name in fields:
        value = shape[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CtraceInputError(f"{meta}: shape.{name} must be a positive integer, found {value!r}; re-run fit-sae")
    if shape["k"] > shape["n_features"]:
        raise CtraceInputError(f"{meta}: shape.k {shape['k']} exceeds shape.n_features {shape['n_features']}")
    return SAEShape(**shape)


def load_sae(path_stem: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[TopKSAE, dict]:
    """Load an SAE written by `save_sae` (pass the stem, or either file)."""
    weights, meta = sae_files(path_stem)
    for path in (weights, meta):
        if not path.is_file():
            raise CtraceInputError(f"{path}: SAE checkpoint file not found")
    try:
        sidecar = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CtraceInputError(f"{meta}: not valid JSON ({err}); re-run fit-sae") from None
    sae = TopKSAE(_sidecar_shape(meta, sidecar))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CtraceInputError(f"{weights}: SAE weights unreadable ({type(err).__name__}: {err}); re-run fit-sae") from None
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        differ = [
            f"{name}: file {found.get(name, 'missing')}, expected {expected.get(name, 'none')}"
            for name in sorted(set(expected) | set(found))
            if found.get(name) != expected.get(name)
        ]
        raise CtraceInputError(
            f"{weights}: SAE weights do not match {meta.name}'s shape {sae.shape} ({'; '.join(differ)}); re-run fit-sae"
        )
    sae.load_state_dict(state)
    return sae.to(device).eval(), sidecar
