"""ctrace.linear: the oneDNN route for large float32 CPU inference inputs, against float64 x·Wᵀ + b."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

import ctrace.linear
from ctrace.linear import MIN_ROWS, linear, uses_onednn


def _inputs(shape, out_features, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out_features, shape[-1], generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    return x, w, b


def _float64_linear(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def test_onednn_available_on_x86_64():
    """torch's x86-64 wheels ship oneDNN: a missing or mismatching operator there would silently cost the
    speed-up, so it is an error here rather than a fallback nobody notices."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"oneDNN route only required on x86-64, not {platform.machine()}")
    assert ctrace.linear._onednn_linear() is not None


@pytest.mark.parametrize(
    ("shape", "bias"),
    [((MIN_ROWS, 24), True), ((3, 200, 24), True), ((MIN_ROWS + 7, 24), False), ((2, MIN_ROWS, 1), True)],
)
def test_large_inputs_run_on_onednn_and_match_float64(shape, bias):
    x, w, b = _inputs(shape, 40, seed=0, bias=bias)
    with torch.no_grad():
        assert uses_onednn(x, w, b)
        y = linear(x, w, b)
    assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _float64_linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_match_f_linear():
    x, w, b = _inputs((24, 2 * MIN_ROWS), 40, seed=1)
    x_NI = x.T[::2]  # (MIN_ROWS, 24), strided
    w_OI = torch.randn(24, 40, generator=torch.Generator().manual_seed(2)).T  # transposed storage
    with torch.no_grad():
        assert uses_onednn(x_NI, w_OI, b)
        torch.testing.assert_close(linear(x_NI, w_OI, b), F.linear(x_NI, w_OI, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [0, 1, MIN_ROWS - 1])
def test_small_inputs_stay_on_f_linear(rows):
    x, w, b = _inputs((rows, 24), 40, seed=3)
    with torch.no_grad():
        assert not uses_onednn(x, w, b)
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))


def test_autograd_stays_on_f_linear_and_has_gradients():
    x, w, b = _inputs((MIN_ROWS, 24), 40, seed=4)
    w.requires_grad_(True)
    assert not uses_onednn(x, w, b)
    linear(x, w, b).square().sum().backward()
    torch.testing.assert_close(w.grad, (2 * F.linear(x, w.detach(), b)).T @ x)


def test_cpu_autocast_keeps_f_linears_bf16():
    x, w, b = _inputs((MIN_ROWS, 24), 40, seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, w, b)
        y, want = linear(x, w, b), F.linear(x, w, b)
    assert y.dtype == want.dtype == torch.bfloat16 and torch.equal(y, want)


def test_other_dtypes_and_disabled_onednn_stay_on_f_linear(monkeypatch):
    x, w, b = _inputs((MIN_ROWS, 24), 40, seed=6)
    with torch.no_grad():
        assert not uses_onednn(x.double(), w.double(), b.double())
        assert not uses_onednn(x, w, b.double())
        assert uses_onednn(x, w, b)
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        assert not uses_onednn(x, w, b)
