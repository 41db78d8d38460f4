"""Benchmark: TopK SAE training throughput and held-out FVU (vs PCA-k) on synthetic activation dumps.

Data per d_model (written as real .npy/.rows.parquet dumps, so the streamed memmap path is exercised):
  x = μ + Σ_{j ∈ S} c_j a_j  +  L g  +  σ ε
  a_j: 8·d random unit atoms with power-law (Zipf, exponent 1.1) usage frequencies; |S| ~ Poisson(24)+1,
  c_j ~ Exp(1)·(1 + |N(0,1)|); L g: a rank-16 dense component (unit directions, scales 4.5/√i);
  σ ε: isotropic noise with σ² d = 15. Variance budget ≈ 68% sparse, 26% low-rank, 6% noise.
  Rows are grouped into cells of 64 positions (the split is by cell).

  PYTHONPATH=lib python bench/sae_train.py                       # cuda if available, else cpu
  PYTHONPATH=lib python bench/sae_train.py --device cpu --steps 30 --batch-size 1024 --rows 60000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse
import torch

from ctrace.io import write_parquet
from ctrace.sae_training import SAETrainConfig, train_sae

POSITIONS_PER_CELL = 64


def write_synthetic_dump(folder: Path, d: int, n_rows: int, seed: int, chunk: int = 16_384) -> tuple[Path, Path]:
    """Stream a synthetic (n_rows, d) float16 dump to disk chunk by chunk; returns (npy, rows.parquet)."""
    rng = np.random.default_rng(seed)
    n_atoms = 8 * d
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    usage = 1.0 / np.arange(1, n_atoms + 1) ** 1.1
    usage /= usage.sum()
    low_rank = rng.standard_normal((16, d)).astype(np.float32)
    low_rank *= (4.5 / np.sqrt(np.arange(1, 17)) / np.linalg.norm(low_rank, axis=1))[:, None]
    sigma = np.sqrt(15.0 / d)
    mu = rng.standard_normal(d).astype(np.float32)
    npy, rows = folder / f"bench_d{d}.npy", folder / f"bench_d{d}.rows.parquet"
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(n_rows, d))
    for lo in range(0, n_rows, chunk):
        m = min(chunk, n_rows - lo)
        n_active = rng.poisson(24, m) + 1
        row_idx = np.repeat(np.arange(m), n_active)
        atom_idx = rng.choice(n_atoms, size=len(row_idx), p=usage)
        coef = rng.exponential(1.0, len(row_idx)) * (1 + np.abs(rng.standard_normal(len(row_idx))))
        codes = scipy.sparse.csr_matrix((coef.astype(np.float32), (row_idx, atom_idx)), shape=(m, n_atoms))
        x = codes @ atoms + rng.standard_normal((m, 16)).astype(np.float32) @ low_rank + mu
        x += sigma * rng.standard_normal((m, d)).astype(np.float32)
        out[lo : lo + m] = x.astype(np.float16)
    out.flush()
    del out
    write_parquet(rows, pd.DataFrame({
        "cell": (np.arange(n_rows) // POSITIONS_PER_CELL).astype(np.int32),
        "position": (np.arange(n_rows) % POSITIONS_PER_CELL).astype(np.int32),
        "token_id": rng.integers(4, 20_000, n_rows).astype(np.int32),
    }))
    return npy, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-models", type=int, nargs="+", default=[1152, 512])
    parser.add_argument("--rows", type=int, default=400_000, help="rows per dump (all cells together)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory(prefix="ctrace_bench_") as tmp:
        for d in args.d_models:
            t0 = time.perf_counter()
            source = write_synthetic_dump(Path(tmp), d, args.rows, seed=args.seed + d)
            t_data = time.perf_counter() - t0
            cfg = SAETrainConfig(
                expansion=args.expansion, k=args.k, lr=args.lr, batch_size=args.batch_size, n_steps=args.steps,
                log_every=max(1, args.steps // 5), seed=args.seed, device=args.device,
            )
            result = train_sae([source], cfg)
            m, t = result.metrics, result.timing
            row = {
                "d_model": d,
                "n_features": result.resolved["n_features"],
                "device": result.resolved["device"],
                "torch_threads": torch.get_num_threads(),
                "steps": args.steps,
                "batch_size": result.resolved["batch_size"],
                "train_rows_per_s": round(t["train_rows_per_second"]),
                "ms_per_step": round(1000 * t["train_seconds"] / args.steps, 1),
                "stats_s": round(t["stats_seconds"], 2),
                "eval_s": round(t["eval_seconds"], 2),
                "data_write_s": round(t_data, 2),
                "heldout_fvu": round(m.fvu, 4),
                "pca_k_fvu": round(m.pca_fvu, 4),
                "fvu_over_pca": round(m.fvu / m.pca_fvu, 3),
                "mean_l0": round(m.mean_l0, 2),
                "dead_fraction": round(m.dead_fraction, 4),
                "heldout_rows": m.n_rows,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
