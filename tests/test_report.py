"""ctrace.report: every figure is drawn, linked and captioned; tables show the inputs; writes are atomic."""

from __future__ import annotations

import re
from html import escape as html_escape

import numpy as np
import pandas as pd
import pytest

from ctrace.edges import ABS_D_BIN_EDGES
from ctrace.report import ReportInputs, consensus_table, summary_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def summary_record(rng, n_edges=40) -> dict:
    """One model × condition summary in `ctrace edges`' layout (both modes), with |d| histograms."""
    def hist(scale):
        counts, _ = np.histogram(np.clip(np.abs(rng.normal(0, scale, 500)), 1e-3, 1e3), bins=ABS_D_BIN_EDGES)
        return counts.tolist()

    mode = {
        "edges": n_edges, "mean_abs_d": 1.2, "median_abs_d": 1.0, "pct_d_negative": 60.0,
        "forward_passes": 100, "wall_time_s": 2.0,
        "real": {"abs_d_histogram": hist(1.0), "frac_pass_effect_filters": 0.2},
        "null": {"abs_d_histogram": hist(0.5), "frac_pass_effect_filters": 0.05},
        "abs_d_bin_edges": ABS_D_BIN_EDGES.tolist(),
        "criteria": {"min_n": 3, "q_max": 0.05, "d_min": 0.5, "consistency_min": 0.7, "reference_top_k": 50},
        "swept_layer_pairs": ["0->1", "0->2", "1->2"],
    }
    return {"corrected": mode, "reference": {**mode, "edges": 2 * n_edges}}


def sae_quality_table(model: str) -> pd.DataFrame:
    return pd.DataFrame({"model": model, "sae_set": "s", "layer": [0, 1], "heldout_fvu": [0.2, 0.25],
                         "heldout_pca_fvu": [0.5, 0.55], "dead_fraction": [0.0, 0.1]})


def edges_table(model: str, rng) -> pd.DataFrame:
    rows = []
    for mode in ("corrected", "reference"):
        for condition in ("c1", "c2"):
            for s_layer, t_layer in ((0, 1), (0, 2), (1, 2)):
                for f in range(10):
                    rows.append((model, mode, condition, s_layer, f, t_layer, f + 1, float(rng.normal(0, 2))))
    return pd.DataFrame(rows, columns=["model", "mode", "condition", "source_layer", "source_feature",
                                       "target_layer", "target_feature", "cohens_d"])


def coherence_record(model, condition, tested=12) -> dict:
    mode = {"observed": 0.8, "null_mean": 0.4, "null_sd": 0.1, "fold": 2.0, "p_value": 0.01,
            "n_edges_tested": tested, "null_values": [0.3, 0.4, 0.5]}
    return {"model": model, "condition": condition, "corrected": mode, "reference": {**mode, "observed": 0.5}}


def consensus_record() -> dict:
    res = {"observed": 3, "n_pairs_a": 10, "n_pairs_b": 12, "expected": 1.5, "fold": 2.0, "p_value": 0.04,
           "null_values": [1, 2, 1, 2], "relabel": {"expected": 0.5, "fold": 6.0, "null_values": [0, 1, 0, 1]}}
    per_mode = {"c1": res, "all": {**res, "observed": 5}}
    return {"model_a": "ma", "model_b": "mb", "corrected": per_mode, "reference": per_mode}


def validation_record(model, condition) -> dict:
    return {"model": model, "condition": condition, "result": {
        "gene_pairs": 10,
        "perturbation": [{"cell_line": "K562", "n_tested": 8, "accuracy": 0.75, "baseline": 0.5,
                          "p_vs_baseline": 0.1}],
        "tf_targets": {"n_matched": 4, "precision": 0.75, "null_mean": 0.5, "p_value": 0.3},
        "skipped": [],
    }}


def make_inputs(with_optional=True) -> ReportInputs:
    rng = np.random.default_rng(0)
    models, conditions = ("ma", "mb"), ("c1", "c2")
    return ReportInputs(
        summaries=[{**summary_record(rng), "model": m, "condition": c} for m in models for c in conditions],
        sae_quality=pd.concat([sae_quality_table(m) for m in models], ignore_index=True),
        edges=pd.concat([edges_table(m, rng) for m in models], ignore_index=True),
        coherence=[coherence_record(m, c, tested=0 if c == "c2" else 12) for m in models for c in conditions],
        consensus=[consensus_record()] if with_optional else [],
        validation=[validation_record(m, "c1") for m in models] if with_optional else [
            {"model": "ma", "condition": "c1", "result": {"gene_pairs": 0, "perturbation": None,
                                                          "tf_targets": None, "skipped": ["tf_targets: not set"]}}],
        top_edges=pd.DataFrame({"model": ["ma"], "condition": ["c1"], "cohens_d": [2.5],
                                "source_domain": ["T1"], "target_domain": ["T2"]}),
    )


def images(html_path) -> list[str]:
    return re.findall(r"<img src='([^']+)'", html_path.read_text())


def test_every_figure_is_written_linked_and_captioned(tmp_path):
    html = tmp_path / "report" / "index.html"
    figures = write_report(make_inputs(), html, tmp_path / "report" / "figures")
    names = [f.name for f in figures]
    assert names == ["sae_quality.png", "abs_d_real_vs_null.png", "pct_d_negative_by_layer_pair.png",
                     "layer_heatmap.png", "coherence.png", "consensus.png", "validation.png"]
    assert images(html) == [f"figures/{n}" for n in names]
    text = html.read_text()
    for figure in figures:
        assert (tmp_path / "report" / "figures" / figure.name).read_bytes()[:8] == PNG
        assert html_escape(figure.caption) in text  # caption on the page
    assert "K562" in text and "T1" in text  # validation and top-edge tables
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["figures", "index.html"]  # no temp left


def test_optional_sections_are_explained_when_absent(tmp_path):
    html = tmp_path / "index.html"
    figures = write_report(make_inputs(with_optional=False), html, tmp_path / "figures")
    assert "consensus.png" not in [f.name for f in figures] and "validation.png" not in [f.name for f in figures]
    text = html.read_text()
    assert "Consensus needs at least two models" in text and "Skipped: tf_targets: not set" in text


def test_rewrite_replaces_the_figures_folder(tmp_path):
    figures_dir = tmp_path / "figures"
    write_report(make_inputs(), tmp_path / "index.html", figures_dir)
    (figures_dir / "stale.png").write_bytes(b"old")
    write_report(make_inputs(with_optional=False), tmp_path / "index.html", figures_dir)
    assert not (figures_dir / "stale.png").exists() and not (figures_dir / "validation.png").exists()


def test_tables_show_the_inputs():
    inputs = make_inputs()
    summary = summary_table(inputs)
    assert len(summary) == 2 * 2 * 2  # models × conditions × modes
    row = summary[(summary["model"] == "ma") & (summary["condition"] == "c1") & (summary["mode"] == "corrected")]
    assert row["edges"].item() == 40 and row["fold"].item() == "2" and row["testable edges"].item() == 12
    untested = summary[(summary["condition"] == "c2") & (summary["mode"] == "corrected")]
    assert (untested["null"] == "n/a").all()  # no testable edge: no null either
    cons = consensus_table(inputs)
    assert cons["shared"].tolist() == [3, 5, 3, 5]
    assert cons["fold (relabelling)"].iloc[0] == "6"


def test_failed_figure_write_leaves_the_old_report(tmp_path):
    html = tmp_path / "index.html"
    write_report(make_inputs(), html, tmp_path / "figures")
    before = html.read_text()
    inputs = make_inputs()
    bad = ReportInputs(**{**inputs.__dict__, "sae_quality": inputs.sae_quality.drop(columns=["heldout_fvu"])})
    with pytest.raises(KeyError):
        write_report(bad, html, tmp_path / "figures")
    assert html.read_text() == before and len(list((tmp_path / "figures").iterdir())) == 7
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture
def drawn(monkeypatch):
    """The figures as drawn (name → matplotlib Figure), kept open for inspection."""
    import ctrace.report as report

    figures = {}

    def keep(fig, path, title, caption):
        figures[path.name] = fig
        return report.Figure(path.name, title, caption)

    monkeypatch.setattr(report, "_save", keep)
    yield figures
    report.plt.close("all")


def _with_summaries(inputs: ReportInputs, **mode_fields) -> ReportInputs:
    summaries = [{**s, **{m: {**s[m], **mode_fields} for m in ("corrected", "reference")}} for s in inputs.summaries]
    return ReportInputs(**{**inputs.__dict__, "summaries": summaries})


def test_pct_negative_bars_stand_over_their_own_layer_pair_when_modes_differ(tmp_path, drawn):
    """corrected: edges in 0→1 (all d<0) and 1→2 (none); reference: 0→1, 0→2, 1→2."""
    inputs = make_inputs()
    rows = [("ma", "corrected", "c1", 0, 1, 1, 1, -1.0), ("ma", "corrected", "c1", 1, 1, 2, 1, 1.0),
            *[("ma", "reference", "c1", s, 1, t, 1, -1.0) for s, t in ((0, 1), (0, 2), (1, 2))]]
    edges = pd.DataFrame(rows, columns=inputs.edges.columns)
    write_report(ReportInputs(**{**inputs.__dict__, "edges": edges}), tmp_path / "i.html", tmp_path / "f")
    ax = drawn["pct_d_negative_by_layer_pair.png"].axes[0]  # model ma
    ticks = {round(t, 6): label.get_text() for t, label in zip(ax.get_xticks(), ax.get_xticklabels())}
    corrected = {ticks[round(b.get_x() + b.get_width(), 6)]: b.get_height() for b in ax.containers[0]}
    reference = {ticks[round(b.get_x(), 6)]: b.get_height() for b in ax.containers[1]}
    assert corrected["0→1"] == 100.0 and corrected["1→2"] == 0.0 and np.isnan(corrected["0→2"])
    assert reference == {"0→1": 100.0, "0→2": 100.0, "1→2": 100.0}


def test_thresholds_on_the_page_and_figure_are_the_recorded_ones(tmp_path, drawn):
    criteria = {"min_n": 5, "q_max": 0.01, "d_min": 1.0, "consistency_min": 0.8, "reference_top_k": 20}
    html = tmp_path / "i.html"
    write_report(_with_summaries(make_inputs(), criteria=criteria), html, tmp_path / "f")
    text = html.read_text()
    assert "q &lt; 0.01, |d| ≥ 1, sign-consistency ≥ 0.8, n ≥ 5" in text and "top-20 cap" in text
    lines = [line.get_xdata()[0] for line in drawn["abs_d_real_vs_null.png"].axes[0].lines if line.get_xdata()[0] == line.get_xdata()[1]]
    assert lines == [1.0]
    older = tmp_path / "old.html"
    inputs = make_inputs()
    old_summaries = [{**s, **{m: {k: v for k, v in s[m].items() if k != "criteria"} for m in ("corrected", "reference")}}
                     for s in inputs.summaries]
    write_report(ReportInputs(**{**inputs.__dict__, "summaries": old_summaries}), older, tmp_path / "f")
    assert "do not record their thresholds" in older.read_text()


def test_heatmap_masks_the_layer_pairs_that_were_not_swept(tmp_path, drawn):
    """Only source layer 0 was swept: 1→2 is white (masked), not a tested pair with 0 edges."""
    inputs = _with_summaries(make_inputs(), swept_layer_pairs=["0->1", "0->2"])
    write_report(inputs, tmp_path / "i.html", tmp_path / "f")
    shown = drawn["layer_heatmap.png"].axes[0].images[0].get_array()
    assert shown.mask.tolist() == [[True, False, False], [True, True, True], [True, True, True]]


def test_sae_quality_axis_shows_a_failed_fit_above_fvu_1(tmp_path, drawn):
    inputs = make_inputs()
    quality = inputs.sae_quality.copy()
    quality.loc[0, "heldout_fvu"] = 3.0  # worse than predicting the mean
    write_report(ReportInputs(**{**inputs.__dict__, "sae_quality": quality}), tmp_path / "i.html", tmp_path / "f")
    assert drawn["sae_quality.png"].axes[0].get_ylim()[1] >= 3.0
    assert drawn["sae_quality.png"].axes[1].get_ylim() == (0.0, 1.05)
