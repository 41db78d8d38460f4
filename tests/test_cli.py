"""The `ctrace` command: help lists every step; input errors are one clear line, exit status 2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

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


# ---- bad inputs: one clear line and exit status 2, never a traceback ----------------------------------
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Small valid and invalid files of each kind the commands read."""
    import numpy as np

    import model_fixtures as fx
    from ctrace.tokenize import TokenizedCells

    root = tmp_path_factory.mktemp("bad_inputs")
    files = {"root": root}
    files["gf_model"], files["gf_dicts"] = fx.write_tiny_geneformer(root, n_layers=2)
    ids = np.array([2, 10, 11, 12, 3, 2, 13, 14, 3], dtype=np.int32)
    offsets = np.array([0, 5, 9])
    names = np.array(["a", "b"])
    TokenizedCells(ids, offsets, None, names).save(root / "gf_cells.npz")
    TokenizedCells(ids, offsets, np.ones(len(ids), np.float32), names).save(root / "scgpt_cells.npz")
    TokenizedCells(ids + 10**6, offsets, None, names).save(root / "foreign_cells.npz")
    TokenizedCells(ids - 100, offsets, None, names).save(root / "negative_cells.npz")
    files["bad_args_scgpt"] = fx.write_tiny_scgpt(root / "bad_args", n_layers=1, embsize=16, nheads=2)
    (files["bad_args_scgpt"] / "args.json").write_text("{not json")
    files["scgpt_model"] = fx.write_tiny_scgpt(root / "scgpt", n_layers=1, embsize=16, nheads=2)
    (root / "tf_latin1.tsv").write_bytes("TP53\tMDM2\tActivation\t1\nSTAT1\tIRF1\tActivation\tpr\xe9\n".encode("latin-1"))
    pd.DataFrame({"model": ["gf"], "mode": ["corrected"], "condition": ["c"], "source_layer": [0],
                  "source_feature": [1], "target_layer": [1], "target_feature": [2], "cohens_d": [1.0],
                  }).to_parquet(root / "one_edge.parquet")
    pd.DataFrame({"layer": [0, 1], "feature": [1, 2], "top_genes": [["TP53"], ["MDM2"]]}).to_parquet(
        root / "top_genes.parquet"
    )
    from ctrace.data import demo_anndata

    demo = demo_anndata()
    files["demo_h5ad"] = root / "demo.h5ad"
    demo.write_h5ad(files["demo_h5ad"])
    pd.DataFrame({"obs_name": demo.obs_names[:2], "split": ["trace", "sae"]}).to_csv(
        root / "cells_a.tsv", sep="\t", index=False
    )
    (root / "csv.h5ad").write_text("cell,gene\n1,2\n")
    (root / "trunc.npz").write_bytes(b"PK\x03\x04 truncated")
    (root / "empty.json").write_text("")
    (root / "csv.parquet").write_text("model,mode\ngf,corrected\n")
    (root / "sources_no_feature.tsv").write_text("feat\tscore\n1\t2\n")
    (root / "cells_no_split.tsv").write_text("obs_name\nAAAC\n")
    (root / "metrics.json").write_text(json.dumps({"layer": 1, "firing_frequency": [0.1, 0.2, 0.3]}))
    pd.DataFrame({"layer": [1, 1], "feature": [0, 1], "n_significant": [0, 2]}).to_parquet(root / "features2.parquet")
    modes = {"corrected": {"n_edges_tested": 3}, "reference": {"n_edges_tested": 3}}
    (root / "coherence.json").write_text(json.dumps({"model": "gf", "condition": "c", **modes}))
    return files


def _bad_cases(f):
    gf = ["--kind", "geneformer", "--checkpoint", str(f["gf_model"]), "--dictionaries", str(f["gf_dicts"]),
          "--device", "cpu"]
    root = f["root"]
    out = ["--out", str(root / "out.x")]
    return {
        "h5ad not AnnData": (["select-cells", "--condition", "b_cell", "--h5ad", str(root / "csv.h5ad"),
                              "--trace-cells", "2", *out], "b_cell.h5ad: .*cannot be read as an AnnData"),
        "cell table without split": (["tokenize", *gf[:6], "--condition", "b_cell", "--h5ad", str(root / "csv.h5ad"),
                                      "--cells", str(root / "cells_no_split.tsv"), "--out-trace", "t", "--out-sae",
                                      "s", "--report", "r"], r"cells_no_split.tsv: no column\(s\) \['split'\]"),
        "cells tokenized for scGPT": (["dump-activations", *gf, "--tokenized", str(root / "scgpt_cells.npz"),
                                       "--layer", "0", "--out-stem", str(root / "d")],
                                      "scgpt_cells.npz: cells tokenized for scGPT, not geneformer"),
        "token ids of another vocabulary": (["dump-activations", *gf, "--tokenized", str(root / "foreign_cells.npz"),
                                             "--layer", "0", "--out-stem", str(root / "d")],
                                            "foreign_cells.npz: token id .* outside geneformer's vocabulary"),
        "negative token ids": (["dump-activations", *gf, "--tokenized", str(root / "negative_cells.npz"),
                                "--layer", "0", "--out-stem", str(root / "d")],
                               "negative_cells.npz: negative token id -98; the file is not tokenize output"),
        "scGPT args.json not JSON": (["tokenize", "--kind", "scgpt", "--checkpoint", str(f["bad_args_scgpt"]),
                                      "--condition", "c", "--h5ad", str(f["demo_h5ad"]), "--cells",
                                      str(root / "cells_a.tsv"), "--out-trace", "t", "--out-sae", "s", "--report",
                                      "r"], r"bad_args/scgpt_model/args.json: not valid JSON"),
        "gene column of Ensembl ids for scGPT": (["tokenize", "--kind", "scgpt", "--checkpoint", str(f["scgpt_model"]),
                                                  "--condition", "c", "--h5ad", str(f["demo_h5ad"]), "--cells",
                                                  str(root / "cells_a.tsv"), "--gene-column", "ensembl_id",
                                                  "--out-trace", "t", "--out-sae", "s", "--report", "r"],
                                                 r"demo.h5ad \(condition c, gene column 'ensembl_id': config "
                                                 r"conditions.c.gene_column, --gene-column\): gene ids: none of the"),
        "TF table not UTF-8": (["validate", "--model", "gf", "--condition", "c", "--edges",
                                str(root / "one_edge.parquet"), "--features", str(root / "top_genes.parquet"),
                                "--tf-targets", str(root / "tf_latin1.tsv"), *out],
                               "tf_latin1.tsv: not UTF-8 text .*expected the TRRUST raw-data layout"),
        "layer the model lacks": (["dump-activations", *gf, "--tokenized", str(root / "gf_cells.npz"),
                                   "--layer", "5", "--out-stem", str(root / "d")], "layer 5 out of range 0..1"),
        "truncated tokenized file": (["dump-activations", *gf, "--tokenized", str(root / "trunc.npz"),
                                      "--layer", "0", "--out-stem", str(root / "d")],
                                     "trunc.npz: cannot read tokenized cells"),
        "negative shard": (["sweep", *gf, "--tokenized", "x", "--saes", "s", "--layer", "0", "--sources", "x",
                            "--shard", "-1", "--features-per-shard", "2", *out], "-1 is below the minimum 0"),
        "sources without feature column": (["sweep", *gf, "--tokenized", "x", "--saes", "s", "--layer", "0",
                                            "--sources", str(root / "sources_no_feature.tsv"), "--shard", "0",
                                            "--features-per-shard", "2", *out],
                                           r"sources_no_feature.tsv: no column\(s\) \['feature'\]"),
        "truncated shard": (["merge-sweep", "--shards", str(root / "trunc.npz"), *out],
                            "trunc.npz: cannot read sweep statistics"),
        "annotation of another SAE": (["select-features", "--metrics", str(root / "metrics.json"), "--annotation",
                                       str(root / "features2.parquet"), "--strategy", "top_frequency", "--n", "2",
                                       *out], "features2.parquet: features .* are not the 3 features of"),
        "empty metrics": (["sae-quality", "--metrics", str(root / "empty.json"), *out],
                          "empty.json: not valid JSON .*expected an SAE metrics JSON"),
        "coherence JSON as an edge summary": (["report", "--summaries", str(root / "coherence.json"), "--sae-quality",
                                               "q", "--edges", "e", "--coherence", "c", "--top-edges", "t",
                                               "--out-html", "h", "--out-figures", "f"],
                                              "coherence.json: its corrected/reference records lack 'abs_d_bin_edges'"),
        "CSV as an edge table": (["coherence", "--model", "gf", "--condition", "c", "--edges",
                                  str(root / "csv.parquet"), "--significant", "x", "--features", "x",
                                  "--out-json", "o", "--out-top-edges", "t"],
                                 "csv.parquet: cannot be read as Parquet .*expected an edge table"),
    }


@pytest.mark.parametrize(
    "case",
    ["h5ad not AnnData", "cell table without split", "cells tokenized for scGPT", "token ids of another vocabulary",
     "negative token ids", "scGPT args.json not JSON", "gene column of Ensembl ids for scGPT", "TF table not UTF-8",
     "layer the model lacks", "truncated tokenized file", "negative shard", "sources without feature column",
     "truncated shard", "annotation of another SAE", "empty metrics", "coherence JSON as an edge summary",
     "CSV as an edge table"],
)
def test_bad_input_is_one_clear_line(bad_inputs, case, capsys):
    """In-process (the subprocess tests above cover the entry point): any exception other than the CLI's
    own exit would propagate and fail the test."""

    from ctrace.cli import main

    argv, message = _bad_cases(bad_inputs)[case]
    try:
        status = main(argv)
    except SystemExit as err:  # argparse's own usage errors
        status = err.code
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert re.search(message, stderr), stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "-1", "check-config", "x"], "--threads: -1 is below the minimum 1"),
        (["select-features", "--metrics", "m", "--annotation", "a", "--strategy", "random", "--seed", "-1",
          "--out", "o"], "--seed: -1 is below the minimum 0"),
        (["select-features", "--metrics", "m", "--annotation", "a", "--strategy", "random", "--seed",
          "99999999999999999999", "--out", "o"], "--seed: 99999999999999999999 is above the maximum 4294967295"),
        (["coherence", "--model", "m", "--condition", "c", "--edges", "e", "--significant", "s", "--features", "f",
          "--swaps-per-edge", "nan", "--out-json", "o", "--out-top-edges", "t"],
         "--swaps-per-edge: 'nan' is not a finite number"),
        (["coherence", "--model", "m", "--condition", "c", "--edges", "e", "--significant", "s", "--features", "f",
          "--swaps-per-edge", "0", "--out-json", "o", "--out-top-edges", "t"],
         r"--swaps-per-edge: 0\.0 is not above the minimum 0\.0"),
        (["annotate", "--kind", "scgpt", "--checkpoint", "c", "--sae", "s", "--layer", "0", "--dumps", "d",
          "--tokenized", "t", "--gene-sets", "hallmark", "--q", "5", "--out-features", "f",
          "--out-significant", "g"], "--q: 5.0 is above the maximum 1.0"),
        (["fit-sae", "--dumps", "a", "./a", "--model", "m", "--sae-set", "s", "--layer", "0", "--device", "cpu",
          "--out-stem", "o", "--metrics", "m.json"], r"dump\(s\) \['./a', 'a'\] given more than once in --dumps"),
    ],
)
def test_out_of_range_options_are_one_clear_line(argv, message, capsys):
    from ctrace.cli import main

    try:
        status = main(argv)
    except SystemExit as err:  # argparse's own usage errors
        status = err.code
    stderr = capsys.readouterr().err
    assert status == 2 and re.search(message, stderr), stderr


def test_numeric_looking_cell_names_survive_selection_and_tokenization(tmp_path):
    """Names such as "00041" or "NA" are names, not numbers or missing values, in the cell tables."""
    import model_fixtures as fx

    from ctrace.data import demo_anndata
    from ctrace.tokenize import TokenizedCells

    adata = demo_anndata()
    adata.obs_names = ["NA"] + [f"{i:05d}" for i in range(1, adata.n_obs)]
    h5ad = tmp_path / "numeric.h5ad"
    adata.write_h5ad(h5ad)
    where = ["--condition", "all", "--h5ad", str(h5ad)]
    cells = tmp_path / "cells.tsv"
    done = run("select-cells", *where, "--trace-cells", str(adata.n_obs), "--out", str(cells))
    assert done.returncode == 0, done.stderr
    model_dir = fx.write_tiny_scgpt(tmp_path, gene_vocab={g: i for i, g in enumerate(adata.var_names)})
    out = {name: tmp_path / f"{name}.npz" for name in ("trace", "sae")}
    done = run("tokenize", *where, "--kind", "scgpt", "--checkpoint", str(model_dir), "--cells", str(cells),
               "--out-trace", str(out["trace"]), "--out-sae", str(out["sae"]), "--report", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert sorted(TokenizedCells.load(out["trace"]).obs_names) == sorted(adata.obs_names)


def test_an_empty_source_selection_gives_an_empty_shard_and_empty_edges(bad_inputs, tmp_path):
    """select-features may find no qualifying feature (e.g. `annotated` on a layer without annotations)."""
    import torch

    from ctrace.cli import main
    from ctrace.sae import SAEShape, TopKSAE, save_sae
    from ctrace.trace import SweepStats

    f = bad_inputs
    stems = []
    for layer in (0, 1):
        stems.append(str(tmp_path / f"layer{layer}"))
        save_sae(stems[-1], TopKSAE(SAEShape(32, 16, 4), generator=torch.Generator().manual_seed(layer)), {"layer": layer})
    (tmp_path / "none.tsv").write_text("feature\tfiring_frequency\tn_significant\n")
    gf = ["--kind", "geneformer", "--checkpoint", str(f["gf_model"]), "--dictionaries", str(f["gf_dicts"])]
    shard = tmp_path / "shard0.npz"
    assert main(["sweep", *gf, "--device", "cpu", "--tokenized", str(f["root"] / "gf_cells.npz"), "--saes", *stems,
                 "--layer", "0", "--sources", str(tmp_path / "none.tsv"), "--shard", "0",
                 "--features-per-shard", "4", "--out", str(shard)]) == 0
    assert SweepStats.load(shard).source_features_S.size == 0
    outs = {name: str(tmp_path / name) for name in ("c.parquet", "r.parquet", "s.json", "s.tsv")}
    assert main(["edges", "--model", "gf", "--condition", "c", "--stats", str(shard), "--out-corrected",
                 outs["c.parquet"], "--out-reference", outs["r.parquet"], "--summary-json", outs["s.json"],
                 "--summary-tsv", outs["s.tsv"]]) == 0
    assert len(pd.read_parquet(outs["c.parquet"])) == 0
    assert json.loads(Path(outs["s.json"]).read_text())["corrected"]["edges"] == 0
    # zero edges is a result: the biology steps downstream report it as empty, they do not fail on it
    features, significant = tmp_path / "features.parquet", tmp_path / "significant.parquet"
    pd.DataFrame({"layer": [0, 1], "feature": [1, 2], "top_genes": [["TP53"], ["MDM2"]]}).to_parquet(features)
    pd.DataFrame({"layer": [0], "feature": [1], "library": ["h"], "term": ["T"], "q_value": [0.01],
                  "p_value": [0.001]}).to_parquet(significant)
    both = [outs["c.parquet"], outs["r.parquet"]]
    where = ["--model", "gf", "--condition", "c"]
    assert main(["validate", *where, "--edges", outs["c.parquet"], "--features", str(features),
                 "--out", str(tmp_path / "v.json")]) == 0
    assert main(["coherence", *where, "--edges", *both, "--significant", str(significant), "--features",
                 str(features), "--n-permutations", "5", "--out-json", str(tmp_path / "coh.json"),
                 "--out-top-edges", str(tmp_path / "top.tsv")]) == 0
    assert json.loads((tmp_path / "coh.json").read_text())["corrected"]["n_edges_tested"] == 0
    assert main(["consensus", "--model-a", "gf", "--model-b", "other", "--edges-a", *both, "--edges-b", *both,
                 "--significant-a", str(significant), "--significant-b", str(significant), "--n-permutations", "5",
                 "--out", str(tmp_path / "cons.json")]) == 0
    assert json.loads((tmp_path / "cons.json").read_text())["corrected"]["all"]["observed"] == 0


def test_non_numpy_files_and_bad_metrics_are_named_without_numpys_pickle_advice(tmp_path, capsys):
    from ctrace.cli import main
    from ctrace.errors import CtraceInputError
    from ctrace.tokenize import TokenizedCells

    (tmp_path / "cells.npz").write_text("obs_name\tsplit\nA\ttrace\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"layer": 0, "firing_frequency": ["abc"]}))
    pd.DataFrame({"layer": [0], "feature": [0], "n_significant": [0]}).to_parquet(tmp_path / "features.parquet")
    with pytest.raises(CtraceInputError, match=r"cells.npz: cannot read tokenized cells \(not NumPy .npy/.npz data"):
        TokenizedCells.load(tmp_path / "cells.npz")
    cases = [
        (["merge-sweep", "--shards", str(tmp_path / "cells.npz"), "--out", "o"],
         "cells.npz: cannot read sweep statistics (not NumPy .npy/.npz data"),
        (["select-features", "--metrics", str(tmp_path / "metrics.json"), "--annotation",
          str(tmp_path / "features.parquet"), "--strategy", "top_frequency", "--out", "o"],
         "metrics.json: 'firing_frequency' must be a list of one finite number per SAE feature"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        stderr = capsys.readouterr().err
        assert message in stderr and "allow_pickle" not in stderr, stderr


def test_sweep_refuses_saes_of_different_models(bad_inputs, tmp_path, capsys):
    import torch

    from ctrace.cli import main
    from ctrace.sae import SAEShape, TopKSAE, save_sae

    f = bad_inputs
    stems = [str(tmp_path / "gf_layer0"), str(tmp_path / "scgpt_layer1")]
    for layer, (stem, model) in enumerate(zip(stems, ("geneformer", "scgpt"))):
        sae = TopKSAE(SAEShape(32, 16, 4), generator=torch.Generator().manual_seed(layer))
        save_sae(stem, sae, {"model": model, "sae_set": "pbmc", "layer": layer})
    (tmp_path / "src.tsv").write_text("feature\n0\n")
    argv = ["sweep", "--kind", "geneformer", "--checkpoint", str(f["gf_model"]), "--dictionaries", str(f["gf_dicts"]),
            "--device", "cpu", "--tokenized", str(f["root"] / "gf_cells.npz"), "--saes", *stems, "--layer", "0",
            "--sources", str(tmp_path / "src.tsv"), "--shard", "0", "--features-per-shard", "4", "--out", "o.npz"]
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert "--saes: SAEs fitted on different (model, SAE set)s: geneformer/pbmc:" in stderr
    assert "scgpt/pbmc:" in stderr


def test_geneformer_tokenize_fits_the_checkpoint_and_refuses_a_split_left_empty(bad_inputs, tmp_path, capsys):
    """Cells are cut to the checkpoint's positions (here 256 < V2's 4096), so that dump-activations can run
    them; a split whose cells all lack vocabulary genes is an error, not an empty file."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from ctrace.cli import main
    from ctrace.tokenize import TokenizedCells
    from ctrace.vocab import load_geneformer_dictionaries

    f = bad_inputs
    dicts = load_geneformer_dictionaries(f["gf_dicts"], "V2")
    genes = [g for g in dicts.token_dict if not g.startswith("<") and g in dicts.gene_medians][:300]
    counts = np.zeros((6, len(genes) + 1), dtype=np.float32)
    counts[:4, : len(genes)] = 1 + np.arange(4)[:, None] + np.arange(len(genes))[None, :] % 7
    counts[4:, -1] = 5  # only a gene outside the vocabulary
    var = pd.DataFrame(index=[*genes, "NOT_A_GENE"])
    obs = pd.DataFrame(index=[f"c{i}" for i in range(6)])
    ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var).write_h5ad(tmp_path / "cells.h5ad")
    gf = ["--kind", "geneformer", "--checkpoint", str(f["gf_model"]), "--dictionaries", str(f["gf_dicts"])]

    def tokenize(trace: list[str], sae: list[str]) -> int:
        table = pd.DataFrame({"obs_name": trace + sae, "split": ["trace"] * len(trace) + ["sae"] * len(sae)})
        table.to_csv(tmp_path / "split.tsv", sep="\t", index=False)
        return main(["tokenize", *gf, "--condition", "c", "--h5ad", str(tmp_path / "cells.h5ad"), "--cells",
                     str(tmp_path / "split.tsv"), "--out-trace", str(tmp_path / "trace.npz"), "--out-sae",
                     str(tmp_path / "sae.npz"), "--report", str(tmp_path / "report.json")])

    assert tokenize(["c0", "c1"], ["c2", "c3"]) == 0
    lengths = [len(TokenizedCells.load(tmp_path / "trace.npz").cell(i).input_ids) for i in range(2)]
    assert lengths == [256, 256]  # <cls> + 254 genes + <eos>: the fixture's max_position_embeddings
    capsys.readouterr()
    assert tokenize(["c4", "c5"], ["c0"]) == 2
    assert "cells.h5ad: none of the 2 trace cells listed in " in capsys.readouterr().err


def test_statistics_record_the_model_label_and_edges_refuse_another(bad_inputs, tmp_path, capsys):
    import dataclasses

    import numpy as np
    import torch

    from ctrace.cli import main
    from ctrace.sae import SAEShape, TopKSAE, save_sae
    from ctrace.trace import SweepStats

    f = bad_inputs
    stems = [str(tmp_path / f"layer{layer}") for layer in (0, 1)]
    for layer, stem in enumerate(stems):
        sae = TopKSAE(SAEShape(32, 16, 4), generator=torch.Generator().manual_seed(layer))
        save_sae(stem, sae, {"model": "gf_v2", "sae_set": "pbmc", "layer": layer})
    (tmp_path / "src.tsv").write_text("feature\n0\n1\n")
    shard = tmp_path / "shard0.npz"
    assert main(["sweep", "--kind", "geneformer", "--checkpoint", str(f["gf_model"]), "--dictionaries",
                 str(f["gf_dicts"]), "--device", "cpu", "--tokenized", str(f["root"] / "gf_cells.npz"), "--saes",
                 *stems, "--layer", "0", "--sources", str(tmp_path / "src.tsv"), "--shard", "0",
                 "--features-per-shard", "2", "--out", str(shard)]) == 0
    assert SweepStats.load(shard).model == "gf_v2"

    def edges(label: str) -> int:
        outs = [str(tmp_path / f"{label}.{ext}") for ext in ("c.parquet", "r.parquet", "json", "tsv")]
        return main(["edges", "--model", label, "--condition", "c", "--stats", str(shard), "--out-corrected",
                     outs[0], "--out-reference", outs[1], "--summary-json", outs[2], "--summary-tsv", outs[3]])

    assert edges("gf_v2") == 0
    capsys.readouterr()
    assert edges("gf_v1") == 2
    assert "shard0.npz: statistics of model 'gf_v2' (the label its SAEs were fitted under), but --model is 'gf_v1'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "gf_v1.c.parquet").exists()
    stats = SweepStats.load(shard)
    nan_sums = stats.sum_SLG.copy()
    nan_sums[0, 0, 0] = np.nan
    dataclasses.replace(stats, sum_SLG=nan_sums).save(shard)
    assert edges("gf_v2") == 2
    assert "shard0.npz: sums of δ hold NaN or inf, which would silently drop tests" in capsys.readouterr().err


def test_dumps_and_saes_of_another_layer_or_model_are_refused(bad_inputs, tmp_path, capsys):
    """Dumps record the model and layer they were taken at, and SAEs the dumps they were fitted on, so that
    fit-sae, annotate and sweep refuse inputs of another layer or model."""
    import numpy as np
    import torch

    import model_fixtures as fx
    from ctrace.cli import main
    from ctrace.models import load_backend
    from ctrace.sae import SAEShape, TopKSAE, load_sae, save_sae
    from ctrace.tokenize import TokenizedCells

    f = bad_inputs
    gf = ["--kind", "geneformer", "--checkpoint", str(f["gf_model"]), "--dictionaries", str(f["gf_dicts"]),
          "--device", "cpu"]
    cells = fx.random_cells(load_backend("geneformer", f["gf_model"], f["gf_dicts"]), 24, 8, 16, seed=0)
    tokenized = str(tmp_path / "cells.npz")
    TokenizedCells(
        np.concatenate([c.input_ids for c in cells]).astype(np.int32),
        np.concatenate([[0], np.cumsum([len(c.input_ids) for c in cells])]),
        None,
        np.array([f"c{i}" for i in range(len(cells))]),
    ).save(tokenized)
    dumps = [str(tmp_path / f"d{layer}") for layer in (0, 1)]
    for layer, stem in enumerate(dumps):
        assert main(["dump-activations", *gf, "--tokenized", tokenized, "--layer", str(layer), "--out-stem", stem]) == 0
    fit = ["fit-sae", "--model", "gf", "--sae-set", "s", "--layer", "0", "--expansion", "2", "--k", "4",
           "--n-steps", "3", "--batch-size", "16", "--device", "cpu", "--metrics", str(tmp_path / "m.json")]
    gf_sae = str(tmp_path / "gf_sae")
    assert main([*fit, "--dumps", dumps[0], "--out-stem", gf_sae]) == 0
    fitted_on = {"kind": "geneformer", "n_layers": 2, "d_model": 32, "layer": 0}
    assert load_sae(gf_sae)[1]["dump_provenance"] == fitted_on

    sc_model = fx.write_tiny_scgpt(tmp_path / "sc", n_layers=3)
    sc_sae = str(tmp_path / "sc_sae")
    sidecar = {"model": "sc", "sae_set": "s", "layer": 0, "dump_provenance": {**fitted_on, "kind": "scgpt", "n_layers": 3}}
    save_sae(sc_sae, TopKSAE(SAEShape(32, 16, 4), generator=torch.Generator().manual_seed(0)), sidecar)
    (tmp_path / "src.tsv").write_text("feature\n0\n")
    annotate = ["--layer", "0", "--dumps", dumps[0], "--tokenized", tokenized, "--gene-sets", "hallmark",
                "--out-features", str(tmp_path / "f.parquet"), "--out-significant", str(tmp_path / "s.parquet")]
    cases = [
        ([*fit, "--dumps", *dumps, "--out-stem", str(tmp_path / "x")],
         "d1.rows.parquet: a dump of layer 1 of a geneformer model with 2 blocks of width 32, but layer 0 was asked "
         "for; pass this layer's dumps"),
        (["annotate", "--kind", "scgpt", "--checkpoint", str(sc_model), "--device", "cpu", "--sae", gf_sae, *annotate],
         "d0.rows.parquet: a dump of layer 0 of a geneformer model with 2 blocks of width 32, not of the scgpt model "
         "given here (3 blocks of width 32); pass dumps of this model"),
        (["annotate", *gf, "--sae", sc_sae, *annotate],
         "sc_sae: SAE fitted on dumps of layer 0 of a scgpt model with 3 blocks of width 32, not of the geneformer "
         "model"),
        (["sweep", *gf, "--tokenized", tokenized, "--saes", sc_sae, "--layer", "0", "--sources",
          str(tmp_path / "src.tsv"), "--shard", "0", "--features-per-shard", "4", "--out", str(tmp_path / "o.npz")],
         "sc_sae: SAE fitted on dumps of layer 0 of a scgpt model with 3 blocks of width 32, not of the geneformer "
         "model"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2, argv[0]
        stderr = capsys.readouterr().err
        assert message in stderr, stderr
    assert main(["annotate", *gf, "--sae", gf_sae, *annotate]) == 0
