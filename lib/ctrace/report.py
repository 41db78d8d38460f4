"""The workflow's HTML report: tables and PNG figures (matplotlib), each with a caption saying what to read.

`write_report` takes the kept results (edge summaries, SAE quality, edge tables, coherence, consensus,
validation and annotated top edges) already loaded, draws every figure into a folder and writes one HTML
page that links them. Both are written atomically: an interrupted run leaves no half-written report.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ctrace.edges import MODES  # noqa: E402
from ctrace.io import atomic_path  # noqa: E402


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows, loaded.

    summaries    edge summaries (one dict per model × condition, as written by `ctrace edges`)
    sae_quality  SAE quality table (model, sae_set, layer, heldout_fvu, heldout_pca_fvu, dead_fraction, …)
    edges        all edge tables concatenated, with `model` and `mode` columns
    coherence    coherence records (model, condition, {mode: result})
    consensus    consensus records (model_a, model_b, {mode: {condition: result}})
    validation   validation records (model, condition, result)
    top_edges    annotated top edges (model + `biology.annotated_top_edges` columns)
    """

    summaries: Sequence[dict[str, Any]]
    sae_quality: pd.DataFrame
    edges: pd.DataFrame
    coherence: Sequence[dict[str, Any]]
    consensus: Sequence[dict[str, Any]]
    validation: Sequence[dict[str, Any]]
    top_edges: pd.DataFrame


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    caption: str


def _models(inputs: ReportInputs) -> list[str]:
    return sorted({s["model"] for s in inputs.summaries})


def _axes_row(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, max(n, 1), figsize=(width * max(n, 1), height), squeeze=False)
    return fig, axes[0]


def _save(fig, path: Path, title: str, caption: str) -> Figure:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Figure(path.name, title, caption)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _criteria(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct edge criteria recorded in edge summaries (none for summaries of an older ctrace)."""
    found = []
    for s in summaries:
        c = s[MODES[0]].get("criteria")
        if c is not None and c not in found:
            found.append(c)
    return found


def _swept_layer_pairs(summaries: Sequence[dict[str, Any]]) -> set[tuple[int, int]] | None:
    """(source layer, target layer) pairs the summaries' statistics cover; None when none records them."""
    recorded = [s[MODES[0]]["swept_layer_pairs"] for s in summaries if "swept_layer_pairs" in s[MODES[0]]]
    if not recorded:
        return None
    return {tuple(int(x) for x in pair.split("->")) for pairs in recorded for pair in pairs}


def _criteria_note(inputs: ReportInputs) -> str:
    """What the two edge modes call an edge, with the thresholds the summaries record."""
    found = _criteria(inputs.summaries)
    if len(found) == 1:
        c = found[0]
        return (f"<b>corrected</b>: q &lt; {_fmt(c['q_max'])}, |d| ≥ {_fmt(c['d_min'])}, sign-consistency ≥ "
                f"{_fmt(c['consistency_min'])}, n ≥ {c['min_n']}; <b>reference</b>: the published study's call "
                f"(|d| &gt; {_fmt(c['d_min'])}, consistency &gt; {_fmt(c['consistency_min'])}, top-"
                f"{c['reference_top_k']} cap), for comparison.")
    if found:
        listed = "; ".join(html.escape(", ".join(f"{k} {v}" for k, v in c.items())) for c in found)
        return f"<b>corrected</b> and <b>reference</b> edge calls; the conditions used different thresholds: {listed}."
    return ("<b>corrected</b> and <b>reference</b> edge calls; these summaries do not record their thresholds "
            "(written by an older ctrace: re-run the edges step to record them).")


# ───────────────────────────────────────── figures ─────────────────────────────────────────


def fig_sae_quality(inputs: ReportInputs, path: Path) -> Figure:
    quality = inputs.sae_quality
    groups = sorted(quality.groupby(["model", "sae_set"]).groups)
    fig, axes = _axes_row(len(groups))
    for ax, (model, sae_set) in zip(axes, groups):
        q = quality[(quality["model"] == model) & (quality["sae_set"] == sae_set)].sort_values("layer")
        ax.plot(q["layer"], q["heldout_fvu"], "o-", label="TopK SAE")
        ax.plot(q["layer"], q["heldout_pca_fvu"], "s--", label="PCA, same k")
        for layer, dead in zip(q["layer"], q["dead_fraction"]):
            if dead > 0:
                ax.annotate(f"dead {dead:.0%}", (layer, 0.02), fontsize=7, ha="center")
        # an FVU above 1 (a failed fit, worse than the mean) stays on the axis
        top = max(1.05, 1.05 * float(np.nanmax([*q["heldout_fvu"], *q["heldout_pca_fvu"], 0.0])))
        ax.set(title=f"{model} / {sae_set}", xlabel="layer", ylabel="held-out FVU", ylim=(0, top))
        ax.set_xticks(q["layer"])
        ax.legend(fontsize=8)
    return _save(fig, path, "SAE quality",
                  "Fraction of variance unexplained on held-out cells, per layer: the SAE (k active features) "
                  "against PCA with k components. A useful SAE sits well below the PCA line; dead-feature "
                  "fractions are marked when above zero.")


def fig_abs_d(inputs: ReportInputs, path: Path) -> Figure:
    models = _models(inputs)
    fig, axes = _axes_row(len(models))
    for ax, model in zip(axes, models):
        rows = [s for s in inputs.summaries if s["model"] == model]
        edges_ = np.asarray(rows[0]["corrected"]["abs_d_bin_edges"])
        real = np.sum([r["corrected"]["real"]["abs_d_histogram"] for r in rows], axis=0)
        null = np.sum([r["corrected"]["null"]["abs_d_histogram"] for r in rows], axis=0)
        for counts, label, style in ((real, "feature ablations", "-"), (null, "random directions (null)", "--")):
            density = counts / max(counts.sum(), 1)
            ax.stairs(density, edges_, label=f"{label} (n={int(counts.sum()):,})", linestyle=style)
        for d_min in sorted({c["d_min"] for c in _criteria(rows)}):
            ax.axvline(d_min, color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", title=model, xlabel="|Cohen's d| per (source, target) test",
               ylabel="fraction of tests", xlim=(1e-2, 1e2))
        ax.legend(fontsize=7)
    return _save(fig, path, "|d| of real vs null ablations",
                  "Distribution of |d| over every tested (source feature, target feature) pair, all conditions, "
                  "for the SAE-feature ablations and for random directions of the same per-position norm. "
                  "Edges are only meaningful where the real curve lies above the null in the tail right of the "
                  "|d| threshold (grey line); overlapping tails mean the threshold admits what random "
                  "perturbations also produce.")


def _layer_pair_table(edges: pd.DataFrame, model: str, mode: str) -> pd.DataFrame:
    e = edges[(edges["model"] == model) & (edges["mode"] == mode)]
    if e.empty:
        return pd.DataFrame(columns=["pair", "edges", "pct_negative"])
    g = e.groupby(["source_layer", "target_layer"])["cohens_d"]
    table = pd.DataFrame({"edges": g.size(), "pct_negative": 100 * g.apply(lambda d: float((d < 0).mean()))})
    table = table.reset_index()
    table["pair"] = table["source_layer"].astype(str) + "→" + table["target_layer"].astype(str)
    return table


def fig_pct_negative(inputs: ReportInputs, path: Path) -> Figure:
    models = _models(inputs)
    fig, axes = _axes_row(len(models), width=5.0)
    for ax, model in zip(axes, models):
        width = 0.4
        tables = {mode: _layer_pair_table(inputs.edges, model, mode) for mode in MODES}
        # one x position per layer pair of either mode: a mode without edges in a pair has no bar there
        pairs = sorted({(int(s), int(t)) for tab in tables.values()
                        for s, t in zip(tab.get("source_layer", []), tab.get("target_layer", []))})
        x = np.arange(len(pairs))
        for i, mode in enumerate(MODES):
            t = tables[mode]
            by_pair = dict(zip(zip(t.get("source_layer", []), t.get("target_layer", [])), t["pct_negative"]))
            heights = [by_pair.get(pair, np.nan) for pair in pairs]
            ax.bar(x + (i - 0.5) * width, heights, width, label=mode)
        ax.set_xticks(x, [f"{s}→{t}" for s, t in pairs], rotation=45, fontsize=8)
        ax.axhline(50, color="grey", lw=0.8)
        ax.set(title=model, xlabel="source → target layer", ylabel="% edges with d < 0", ylim=(0, 100))
        ax.legend(fontsize=8)
    return _save(fig, path, "% d < 0 by layer pair",
                  "Share of edges whose target drops when the source is ablated (d < 0, the reference's "
                  "\"inhibitory\"), per source → target layer pair and edge mode. The reference mode counts "
                  "zero responses as non-positive, which pushes this share up; compare the two bars.")


def fig_layer_heatmap(inputs: ReportInputs, path: Path) -> Figure:
    models = _models(inputs)
    fig, axes = plt.subplots(len(MODES), max(len(models), 1), figsize=(4.2 * max(len(models), 1), 7.2),
                             squeeze=False)
    for col, model in enumerate(models):
        e_model = inputs.edges[inputs.edges["model"] == model]
        swept = _swept_layer_pairs([s for s in inputs.summaries if s["model"] == model])
        layers = sorted(set(e_model["source_layer"]) | set(e_model["target_layer"]) | {x for pair in swept or () for x in pair})
        for row, mode in enumerate(MODES):
            ax = axes[row][col]
            e = e_model[e_model["mode"] == mode]
            counts = np.zeros((len(layers), len(layers)), dtype=np.int64)
            index = {layer: i for i, layer in enumerate(layers)}
            for (s, t), c in e.groupby(["source_layer", "target_layer"]).size().items():
                counts[index[s], index[t]] = c
            if swept is None:  # summaries of an older ctrace: every pair above the diagonal counts as swept
                tested = np.triu(np.ones_like(counts, dtype=bool), k=1)
            else:
                tested = np.zeros_like(counts, dtype=bool)
                for s, t in swept:
                    tested[index[s], index[t]] = True
            shown = np.ma.masked_array(counts, mask=~tested)
            image = ax.imshow(shown, cmap="viridis", vmin=0)
            for i in range(len(layers)):
                for j in range(len(layers)):
                    if counts[i, j]:
                        light = counts[i, j] > 0.6 * counts.max()  # dark text on the bright end of viridis
                        ax.text(j, i, f"{counts[i, j]:,}", ha="center", va="center", fontsize=7,
                                color="k" if light else "w")
            ax.set_xticks(range(len(layers)), layers)
            ax.set_yticks(range(len(layers)), layers)
            ax.set(title=f"{model}, {mode}", xlabel="target layer", ylabel="source layer")
            fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path, "Edges per source × target layer",
                  "Number of edges (all conditions) from each source layer (rows) to each later target layer "
                  "(columns), per model and edge mode. White: layer pairs not swept — an ablation only acts "
                  "downstream, and only the configured source layers are ablated.")


def fig_coherence(inputs: ReportInputs, path: Path) -> Figure:
    records = sorted(inputs.coherence, key=lambda r: (r["model"], r["condition"]))
    fig, axes = _axes_row(len(MODES), width=max(5.0, 0.75 * len(records) + 1.5), height=3.8)
    for ax, mode in zip(axes, MODES):
        tested = np.array([r[mode]["n_edges_tested"] for r in records], dtype=int)
        labels = [f"{r['model']}\n{r['condition']}\n({n} edges)" for r, n in zip(records, tested)]
        x = np.arange(len(records))
        obs = np.array([r[mode]["observed"] for r in records], dtype=float)
        mean = np.array([r[mode]["null_mean"] for r in records], dtype=float)
        sd = np.nan_to_num(np.array([r[mode]["null_sd"] for r in records], dtype=float))
        has = tested > 0  # coherence of zero testable edges is undefined: nothing is drawn
        ax.errorbar(x[has] + 0.12, mean[has], yerr=sd[has], fmt="s", color="grey", capsize=3,
                    label="rewiring null, mean ± sd")
        ax.plot(x[has] - 0.12, obs[has], "o", color="C3", label="observed", zorder=3)
        ax.set_xticks(x, labels, rotation=60, fontsize=7)
        ax.set_xlim(-0.6, len(records) - 0.4)
        ax.set(title=f"coherence, {mode} edges", ylabel="annotated edges sharing a term", ylim=(0, 1.05))
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path, "Coherence vs the rewiring null",
                  "Among edges whose two features both carry a significant gene-set term, the share whose terms "
                  "overlap (red) against the same share after degree-preserving rewiring within each layer pair "
                  "(grey, mean ± sd). Only a red point clearly above the grey bar is evidence of biologically "
                  "coherent wiring; the labels say how many edges were testable (none drawn when 0).")


def fig_consensus(inputs: ReportInputs, path: Path) -> Figure | None:
    if not inputs.consensus:
        return None
    panels = [(r, mode) for r in inputs.consensus for mode in MODES]
    fig, axes = _axes_row(len(panels))
    for ax, (record, mode) in zip(axes, panels):
        res = record[mode]["all"]
        bins = np.arange(0, max([res["observed"], *res["null_values"], *res["relabel"]["null_values"], 1]) + 2) - 0.5
        ax.hist(res["null_values"], bins=bins, alpha=0.6, label=f"rewiring null (mean {_fmt(res['expected'])})")
        ax.hist(res["relabel"]["null_values"], bins=bins, alpha=0.6,
                label=f"relabelling null (mean {_fmt(res['relabel']['expected'])})")
        ax.axvline(res["observed"], color="C3", lw=2, label=f"observed {res['observed']}")
        ax.set(title=f"{record['model_a']} ∩ {record['model_b']}, {mode}", xlabel="shared domain pairs",
               ylabel="permutations")
        if res["n_pairs_a"] == 0 or res["n_pairs_b"] == 0:
            ax.text(0.5, 0.5, f"no annotated domain pair in\n{record['model_a'] if res['n_pairs_a'] == 0 else record['model_b']}"
                    " (both ends need a domain)", transform=ax.transAxes, ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "0.7"})
        ax.legend(fontsize=7)
    return _save(fig, path, "Cross-model consensus vs nulls",
                  "Number of (source domain → target domain) pairs found in both models (red), against the "
                  "rewiring null that keeps every domain's popularity (blue) and the reference's relabelling "
                  "null (orange). Judge the observation against the blue histogram: the relabelling null ignores "
                  "popular domains and so overstates the fold.")


def fig_validation(inputs: ReportInputs, path: Path) -> Figure | None:
    rows = []
    for r in inputs.validation:
        for line in r["result"]["perturbation"] or []:
            rows.append((f"{r['model']}/{r['condition']}\n{line['cell_line']}", line["accuracy"], line["baseline"]))
        tf = r["result"]["tf_targets"]
        if tf:
            rows.append((f"{r['model']}/{r['condition']}\nTF→target", tf["precision"], tf["null_mean"]))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(rows)), 3.6))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="observed accuracy / precision")
    ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label="sign-imbalance baseline / shuffled mean")
    ax.set_xticks(x, [r[0] for r in rows], fontsize=7, rotation=45)
    ax.set(ylim=(0, 1), ylabel="fraction correct")
    ax.legend(fontsize=7)
    return _save(fig, path, "Gene-level validation",
                  "Directional accuracy of signed gene-pair predictions against knock-down log-fold-changes "
                  "(per cell line), and precision against TF→target modes, each next to what chance gives with "
                  "the same sign frequencies. Only the gap between the two bars is evidence.")


# ───────────────────────────────────────── tables ─────────────────────────────────────────


def summary_table(inputs: ReportInputs) -> pd.DataFrame:
    coh = {(r["model"], r["condition"]): r for r in inputs.coherence}
    rows = []
    for s in sorted(inputs.summaries, key=lambda s: (s["model"], s["condition"])):
        for mode in MODES:
            m = s[mode]
            c = coh.get((s["model"], s["condition"]), {}).get(mode, {})
            rows.append({
                "model": s["model"], "condition": s["condition"], "mode": mode, "edges": m["edges"],
                "mean |d|": _fmt(m["mean_abs_d"]), "% d<0": _fmt(m["pct_d_negative"]),
                "null tests passing effect filters": _fmt(m["null"]["frac_pass_effect_filters"]),
                "coherence": _fmt(c.get("observed")),
                "null": _fmt(c.get("null_mean") if c.get("n_edges_tested") else None),
                "fold": _fmt(c.get("fold")), "p": _fmt(c.get("p_value")),
                "testable edges": c.get("n_edges_tested", "n/a"),
                # no wall times: the page is a pure function of the results (byte-identical on re-runs)
                "ablation passes": m["forward_passes"],
            })
    return pd.DataFrame(rows)


def consensus_table(inputs: ReportInputs) -> pd.DataFrame:
    rows = []
    for r in inputs.consensus:
        for mode in MODES:
            for condition, res in r[mode].items():
                row = {
                    "models": f"{r['model_a']} ∩ {r['model_b']}", "mode": mode, "condition": condition,
                    "pairs A": res["n_pairs_a"], "pairs B": res["n_pairs_b"], "shared": res["observed"],
                    "expected (rewiring)": _fmt(res["expected"]), "fold": _fmt(res["fold"]),
                    "p": _fmt(res["p_value"]), "expected (relabelling)": _fmt(res["relabel"]["expected"]),
                    "fold (relabelling)": _fmt(res["relabel"]["fold"]),
                }
                if "disease" in res:
                    row["disease OR"] = _fmt(res["disease"]["odds_ratio"])
                    row["disease p"] = _fmt(res["disease"]["p_value"])
                rows.append(row)
    return pd.DataFrame(rows)


def validation_table(inputs: ReportInputs) -> tuple[pd.DataFrame, list[str]]:
    rows, skipped = [], set()
    for r in inputs.validation:
        res = r["result"]
        skipped.update(res["skipped"])
        for line in res["perturbation"] or []:
            rows.append({"model": r["model"], "condition": r["condition"], "test": f"knock-down {line['cell_line']}",
                         "pairs tested": line["n_tested"], "observed": _fmt(line["accuracy"]),
                         "baseline": _fmt(line["baseline"]), "p vs baseline": _fmt(line["p_vs_baseline"])})
        tf = res["tf_targets"]
        if tf:
            rows.append({"model": r["model"], "condition": r["condition"], "test": "TF→target modes",
                         "pairs tested": tf["n_matched"], "observed": _fmt(tf["precision"]),
                         "baseline": _fmt(tf["null_mean"]), "p vs baseline": _fmt(tf["p_value"])})
    return pd.DataFrame(rows), sorted(skipped)


# ───────────────────────────────────────── page ─────────────────────────────────────────

_CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f2f2f2; }
figure { margin: 1.5em 0; } figcaption { font-size: 13px; color: #444; max-width: 1000px; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 13px; }
"""


def _table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class='note'>(none)</p>"
    return frame.to_html(index=False, escape=True, border=0)


def _figure(figure: Figure, folder_name: str) -> str:
    return (f"<figure><h3>{html.escape(figure.title)}</h3><img src='{folder_name}/{figure.name}' "
            f"alt='{html.escape(figure.title)}'><figcaption>{html.escape(figure.caption)}</figcaption></figure>")


def render_figures(inputs: ReportInputs, folder: str | os.PathLike) -> list[Figure]:
    """Draw every figure the inputs support into `folder`; returns them in page order."""
    folder = Path(folder)
    figures = [
        fig_sae_quality(inputs, folder / "sae_quality.png"),
        fig_abs_d(inputs, folder / "abs_d_real_vs_null.png"),
        fig_pct_negative(inputs, folder / "pct_d_negative_by_layer_pair.png"),
        fig_layer_heatmap(inputs, folder / "layer_heatmap.png"),
        fig_coherence(inputs, folder / "coherence.png"),
        fig_consensus(inputs, folder / "consensus.png"),
        fig_validation(inputs, folder / "validation.png"),
    ]
    return [f for f in figures if f is not None]


def write_report(inputs: ReportInputs, html_path: str | os.PathLike, figures_dir: str | os.PathLike) -> list[Figure]:
    """Write the figures folder and the HTML page (which links the figures by relative path)."""
    html_path, figures_dir = Path(html_path), Path(figures_dir)
    figures_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{figures_dir.name}.", dir=figures_dir.parent))
    try:
        figures = render_figures(inputs, staging)
        if figures_dir.exists():
            shutil.rmtree(figures_dir)
        staging.rename(figures_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    rel = os.path.relpath(figures_dir, html_path.parent)
    by_name = {f.name: f for f in figures}
    validation, skipped = validation_table(inputs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ctrace report</title>",
        f"<style>{_CSS}</style></head><body><h1>ctrace report</h1>",
        "<p class='note'>Edges: source feature → target feature, d = paired Cohen's d of the target's response "
        f"to ablating the source (d &lt; 0: the target drops). {_criteria_note(inputs)}</p>",
        "<h2>Per-condition summary</h2>", _table(summary_table(inputs)),
        "<h2>SAE quality</h2>", _table(inputs.sae_quality), _figure(by_name["sae_quality.png"], rel),
        "<h2>Edges</h2>",
        *(_figure(by_name[n], rel) for n in ("abs_d_real_vs_null.png", "pct_d_negative_by_layer_pair.png",
                                              "layer_heatmap.png")),
        "<h2>Coherence</h2>", _figure(by_name["coherence.png"], rel),
        "<h2>Cross-model consensus</h2>",
    ]
    if "consensus.png" in by_name:
        parts += [_table(consensus_table(inputs)), _figure(by_name["consensus.png"], rel)]
    else:
        parts.append("<p class='note'>Consensus needs at least two models in the config.</p>")
    parts += ["<h2>Top edges (corrected mode)</h2>",
              "<p class='note'>Largest |d| per model and condition; domain = the feature's most significant "
              "gene-set term (empty: none significant).</p>", _table(inputs.top_edges),
              "<h2>Gene-level validation</h2>"]
    if "validation.png" in by_name:
        parts += [_table(validation), _figure(by_name["validation.png"], rel)]
    parts += [f"<p class='note'>Skipped: {html.escape(s)}</p>" for s in skipped]
    parts.append("</body></html>")
    with atomic_path(html_path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return figures
