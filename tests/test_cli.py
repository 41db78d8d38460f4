"""The `ctrace` command: help lists every step; input errors are one clear line, exit status 2."""

import subprocess
import sys

import yaml
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ctrace.cli", *args], capture_output=True, text=True, **kwargs)


def test_help_lists_the_workflow_steps():
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo-data", "demo-model", "select-cells", "tokenize", "dump-activations", "check-config"):
        assert command in out.stdout


def test_input_error_is_reported_without_traceback(tmp_path):
    config = yaml.safe_load(open(ROOT / "config/config.yaml"))
    config["conditions"]["b_cell"]["colour"] = "blue"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = run("check-config", str(path))
    assert out.returncode == 2
    assert "conditions.b_cell: unknown key(s) ['colour']" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    tokenized = tmp_path / "cells.npz"
    out = run(
        "dump-activations", "--kind", "scgpt", "--checkpoint", str(tmp_path / "nope"), "--device", "cpu",
        "--tokenized", str(tokenized), "--layer", "0", "--out-stem", str(tmp_path / "x"),
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nope" in out.stderr and "args.json" in out.stderr


def test_select_cells_and_tokenize_with_sae_including_the_traced_cells(tmp_path):
    """--sae-includes-traced lists traced cells under both splits, and tokenize writes them into both files."""
    import model_fixtures as fx
    import pandas as pd

    from ctrace.data import demo_anndata
    from ctrace.tokenize import TokenizedCells

    h5ad = tmp_path / "demo.h5ad"
    adata = demo_anndata()
    adata.write_h5ad(h5ad)
    where = ["--condition", "mono", "--h5ad", str(h5ad), "--obs-filter", 'bulk_labels == "CD14+ Monocyte"']
    tables = {}
    for flag in ([], ["--sae-includes-traced"]):
        out = tmp_path / f"cells{len(flag)}.tsv"
        done = run("select-cells", *where, "--trace-cells", "5", "--sae-cells", "12", *flag, "--out", str(out))
        assert done.returncode == 0, done.stderr
        tables[bool(flag)] = pd.read_csv(out, sep="\t")
    for overlap, table in tables.items():
        trace = set(table.loc[table["split"] == "trace", "obs_name"])
        sae = set(table.loc[table["split"] == "sae", "obs_name"])
        assert len(trace) == 5 and len(sae) == 12
        assert (trace <= sae) if overlap else not (trace & sae)
    assert set(tables[True].query("split == 'trace'")["obs_name"]) == set(
        tables[False].query("split == 'trace'")["obs_name"]
    )

    model_dir = fx.write_tiny_scgpt(tmp_path, gene_vocab={g: i for i, g in enumerate(adata.var_names)})
    files = {name: tmp_path / f"{name}.npz" for name in ("trace", "sae")}
    done = run(
        "tokenize", *where[:4], "--kind", "scgpt", "--checkpoint", str(model_dir), "--cells",
        str(tmp_path / "cells1.tsv"), "--out-trace", str(files["trace"]), "--out-sae", str(files["sae"]),
        "--report", str(tmp_path / "report.json"),
    )
    assert done.returncode == 0, done.stderr
    table = tables[True]
    for name, path in files.items():
        cells = TokenizedCells.load(path)
        assert sorted(cells.obs_names) == sorted(table.loc[table["split"] == name, "obs_name"])
