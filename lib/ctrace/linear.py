"""Linear layers for inference: large float32 CPU inputs on oneDNN, everything else on `F.linear`.

torch's CPU `F.linear` calls MKL, and MKL takes its AVX2 code path on AMD CPUs even where they have
AVX-512; torch's own oneDNN does not. Measured on a 2-core AMD EPYC (Zen 5), 2 threads: (5000×64)·(64×256)
runs at 170 GFLOP/s on MKL and 370 on oneDNN, one Geneformer V2-316M-sized block on two cells of 2,000
tokens in 1.05–1.26 s against 0.65–0.70 s. oneDNN costs more per call (25–35 µs against 5 µs), so inputs of
fewer than `MIN_ROWS` rows — batch-1 passes over a short cell — stay on `F.linear`. The oneDNN operator
(`torch.ops.mkldnn._linear_pointwise`, what inductor's CPU fusions call) is not public torch API: it is
used only after a probe on fixed inputs has matched `F.linear`, and otherwise never.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

MIN_ROWS = 256  # below this oneDNN's per-call cost outweighs its faster kernel (crossover 100–200 rows)


def linear(x_NI: torch.Tensor, weight_OI: torch.Tensor, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + b, (..., O), as `F.linear`; on oneDNN when `uses_onednn(x_NI, weight_OI, bias_O)`."""
    if uses_onednn(x_NI, weight_OI, bias_O):
        return _onednn_linear()(x_NI, weight_OI, bias_O, "none", [], "")
    return F.linear(x_NI, weight_OI, bias_O)


def uses_onednn(x_NI: torch.Tensor, weight_OI: torch.Tensor, bias_O: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs on oneDNN: float32 on the CPU, ≥ MIN_ROWS rows, no autograd, no CPU autocast
    (F.linear would run in bf16 there), oneDNN enabled (`torch.backends.mkldnn.enabled = False` turns it
    off) and its probe passed."""
    tensors = (x_NI, weight_OI) if bias_O is None else (x_NI, weight_OI, bias_O)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and x_NI.dim() >= 2
        and x_NI.numel() >= MIN_ROWS * x_NI.shape[-1] > 0
        and not torch.is_grad_enabled()
        and not _cpu_autocast_enabled()
        and torch.backends.mkldnn.enabled
        and _onednn_linear() is not None
    )


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled()


@functools.cache
def _onednn_linear() -> Callable | None:
    """torch's oneDNN linear, or None where this torch lacks it or its probe does not match `F.linear`."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.linspace(-1.0, 1.0, 2 * MIN_ROWS * 24).view(2, MIN_ROWS, 24)
        w = torch.linspace(-0.5, 0.7, 40 * 24).view(40, 24).flip(0)
        b = torch.linspace(-0.1, 0.1, 40)
        with torch.no_grad():
            got = [op(x, w, b, "none", [], ""), op(x.transpose(0, 1), w, None, "none", [], "")]
            want = [F.linear(x, w, b), F.linear(x.transpose(0, 1), w)]
    except (AttributeError, RuntimeError):  # an operator missing or refusing these inputs in this torch
        return None
    ok = all(g.shape == e.shape and torch.allclose(g, e, rtol=1e-5, atol=1e-5) for g, e in zip(got, want))
    return op if ok else None
