"""ctrace.linear's oneDNN route against torch's default CPU linear (MKL), measured in the same run.

    PYTHONPATH=lib python bench/cpu_linear.py --threads 2

1. Single linears at the shapes the sweep runs: the tiny benchmark model's (d 64, ffn 256) at 77 rows (one
   batch-1 pass over a median cell, which stays on F.linear) up to 5,000 rows (a multi-cell ablation pass),
   and Geneformer V2-316M's (d 1152, ffn 4608) at 2,000 rows: µs per call on each route and the ratio.
2. A randomly initialised Geneformer V2-316M-shaped model (18 layers, d 1152, 18 heads, ffn 4608): blocks
   0..17 over --cells cells of ~2,000 genes, as the activation dump and the sweep's clean pass run them,
   median of --repeats per route (interleaved), the ratio, and the largest difference of the outputs.
The baseline route is the same code with `torch.backends.mkldnn.enabled = False`, under which
`ctrace.linear` calls F.linear.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from ctrace.linear import linear, uses_onednn  # noqa: E402


@contextlib.contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def per_call_s(fn: Callable[[], object], seconds: float = 0.5) -> float:
    for _ in range(3):
        fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        reps += 1
    return (time.perf_counter() - t0) / reps


def single_linears() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(77, 64, 256), (1000, 64, 256), (5000, 64, 256), (5000, 256, 64), (2000, 1152, 4608)]
    for rows, d_in, d_out in shapes:
        x = torch.randn(rows, d_in, generator=g)
        w = torch.randn(d_out, d_in, generator=g)
        b = torch.randn(d_out, generator=g)
        with torch.no_grad():
            with onednn(False):
                base = per_call_s(lambda: linear(x, w, b))
                want = linear(x, w, b)
            routed = uses_onednn(x, w, b)
            fast = per_call_s(lambda: linear(x, w, b))
            diff = (linear(x, w, b) - want).abs().max().item()
        print(
            f"linear ({rows}×{d_in})·({d_in}×{d_out}): F.linear {base * 1e6:8.1f} µs, ctrace.linear "
            f"{fast * 1e6:8.1f} µs ({'oneDNN' if routed else 'F.linear'}), {base / fast:.2f}x, "
            f"{2 * rows * d_in * d_out / fast / 1e9:.0f} GFLOP/s, max abs diff {diff:.1e}"
        )


def real_size_forward(n_cells: int, repeats: int) -> None:
    import model_fixtures as fx
    from sweep_vs_reference import make_geneformer

    with tempfile.TemporaryDirectory() as tmp:
        backend = make_geneformer(
            Path(tmp), n_layers=18, hidden=1152, heads=18, ffn=4608, max_pos=4096, n_genes=20271, device="cpu", seed=0
        )
    batch = backend.collate(fx.random_cells(backend, n_cells, 1900, 2100, seed=1))
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, torch.Tensor] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for enabled in (False, True):
                with onednn(enabled):
                    t0 = time.perf_counter()
                    h = backend.embed(batch)
                    for _, h in backend.run_blocks(h, batch, 0, backend.n_layers - 1):
                        pass
                    times[enabled].append(time.perf_counter() - t0)
                    outputs[enabled] = h
    base, fast = np.median(times[False]), np.median(times[True])
    diff = (outputs[True] - outputs[False])[batch.keep_BT].abs().max().item()
    print(
        f"Geneformer V2-316M-shaped forward, {n_cells} cells of {batch.keep_BT.sum(1).tolist()} tokens, "
        f"blocks 0..17, medians of {repeats}: F.linear {base:.2f} s, ctrace.linear {fast:.2f} s, "
        f"{base / fast:.2f}x, max abs diff {diff:.1e}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--cells", type=int, default=2, help="real-size forward: cells per pass")
    ap.add_argument("--repeats", type=int, default=3, help="real-size forward: runs per route")
    ap.add_argument("--skip-real-size", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    single_linears()
    if not args.skip_real_size:
        real_size_forward(args.cells, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
