"""The workflow on the demo config: lint, the dry-run grid, and one real end-to-end run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def workdir_with_workflow(path: Path) -> Path:
    for name in ("Snakefile", "workflow", "config"):
        (path / name).symlink_to(ROOT / name)
    return path


def snakemake(workdir: Path, *args, timeout=1800):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(
        [*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env
    )


def job_counts(output: str) -> dict[str, int]:
    table = output[output.index("Job stats:") :]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_lint_is_clean(tmp_path):
    out = snakemake(workdir_with_workflow(tmp_path), "--lint")
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr, out.stdout


def test_dry_run_covers_the_model_condition_layer_grid(tmp_path):
    out = snakemake(workdir_with_workflow(tmp_path), "-n", "--quiet", "rules")
    assert out.returncode == 0, out.stderr
    counts = job_counts(out.stdout)
    # 2 models x 4 conditions x 4 demo layers
    assert counts["dump_activations"] == 32
    assert counts["tokenize"] == 8 and counts["select_cells"] == 4
    # one SAE and one annotation per (model, SAE set, layer); sweeps: 3 source layers x 2 shards
    assert counts["fit_sae"] == 8 and counts["annotate_features"] == 8
    assert counts["ablation_sweep"] == 2 * 4 * 3 * 2 and counts["merge_sweep"] == 2 * 4 * 3
    assert counts["edges"] == 8
    assert counts["coherence"] == 8 and counts["validate_edges"] == 8 and counts["consensus"] == 1
    assert counts["report"] == 1


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = workdir_with_workflow(tmp_path_factory.mktemp("demo_run"))
    out = snakemake(workdir, "--cores", "2")
    assert out.returncode == 0, out.stderr[-5000:]
    return workdir


def test_demo_run_end_to_end(demo_run):
    results = demo_run / "results"
    for model in ("geneformer", "scgpt"):
        report = json.loads((results / f"demo/{model}/pretrain_report.json").read_text())
        trained, untrained = report["heldout"]["trained"], report["heldout"]["untrained"]
        if model == "geneformer":
            assert trained["accuracy"] > 5 * untrained["accuracy"] and trained["loss"] < untrained["loss"]
        else:
            assert trained["mse"] < trained["mse_predict_train_mean"] < untrained["mse"]
        for condition in ("cd14_monocyte", "b_cell", "t_reg", "nk_cell"):
            tokens = json.loads((results / f"tokenized/{model}/{condition}.report.json").read_text())
            assert tokens["splits"]["trace"] == 16 and tokens["n_genes_matched"] > 600
            for layer in range(4):
                acts = np.load(results / f"activations/{model}/{condition}/layer{layer}.npy", mmap_mode="r")
                assert acts.dtype == np.float16 and acts.shape[1] == 64 and np.isfinite(acts).all()
    quality = pd.read_csv(results / "sae/quality.tsv", sep="\t")
    assert len(quality) == 8
    assert (quality["heldout_fvu"] < quality["heldout_pca_fvu"]).all(), quality
    for model in ("geneformer", "scgpt"):
        features = pd.read_parquet(results / f"annotation/{model}/pbmc/layer1.features.parquet")
        assert len(features) == 4 * 64 and features["top_genes"].map(len).max() == 20
    summary = pd.read_csv(results / "edges/summary.tsv", sep="\t")
    assert len(summary) == 2 * 4 * 2  # models x conditions x modes
    assert (summary["forward_passes"] > 0).all()
    edges = pd.read_parquet(results / "edges/geneformer/b_cell.corrected.parquet")
    assert (edges["target_layer"] > edges["source_layer"]).all()
    assert set(edges["ablation_effect_sign"]) <= {"negative", "positive"}
    # shard files are temporary: only the merged statistics are kept
    assert not list((results / "sweep").rglob("*.shard*.npz"))
    assert list(edges.columns[:3]) == ["model", "mode", "condition"] and set(edges["mode"]) == {"corrected"}


def test_demo_run_biology_and_report(demo_run):
    results = demo_run / "results"
    for model in ("geneformer", "scgpt"):
        for condition in ("cd14_monocyte", "b_cell", "t_reg", "nk_cell"):
            coherence = json.loads((results / f"biology/{model}/{condition}.coherence.json").read_text())
            for mode in ("corrected", "reference"):
                assert len(coherence[mode]["null_values"]) == 200  # demo: biology.n_permutations
            validation = json.loads((results / f"biology/{model}/{condition}.validation.json").read_text())
            assert validation["result"]["perturbation"] is None and len(validation["result"]["skipped"]) == 2
    consensus = json.loads((results / "biology/consensus/pbmc/geneformer.scgpt.json").read_text())
    assert set(consensus["corrected"]) == {"cd14_monocyte", "b_cell", "t_reg", "nk_cell", "all"}
    html = (results / "report/index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", html)
    assert len(images) == 6  # every figure but validation (no validation input in the demo)
    for src in images:
        assert (results / "report" / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
