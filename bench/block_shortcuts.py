"""Benchmark: the sweep's two block shortcuts on and off, same code, same run.

The shortcuts (ctrace.models.base.PostLNBlock): block L+1 projects q/k/v only on the clean row and at the
positions the ablation edits (`Edits`), and the last target block runs only at the read positions
(`block_at`). "Off" wraps the back-end so that the hint is dropped and the last block runs whole (the
Backend defaults). Both runs must give the same statistics (≤ 1e-5); the exit status is 1 otherwise.

Tiny randomly initialised Geneformer and scGPT in the official formats (tests/model_fixtures.py), 4 blocks,
d 128, 4 heads, SAEs 4× wide with k 16, 16 source features:
  PYTHONPATH=lib python bench/block_shortcuts.py --threads 1
Each configuration is timed --repeats times (interleaved on/off) and the medians are compared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "tests"))

from ctrace.models import load_backend  # noqa: E402
from ctrace.models.base import Backend  # noqa: E402
from ctrace.trace import SweepConfig, run_sweep  # noqa: E402
from sweep_vs_reference import STAT_NAMES, DelegatingBackend, fitted_saes  # noqa: E402


class WholeBlocks(DelegatingBackend):
    """The sweep without its block shortcuts: the `Edits` hint is dropped and the last block runs whole
    (the Backend defaults)."""

    def run_blocks(self, h, batch, start, stop, edits=None):
        return self.inner.run_blocks(h, batch, start, stop)

    def block_at(self, h, batch, layer, rows_N, pos_N, edits=None):
        return Backend.block_at(self, h, batch, layer, rows_N, pos_N)


def models(workdir: Path, args) -> dict[str, tuple[Backend, tuple[int, int]]]:
    """Both tiny models and their cell lengths (scGPT's synthetic vocabulary has 400 genes)."""
    import model_fixtures as fx

    dicts = fx.write_synthetic_geneformer_dictionaries(workdir / "dicts", n_genes=2000)
    gf_files = fx.write_tiny_geneformer(
        workdir / "gf",
        dictionary_dir=dicts,
        n_layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        seed=1,
        max_position_embeddings=1024,
    )
    sc_dir = fx.write_tiny_scgpt(
        workdir / "sc",
        n_layers=args.layers,
        embsize=args.hidden,
        nheads=args.heads,
        seed=2,
        gene_vocab=fx.synthetic_scgpt_gene_vocab(),
    )
    return {
        "geneformer": (load_backend("geneformer", *gf_files), (300, 500)),
        "scgpt": (load_backend("scgpt", sc_dir, None), (150, 190)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import model_fixtures as fx

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        loaded = models(Path(tmp), args)
    for name, (backend, (min_len, max_len)) in loaded.items():
        cells = fx.random_cells(backend, args.cells, min_len, max_len, seed=3)
        saes = fitted_saes(backend, cells, list(range(args.layers)), n_features=4 * args.hidden, k=16, seed=0)
        feats = list(range(0, 4 * args.hidden, 4 * args.hidden // 16))
        cfg = SweepConfig(features_per_batch=16, ablations_per_batch=32)
        whole = WholeBlocks(backend)
        for L in range(args.layers - 1):
            targets = list(range(L + 1, args.layers))
            times: dict[str, list[float]] = {"on": [], "off": []}
            results = {}
            for _ in range(args.repeats):
                for mode, b in (("on", backend), ("off", whole)):
                    t0 = time.perf_counter()
                    results[mode] = run_sweep(b, saes, cells, L, feats, targets, cfg)
                    times[mode].append(time.perf_counter() - t0)
            diff = max(
                float(np.abs(getattr(results["on"], s).astype(np.float64) - getattr(results["off"], s)).max())
                for s in STAT_NAMES[1:]
            )
            agree = diff <= 1e-5 and np.array_equal(results["on"].n_S, results["off"].n_S)
            ok &= agree
            on, off = float(np.median(times["on"])), float(np.median(times["off"]))
            print(
                f"{name} source layer {L} (targets {targets[0]}..{targets[-1]}): "
                f"shortcuts on {on:.3f} s, off {off:.3f} s, "
                f"speedup {off / on:.2f}x; {results['on'].forward_passes} ablated passes; max |diff| {diff:.1e}, "
                f"agree={agree}",
                flush=True,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
