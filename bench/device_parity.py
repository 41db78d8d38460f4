"""Benchmark + check: the workflow's GPU steps on a second device against the first, on a finished demo run.

For each demo model, the `ctrace` CLI commands of the rules that request a GPU (dump-activations,
fit-sae, annotate, sweep) run once per device on the same inputs from a finished `results/` folder
(the demo's own SAEs, dumps, tokenized cells and source features, so that every difference comes from
the device); their outputs are compared and the wall time of each is printed with the ratio to the
first device's, measured in the same run. The exit status is 1 if a check fails:
  dump-activations  max |Δ| ≤ 1e-2 (float16 dumps) and the same rows
  annotate          the same significant (feature, term) pairs; ≥ 95% of features with the same top genes
  fit-sae           held-out FVU within 10% (different devices draw different float rounding)
  sweep             the same firing counts; Cohen's d with Pearson r ≥ 0.999; corrected and reference-mode
                    edge tables with Jaccard ≥ 0.99 (float rounding differs between devices, and TopK turns
                    a near-tie at the k-th code into a code that flips between 0 and ~the k-th value)
  PYTHONPATH=lib python bench/device_parity.py --results results --devices cpu cuda
`--devices cpu cpu` checks the plumbing (and the run-to-run determinism) on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from ctrace import cli  # noqa: E402
from ctrace.edges import MODES, edge_statistics, edge_table  # noqa: E402
from ctrace.trace import SweepStats  # noqa: E402

CONDITIONS = ("b_cell", "cd14_monocyte", "nk_cell", "t_reg")


def model_args(results: Path, model: str) -> list[str]:
    if model == "geneformer":
        demo = results / "demo/geneformer"
        return [
            "--kind",
            "geneformer",
            "--checkpoint",
            str(demo / "checkpoint"),
            "--dictionaries",
            str(demo / "dictionaries"),
            "--version",
            "V2",
        ]
    return ["--kind", "scgpt", "--checkpoint", str(results / "demo/scgpt/checkpoint")]


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"ctrace {' '.join(argv)} exited with {code}")
    return time.perf_counter() - t0


def sae_layers(results: Path, model: str, sae_set: str) -> list[int]:
    return sorted(
        int(p.stem.removeprefix("layer")) for p in (results / "sae" / model / sae_set).glob("layer*.safetensors")
    )


def run_model(
    results: Path, model: str, sae_set: str, condition: str, layer: int, devices, out: Path, save_to: Path | None
) -> list[dict]:
    margs = model_args(results, model)
    dumps = [str(results / f"activations/{model}/{c}/layer{layer}") for c in CONDITIONS]
    tokenized_sae = [str(results / f"tokenized/{model}/{c}.sae.npz") for c in CONDITIONS]
    saes = [str(results / f"sae/{model}/{sae_set}/layer{i}") for i in sae_layers(results, model, sae_set) if i >= layer]
    sources = results / f"sources/{model}/{sae_set}/layer{layer}.tsv"
    n_sources = len(pd.read_csv(sources, sep="\t"))
    rows, outputs = [], {}
    # fmt: off
    for device in devices:  # warm-up (imports, CUDA context, kernels), untimed
        timed(["dump-activations", *margs, "--device", device, "--tokenized", tokenized_sae[0], "--layer",
               str(layer), "--positions-per-cell", "16", "--seed", "1", "--out-stem", str(out / f"warm.{device}")])
    for i, device in enumerate(devices):
        d = out / f"{model}.{i}.{device}"
        d.mkdir(parents=True)
        t = {}
        t["dump-activations"] = timed([
            "dump-activations", *margs, "--device", device, "--dtype", "float32", "--batch-size", "8",
            "--tokenized", tokenized_sae[0], "--layer", str(layer), "--positions-per-cell", "256", "--seed", "1",
            "--out-stem", str(d / "dump"),
        ])
        t["fit-sae"] = timed([
            "fit-sae", "--dumps", *dumps, "--model", model, "--sae-set", sae_set, "--layer", str(layer),
            "--expansion", "4", "--k", "8", "--lr", "0.001", "--batch-size", "512", "--heldout-fraction", "0.1",
            "--n-steps", "1500", "--seed", "0", "--device", device, "--out-stem", str(d / "sae"),
            "--metrics", str(d / "sae.metrics.json"),
        ])
        t["annotate"] = timed([
            "annotate", *margs, "--device", device, "--sae", saes[0], "--layer", str(layer), "--dumps", *dumps,
            "--tokenized", *tokenized_sae, "--gene-sets", "hallmark", "reactome", "go_bp", "--n-top", "20",
            "--min-support", "3", "--q", "0.05", "--out-features", str(d / "features.parquet"),
            "--out-significant", str(d / "significant.parquet"),
        ])
        t["sweep"] = timed([
            "sweep", *margs, "--device", device, "--dtype", "float32",
            "--tokenized", str(results / f"tokenized/{model}/{condition}.trace.npz"), "--saes", *saes,
            "--layer", str(layer), "--sources", str(sources), "--shard", "0", "--features-per-shard",
            str(n_sources), "--features-per-batch", "8", "--ablations-per-batch", "32", "--response", "firing",
            "--null-draws", "2", "--seed", "0", "--out", str(d / "sweep.npz"),
        ])
        outputs[i] = (d, t)
    # fmt: on
    (d0, t0), (d1, t1) = outputs[0], outputs[1]

    a, b = np.load(d0 / "dump.npy"), np.load(d1 / "dump.npy")
    same_rows = pd.read_parquet(d0 / "dump.rows.parquet").equals(pd.read_parquet(d1 / "dump.rows.parquet"))
    dump_diff = float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())
    rows.append(
        ("dump-activations", f"max |Δ| {dump_diff:.1e}, same rows {same_rows}", same_rows and dump_diff <= 1e-2)
    )

    fvu = [json.loads((d / "sae.metrics.json").read_text())["heldout_fvu"] for d in (d0, d1)]
    rows.append(("fit-sae", f"held-out FVU {fvu[0]:.4f} vs {fvu[1]:.4f}", abs(fvu[1] - fvu[0]) <= 0.1 * fvu[0]))

    key = ["feature", "term"]
    sig = [pd.read_parquet(d / "significant.parquet") for d in (d0, d1)]
    pairs = [set(map(tuple, s[key].values.tolist())) for s in sig]
    f0, f1 = (pd.read_parquet(d / "features.parquet").sort_values("feature") for d in (d0, d1))
    same_top = float(np.mean([list(x) == list(y) for x, y in zip(f0["top_genes"], f1["top_genes"])]))
    same_firing = float((f0["n_firing_positions"].to_numpy() == f1["n_firing_positions"].to_numpy()).mean())
    rows.append(
        (
            "annotate",
            f"significant (feature, term) pairs {len(pairs[0])} vs {len(pairs[1])}, equal "
            f"{pairs[0] == pairs[1]}; features with the same top genes {same_top:.1%}, the same firing count "
            f"{same_firing:.1%}",
            pairs[0] == pairs[1] and same_top >= 0.95,
        )
    )

    s0, s1 = SweepStats.load(d0 / "sweep.npz"), SweepStats.load(d1 / "sweep.npz")
    if save_to is not None:
        for i, d in ((0, d0), (1, d1)):
            shutil.copy(d / "sweep.npz", save_to / f"{model}.sweep.{i}.{devices[i]}.npz")
    same_n = bool(np.array_equal(s0.n_S, s1.n_S))
    diff = np.abs(s0.sum_SLG - s1.sum_SLG)
    scale = float(np.abs(s0.sum_SLG).max())
    differing = float((diff > 1e-4 * scale).mean())
    ekey = ["source_feature", "target_layer", "target_feature"]
    t0_, t1_ = edge_statistics(s0, condition), edge_statistics(s1, condition)
    m = t0_.merge(t1_, on=ekey, suffixes=("_0", "_1")).dropna(subset=["cohens_d_0", "cohens_d_1"])
    r = float(np.corrcoef(m["cohens_d_0"], m["cohens_d_1"])[0, 1])
    jaccards = {}
    for mode in MODES:
        e0 = set(map(tuple, edge_table(s0, condition, mode)[ekey].values.tolist()))
        e1 = set(map(tuple, edge_table(s1, condition, mode)[ekey].values.tolist()))
        jaccards[mode] = (len(e0), len(e1), len(e0 & e1) / len(e0 | e1) if e0 | e1 else 1.0)
    ok = same_n and r >= 0.999 and all(j >= 0.99 for _, _, j in jaccards.values())
    rows.append(
        (
            "sweep",
            f"n equal {same_n}; sums: max |Δ| {diff.max():.1e} (max |sum| {scale:.1f}), "
            f"{differing:.2%} of entries with |Δ| > 1e-4·max; d: r {r:.6f}, max |Δd| "
            f"{(m['cohens_d_0'] - m['cohens_d_1']).abs().max():.1e}; edges "
            + ", ".join(f"{m_} {n0}/{n1} J={j:.3f}" for m_, (n0, n1, j) in jaccards.items()),
            ok,
        )
    )
    names = [f"{devices[0]}_s", f"{devices[1]}_s" + ("#2" if devices[0] == devices[1] else "")]
    return [
        {
            "model": model,
            "step": step,
            names[0]: t0[step],
            names[1]: t1[step],
            "ratio": t0[step] / t1[step],
            "agreement": text,
            "ok": ok,
        }
        for step, text, ok in rows
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("results"), help="a finished demo run's results/")
    ap.add_argument("--devices", nargs=2, default=["cpu", "cuda"])
    ap.add_argument("--models", nargs="+", default=["geneformer", "scgpt"])
    ap.add_argument("--sae-set", default="pbmc")
    ap.add_argument("--condition", default="b_cell")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--save-sweeps", type=Path, default=None, help="copy both devices' sweep statistics here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        table = pd.DataFrame(
            [
                row
                for model in args.models
                for row in run_model(
                    args.results,
                    model,
                    args.sae_set,
                    args.condition,
                    args.layer,
                    args.devices,
                    Path(tmp),
                    args.save_sweeps,
                )
            ]
        )
    with pd.option_context("display.width", 250, "display.max_colwidth", 120):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return 0 if table["ok"].all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
