"""ctrace.biology and the `ctrace coherence / consensus / validate / report` commands on synthetic graphs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctrace.biology import ALL_CONDITIONS, annotated_top_edges, coherence_by_mode, consensus_by_mode, validation_records
from ctrace.cli import main
from ctrace.coherence import coherence, term_sets
from ctrace.consensus import consensus, domains
from ctrace.errors import CtraceInputError
from ctrace.validation import directional_accuracy, gene_pairs_from_edges, load_perturbation_table
from test_validation import TRRUST_TOY, replogle_bulk

N_FEATURES = 24  # per layer; feature f carries term T{f % 4} (layers 0 and 1)
TERMS = [f"T{i}" for i in range(4)]


def significant_table(n_features=N_FEATURES, layers=(0, 1), skip=()) -> pd.DataFrame:
    """Annotation long table: feature f of every layer → term T{f % 4} (library 'lib'), q decreasing in f."""
    rows = [(layer, f, "lib", TERMS[f % 4], 1e-4 * (1 + f), 1e-3 * (1 + f)) for layer in layers
            for f in range(n_features) if f not in skip]
    return pd.DataFrame(rows, columns=["layer", "feature", "library", "term", "p_value", "q_value"])


def features_table(n_features=N_FEATURES, layers=(0, 1)) -> pd.DataFrame:
    """Features table: feature f's top genes G{f}a, G{f}b, … (the order is the ranking)."""
    return pd.DataFrame({
        "layer": [layer for layer in layers for _ in range(n_features)],
        "feature": [f for _ in layers for f in range(n_features)],
        "top_genes": [[f"G{f}{c}" for c in "abcdefg"] for _ in layers for f in range(n_features)],
    })


def edge_frame(pairs, condition, d=None) -> pd.DataFrame:
    """Layer-0 → layer-1 edges (source feature, target feature) with signed d and the edge-table columns."""
    d = np.resize(np.asarray([1.5, -2.0, 0.8, -0.7] if d is None else d, dtype=float), len(pairs))
    return pd.DataFrame({
        "condition": condition,
        "source_layer": 0,
        "source_feature": [s for s, _ in pairs],
        "target_layer": 1,
        "target_feature": [t for _, t in pairs],
        "n": 20,
        "cohens_d": d,
        "q_value": 1e-4,
        "sign_consistency": 0.9,
    })


def coherent_pairs(rng, per_source=3):
    """Every source feature → `per_source` targets of its own term: coherence 1 by construction."""
    pairs = []
    for s in range(N_FEATURES):
        same = [t for t in range(N_FEATURES) if t % 4 == s % 4]
        pairs += [(s, int(t)) for t in rng.choice(same, per_source, replace=False)]
    return pairs


def random_pairs(rng, n=72):
    codes = rng.choice(N_FEATURES * N_FEATURES, n, replace=False)
    return [(int(c // N_FEATURES), int(c % N_FEATURES)) for c in codes]


def test_coherence_by_mode_planted_vs_random_and_json_ready():
    rng = np.random.default_rng(0)
    edges = {"corrected": edge_frame(coherent_pairs(rng), "c1"), "reference": edge_frame(random_pairs(rng), "c1")}
    sig = significant_table()
    out = coherence_by_mode(edges, sig, n_permutations=200, seed=3)
    assert set(out) == {"corrected", "reference"}
    planted, rand = out["corrected"], out["reference"]
    assert planted["observed"] == 1.0 and planted["fold"] > 2 and planted["p_value"] <= 0.01
    assert 0.6 < rand["fold"] < 1.6 and rand["p_value"] > 0.05
    for mode, record in out.items():
        assert len(record["null_values"]) == 200 and record["n_annotated_features"] == 2 * N_FEATURES
        direct = coherence(edges[mode], term_sets(sig), n_permutations=200, seed=3)
        assert record["observed"] == direct.observed and record["null_values"] == direct.null_values.tolist()
    json.dumps(out)  # the workflow writes these records as JSON


def test_annotated_top_edges_carry_domains_and_top_genes():
    edges = edge_frame([(0, 4), (1, 5), (2, 7), (23, 3)], "c1", d=[0.6, -3.0, 1.0, 2.0])
    sig = significant_table(skip=(23,))  # feature 23 of both layers unannotated
    top = annotated_top_edges(edges, features_table(), sig, n_edges=3, n_genes=2)
    assert top["cohens_d"].tolist() == [-3.0, 2.0, 1.0]  # largest |d| first
    assert top["source_domain"].tolist() == ["T1", "", "T2"]
    assert top["target_domain"].tolist() == ["T1", "T3", "T3"]
    assert top["source_top_genes"].tolist() == ["G1a, G1b", "G23a, G23b", "G2a, G2b"]
    assert top["target_top_genes"].tolist() == ["G5a, G5b", "G3a, G3b", "G7a, G7b"]


def test_consensus_by_mode_per_shared_condition_and_all(tmp_path):
    rng = np.random.default_rng(1)
    shared = coherent_pairs(rng, per_source=2)  # domain pairs (Ti, Ti), present in both models
    a = pd.concat([edge_frame(shared, "c1"), edge_frame(random_pairs(rng, 30), "c2"),
                   edge_frame(random_pairs(rng, 30), "only_a")])
    b = pd.concat([edge_frame(coherent_pairs(rng, per_source=2), "c1"), edge_frame(random_pairs(rng, 30), "c2")])
    sig = significant_table()
    disease = tmp_path / "disease.gmt"
    # disease set overlapping T0's genes (G0a, G4a, …) and nothing else
    disease.write_text("DISEASE_X\tdesc\t" + "\t".join(f"G{f}a" for f in range(0, N_FEATURES, 4)) + "\n")
    domain_genes = {t: frozenset(f"G{f}a" for f in range(N_FEATURES) if f % 4 == i) for i, t in enumerate(TERMS)}
    out = consensus_by_mode({"corrected": a, "reference": a}, sig, {"corrected": b, "reference": b}, sig,
                            n_permutations=100, seed=0, domain_genes=domain_genes, disease_gmt=disease)
    assert out["domains_a"] == out["domains_b"] == 2 * N_FEATURES
    per_mode = out["corrected"]
    assert set(per_mode) == {"c1", "c2", ALL_CONDITIONS}  # only_a has no partner in model B
    c1 = per_mode["c1"]
    assert {tuple(p) for p in c1["shared_pairs"]} == {(t, t) for t in TERMS}
    direct = consensus(a[a["condition"] == "c1"], domains(sig), b[b["condition"] == "c1"], domains(sig),
                       n_permutations=100, seed=0)
    assert c1["observed"] == direct.observed == 4 and c1["null_values"] == direct.null_values.tolist()
    assert len(c1["relabel"]["null_values"]) == 100 and "expected" in c1["relabel"]
    both = a[a["condition"].isin(["c1", "c2"])]
    assert per_mode[ALL_CONDITIONS]["n_pairs_a"] == direct_all_pairs(both, sig)
    assert c1["disease"]["disease_domains"] == 1 and len(c1["disease"]["table"]) == 2
    json.dumps(out)
    partial = {t: g for t, g in domain_genes.items() if t != TERMS[0]}  # another library than the annotation's
    with pytest.raises(CtraceInputError, match=rf"consensus: 1 domain term\(s\) have no gene set .*'{TERMS[0]}'"):
        consensus_by_mode({"corrected": a}, sig, {"corrected": b}, sig, n_permutations=10, seed=0,
                          domain_genes=partial, disease_gmt=disease)


def direct_all_pairs(edges, sig) -> int:
    dom = domains(sig)
    return len({(dom[(0, s)], dom[(1, t)]) for s, t in zip(edges["source_feature"], edges["target_feature"])})


def test_validation_records_match_the_validation_module_and_skip_cleanly(tmp_path):
    edges = edge_frame([(0, 1), (2, 3), (4, 5)], "c1", d=[-1.2, 0.9, -2.0])
    features = features_table()
    # knock-downs of G0a and G2a, measured genes GA..GD (test_validation's layout) renamed to target genes
    var = pd.DataFrame({"gene_name": ["G1a", "G1b", "G3a", "G3b"]},
                       index=pd.Index([f"ENSG0000000000{i}" for i in range(4)], name="gene_id"))
    h5ad = replogle_bulk(tmp_path / "K562_essential_normalized_bulk_01.h5ad",
                         [[-1.0, 0.5, 0.2, 0.0], [0.3, -0.4, 1.0, -2.0]], [("G0a", "P1"), ("G2a", "P1")], var=var)
    trrust = tmp_path / "trrust.tsv"
    trrust.write_text(TRRUST_TOY + "G0a\tG1a\tActivation\t1\nG2a\tG3b\tRepression\t2\n")

    skipped = validation_records(edges, features, n_top_genes=2)
    assert skipped["perturbation"] is None and skipped["tf_targets"] is None and len(skipped["skipped"]) == 2
    assert skipped["gene_pairs"] == 3 * 2 * 2

    out = validation_records(edges, features, perturbation_files=[h5ad], tf_targets=trrust, n_top_genes=2,
                             n_shuffles=50, seed=0)
    assert out["skipped"] == []
    pairs = gene_pairs_from_edges(edges, features, n_top_genes=2)
    direct = directional_accuracy(pairs, load_perturbation_table([h5ad]))["K562"].to_dict()
    assert out["perturbation"] == [direct]
    # hand computation: G0a→{G1a,G1b} predicted d<0 → "−" (knock-down of G0a lowers them); observed −1.0, 0.5
    # G2a→{G3a,G3b} predicted "+"; observed 1.0, −2.0 → 2 of 4 correct
    assert (direct["n_tested"], direct["n_correct"]) == (4, 2)
    tf = out["tf_targets"]
    # sign −1 (knock-down lowers the target) = activation: G0a→G1a predicted activating, TRRUST Activation;
    # G2a→G3b sign +1 = repression, TRRUST Repression → both correct
    assert tf["n_matched"] == 2 and tf["precision"] == 1.0 and len(tf["null_values"]) == 50
    json.dumps(out)


def write_model_tables(root: Path, model: str, rng) -> dict[str, list[str]]:
    """Edge tables (both modes, two conditions), significant and features tables of one synthetic model."""
    paths: dict[str, list[str]] = {"edges": [], "significant": [], "features": []}
    for condition in ("c1", "c2"):
        for mode in ("corrected", "reference"):
            e = edge_frame(coherent_pairs(rng, 2), condition)
            e.insert(0, "mode", mode)
            e.insert(0, "model", model)
            e["mean_delta"], e["p_value"], e["ablation_effect_sign"] = 0.1, 1e-5, "positive"
            path = root / f"{model}.{condition}.{mode}.parquet"
            e.to_parquet(path)
            paths["edges"].append(str(path))
    for layer in (0, 1):
        s = root / f"{model}.layer{layer}.significant.parquet"
        significant_table(layers=(layer,)).to_parquet(s)
        f = root / f"{model}.layer{layer}.features.parquet"
        features_table(layers=(layer,)).to_parquet(f)
        paths["significant"].append(str(s))
        paths["features"].append(str(f))
    return paths


def test_cli_biology_commands_and_report(tmp_path, small_report_inputs):
    rng = np.random.default_rng(2)
    tables = {m: write_model_tables(tmp_path, m, rng) for m in ("ma", "mb")}
    null = ["--n-permutations", "30", "--seed", "1"]
    coh = tmp_path / "ma.c1.coherence.json"
    top = tmp_path / "ma.c1.top_edges.tsv"
    c1 = [p for p in tables["ma"]["edges"] if ".c1." in p]
    assert main(["coherence", "--model", "ma", "--condition", "c1", "--edges", *c1,
                 "--significant", *tables["ma"]["significant"], "--features", *tables["ma"]["features"],
                 "--n-top-edges", "5", *null, "--out-json", str(coh), "--out-top-edges", str(top)]) == 0
    record = json.loads(coh.read_text())
    assert record["model"] == "ma" and record["corrected"]["observed"] == 1.0 and record["corrected"]["fold"] > 1
    assert len(pd.read_csv(top, sep="\t")) == 5

    cons = tmp_path / "consensus.json"
    assert main(["consensus", "--model-a", "ma", "--model-b", "mb", "--edges-a", *tables["ma"]["edges"],
                 "--significant-a", *tables["ma"]["significant"], "--edges-b", *tables["mb"]["edges"],
                 "--significant-b", *tables["mb"]["significant"], *null, "--out", str(cons)]) == 0
    cons_record = json.loads(cons.read_text())
    assert set(cons_record["corrected"]) == {"c1", "c2", ALL_CONDITIONS}
    assert cons_record["corrected"]["c1"]["observed"] == 4

    val = tmp_path / "validation.json"
    trrust = tmp_path / "trrust.tsv"
    trrust.write_text(TRRUST_TOY)
    assert main(["validate", "--model", "ma", "--condition", "c1", "--edges", *c1,
                 "--features", *tables["ma"]["features"], "--tf-targets", str(trrust), *null, "--out", str(val)]) == 0
    val_record = json.loads(val.read_text())
    assert val_record["result"]["perturbation"] is None and val_record["result"]["tf_targets"] is not None

    summaries, quality = small_report_inputs
    summary_paths = []
    for i, s in enumerate(summaries):
        p = tmp_path / f"summary{i}.json"
        p.write_text(json.dumps({**s, "model": "ma", "condition": f"c{i + 1}"}))
        summary_paths.append(str(p))
    quality_path = tmp_path / "quality.tsv"
    quality.assign(model="ma").to_csv(quality_path, sep="\t", index=False)
    html = tmp_path / "report" / "index.html"
    assert main(["report", "--summaries", *summary_paths, "--sae-quality", str(quality_path),
                 "--edges", *tables["ma"]["edges"], "--coherence", str(coh), "--top-edges", str(top),
                 "--consensus", str(cons), "--validation", str(val), "--out-html", str(html),
                 "--out-figures", str(tmp_path / "report" / "figures")]) == 0
    text = html.read_text()
    images = re.findall(r"<img src='([^']+)'", text)
    assert len(images) == 7  # every figure, validation included
    for src in images:
        assert (html.parent / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_input_errors_are_clear(tmp_path, capsys):
    rng = np.random.default_rng(3)
    tables = write_model_tables(tmp_path, "ma", rng)
    bad = tmp_path / "bad.tsv"
    bad.write_text("TF1,T1,Activation,1\n")
    status = main(["validate", "--model", "ma", "--condition", "c1", "--edges", *tables["edges"],
                   "--features", *tables["features"], "--tf-targets", str(bad), "--out", str(tmp_path / "v.json")])
    assert status == 2 and "bad.tsv" in capsys.readouterr().err
    assert not (tmp_path / "v.json").exists()


@pytest.fixture
def small_report_inputs():
    from test_report import summary_record, sae_quality_table

    return [summary_record(np.random.default_rng(i)) for i in range(2)], sae_quality_table("ma")
