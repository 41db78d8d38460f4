"""Benchmark: `ctrace.trace.run_sweep` against a faithful re-implementation of the reference loop.

The reference loop (method.md §9, §10; structure of bio-sae-circuits src/13): batch 1, fp32; per cell one
clean whole-model pass and the source SAE encoded once; per (cell, source feature) where the feature
fires: the ablation as an SAE-decode difference, the WHOLE model re-run from the input (MLM head
included) with a forward hook on block L that replaces its output, and for every downstream layer the
clean codes re-encoded and the ablated codes encoded at all gene positions on the CPU, the per-position
differences averaged in a Python loop, a Welford update. Both paths must give the same statistics
(≤ 1e-5) and the same edge tables in both modes; the exit status is 1 otherwise.

Small benchmark (default): a tiny randomly initialised Geneformer in the official format
(tests/model_fixtures.py + ctrace.models.load_backend), 4 blocks, d 64, 1,000-gene vocabulary (so the MLM
head costs about a block, as in the real model), ~80-token cells, SAEs 4× wide with k 16.
  PYTHONPATH=lib python bench/sweep_vs_reference.py --threads 2 --source-layers 0,1,2 [--device cuda]
The sweep runs with SweepConfig(features_per_batch=--features-per-batch (default: all source features, one
group), ablations_per_batch=--ablations-per-batch (default 64), cells_per_clean_pass=--cells-per-clean-pass
(default 16)): cells in order of length, one clean pass of blocks 0..L per 16 cells, then passes of ≤ 64
ablated rows of cells of similar length + one clean row per cell, block L+1's q/k/v only at the edited positions
and the last target block only at the read positions (Backend Edits, block_at). Each side is timed
--repeats times (default 5, the two sides interleaved); the medians are compared, and the sweep's repeats
must give bit-identical statistics. --threads sets torch's intra-op threads for both sides (2 = both
cores of the 2-core CI machine; 1 shows the single-core ratio).
`--real-size`: a randomly initialised Geneformer V2-316M-shaped model (18 layers, d 1152, 18 heads, ffn
4608), ~2000-gene cells, 30 source features × 200 cells at source layer 0; reports forward passes per
second against the reference's 1.46 s per pass, and, on the first --reference-cells cells (default 2), the
reference loop itself for a same-machine s/pass baseline and the statistics' agreement. `--bf16` adds a
bf16-autocast sweep (GPU only) and compares its edges with fp32.
FLOP/s: matmul FLOPs of the sweep's downstream blocks (counted analytically, `block_flops`) per second of
(a) the whole sweep and (b) the synchronised time inside those blocks, as a fraction of the FLOP/s of a
timed matmul of the sweep's shape (rows·tokens × d) @ (d × ffn) measured in the same run, through the
blocks' own `ctrace.linear` (oneDNN on CPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "tests"))

from ctrace.edges import MODES, edge_statistics, edge_table, summarize_edges  # noqa: E402
from ctrace.linear import linear  # noqa: E402
from ctrace.models import load_backend  # noqa: E402
from ctrace.models.base import Backend, Batch  # noqa: E402
from ctrace.sae import SAEShape, TopKSAE  # noqa: E402
from ctrace.trace import SweepConfig, SweepStats, _passes_of_chunk, cell_chunks, run_sweep  # noqa: E402

REFERENCE_S_PER_PASS = 1.46  # method.md §9: 7.5 h / 24,776 passes (Apple-Silicon GPU, batch 1, fp32)
STAT_NAMES = ("n_S", "sum_SLG", "sumsq_SLG", "pos_SLG", "neg_SLG")


# ---------------------------------------------------------------------------------------------------
# model, cells, SAEs
# ---------------------------------------------------------------------------------------------------
def make_geneformer(
    workdir: Path,
    n_layers: int,
    hidden: int,
    heads: int,
    ffn: int,
    max_pos: int,
    n_genes: int,
    device: str,
    seed: int,
    half: torch.dtype | None = None,
) -> Backend | tuple[Backend, Backend]:
    """A randomly initialised Geneformer written in the official format and loaded as a Backend (fp32);
    with `half`, also loaded a second time in that dtype (as the config's model `dtype` loads it)."""
    import model_fixtures as fx
    from ctrace.models import build_geneformer, save_geneformer

    dicts = fx.write_synthetic_geneformer_dictionaries(workdir / "dicts", n_genes=n_genes)
    model = build_geneformer(
        vocab_size=n_genes + 4,
        hidden_size=hidden,
        n_layers=n_layers,
        n_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=max_pos,
        seed=seed,
    )
    model_dir = save_geneformer(model, workdir / "model")
    del model
    backend = load_backend("geneformer", model_dir, dicts, device=device)
    backend.reference_model()  # the HF model the reference loop runs, loaded while the folder exists
    if half is None:
        return backend
    return backend, load_backend("geneformer", model_dir, dicts, device=device, dtype=half)


@torch.no_grad()
def fitted_saes(backend: Backend, cells, layers, n_features: int, k: int, seed: int) -> dict[int, TopKSAE]:
    """Random TopK SAEs (tied init) centred on each layer's mean gene-position activation."""
    sums = {layer: torch.zeros(backend.d_model, dtype=torch.float64, device=backend.device) for layer in layers}
    count = 0
    for cell in cells[:8]:
        batch = backend.collate([cell])
        hs = backend.hidden_states(batch, layers)
        for layer in layers:
            sums[layer] += hs[layer][batch.gene_BT].double().sum(0)
        count += int(batch.gene_BT.sum())
    saes = {}
    for i, layer in enumerate(layers):
        sae = TopKSAE(SAEShape(backend.d_model, n_features, k), generator=torch.Generator().manual_seed(seed + i))
        sae.mean_D.copy_((sums[layer] / count).float().cpu())
        saes[layer] = sae.eval()
    return saes


# ---------------------------------------------------------------------------------------------------
# the reference loop
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def replace_block_output(layer_module: torch.nn.Module, h_1TD: torch.Tensor) -> Iterator[None]:
    """Forward hook on one block that replaces its output by h_1TD; removed when the `with` block ends."""

    def hook(_module, _args, out):
        return (h_1TD, *out[1:]) if isinstance(out, tuple) else h_1TD

    handle = layer_module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def full_pass(backend: Backend, batch: Batch, L: int | None = None, h_1TD: torch.Tensor | None = None):
    """Hidden states h_0..h_{N-1} of one whole-model pass from the input, optionally replaced at block L."""
    reference_model = getattr(backend, "reference_model", None)
    if reference_model is not None:  # Geneformer: the HF model, MLM head included, as the reference ran it
        module = reference_model()
        ctx = (
            replace_block_output(module.bert.encoder.layer[L], h_1TD) if h_1TD is not None else contextlib.nullcontext()
        )
        with ctx:
            out = module(input_ids=batch.input_ids_BT, attention_mask=batch.keep_BT.long(), output_hidden_states=True)
        return out.hidden_states[1:]
    hs, h = [], backend.embed(batch)
    for layer, h in backend.run_blocks(h, batch, 0, backend.n_layers - 1):
        if layer == L and h_1TD is not None:
            h = h_1TD
        hs.append(h)
    return hs


class Welford:
    """The reference's per-(feature, layer) accumulator: running mean, M2, #δ>0 (and #δ<0 for comparison)."""

    def __init__(self, n_features: int):
        self.n, self.mean, self.m2 = 0, np.zeros(n_features), np.zeros(n_features)
        self.pos, self.neg = np.zeros(n_features, np.int64), np.zeros(n_features, np.int64)

    def update(self, x: np.ndarray) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)
        self.pos += x > 0
        self.neg += x < 0


@torch.no_grad()
def reference_sweep(backend, saes, cells, L, feats, targets) -> tuple[dict[str, np.ndarray], dict]:
    """The reference loop (bio-sae-circuits src/13, method.md §9): returns run_sweep's statistics layout.

    Per cell: one clean whole-model pass (batch 1), hidden states copied to the CPU, the source SAE
    encoded once. Per (cell, feature) where the feature fires: ablation as the SAE-decode difference
    with z_f zeroed, a whole-model pass from the input with a hook replacing block L's output, and for
    every downstream layer the clean AND ablated gene positions encoded on the CPU, the per-position
    differences averaged in a Python loop, and a Welford update.
    """
    cpu = {}
    for layer, sae in saes.items():
        copy = TopKSAE(sae.shape)
        copy.load_state_dict({k: v.detach().cpu() for k, v in sae.state_dict().items()})
        cpu[layer] = copy.eval()
    G = cpu[targets[0]].shape.n_features
    acc = {(f, dl): Welford(G) for f in feats for dl in targets}
    n_active = dict.fromkeys(feats, 0)
    fired_per_cell, passes = [], 0
    t0 = time.perf_counter()
    for cell in cells:
        batch = backend.collate([cell])
        gene_P = torch.nonzero(batch.gene_BT[0].cpu()).flatten()
        clean = full_pass(backend, batch)
        passes += 1
        clean_full_TD = clean[L][0].cpu()
        z_PF = cpu[L].encode(clean_full_TD[gene_P])
        clean_down = {dl: clean[dl][0].cpu()[gene_P] for dl in targets}
        fired = []  # indices into feats, for the sweep's FLOP count
        for si, f in enumerate(feats):
            active_P = z_PF[:, f] > 0
            if not bool(active_P.any()):
                continue
            fired.append(si)
            n_active[f] += 1
            z_abl = z_PF.clone()
            z_abl[:, f] = 0.0
            delta_PD = cpu[L].decode(z_abl) - cpu[L].decode(z_PF)
            modified_TD = clean_full_TD.clone()
            modified_TD[gene_P] = clean_full_TD[gene_P] + delta_PD
            ablated = full_pass(backend, batch, L, modified_TD[None].to(backend.device, backend.dtype))
            passes += 1
            active_positions = torch.nonzero(active_P).flatten()
            for dl in targets:
                clean_codes = cpu[dl].encode(clean_down[dl])  # re-encoded for every feature
                ablated_codes = cpu[dl].encode(ablated[dl][0].cpu()[gene_P])
                per_pos = [(ablated_codes[p] - clean_codes[p]).numpy().astype(np.float64) for p in active_positions]
                acc[(f, dl)].update(np.mean(per_pos, axis=0))
        fired_per_cell.append(np.asarray(fired, dtype=np.int64))
    if torch.device(backend.device).type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    S, NL = len(feats), len(targets)
    out = {
        "n_S": np.array([n_active[f] for f in feats], np.int64),
        "sum_SLG": np.zeros((S, NL, G)),
        "sumsq_SLG": np.zeros((S, NL, G)),
        "pos_SLG": np.zeros((S, NL, G), np.int64),
        "neg_SLG": np.zeros((S, NL, G), np.int64),
    }
    for si, f in enumerate(feats):
        for li, dl in enumerate(targets):
            a = acc[(f, dl)]
            out["sum_SLG"][si, li] = a.n * a.mean
            out["sumsq_SLG"][si, li] = a.m2 + a.n * a.mean**2
            out["pos_SLG"][si, li], out["neg_SLG"][si, li] = a.pos, a.neg
    return out, {"wall_time_s": wall, "passes": passes, "fired_per_cell": fired_per_cell}


def to_stats(raw: dict[str, np.ndarray], like: SweepStats, wall: float) -> SweepStats:
    S, NL, G = raw["sum_SLG"].shape
    return SweepStats(
        source_layer=like.source_layer,
        source_features_S=like.source_features_S,
        target_layers_L=like.target_layers_L,
        n_target_features=G,
        null_sum_SRLG=np.zeros((S, 0, NL, G)),
        null_sumsq_SRLG=np.zeros((S, 0, NL, G)),
        null_pos_SRLG=np.zeros((S, 0, NL, G), np.int64),
        null_neg_SRLG=np.zeros((S, 0, NL, G), np.int64),
        n_cells=like.n_cells,
        cells_digest=like.cells_digest,
        forward_passes=int(raw["n_S"].sum()),
        wall_time_s=wall,
        **raw,
    )


# ---------------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------------
def block_flops(T: int, d: int, ffn: int) -> float:
    """Matmul FLOPs of one BERT block on one T-token sequence: T·(8d² + 4d·ffn) + 4T²d (QKᵀ and AV)."""
    return T * (8.0 * d * d + 4.0 * d * ffn) + 4.0 * T * T * d


def sweep_downstream_flops(cells, fired_per_cell, n_sources, n_blocks, cfg: SweepConfig, d, ffn) -> tuple[float, int]:
    """Matmul FLOPs of the sweep's ablation passes (the work that has to be done, not counting overheads),
    and Σ rows × tokens × blocks of those passes (must equal the sweep's own `downstream_block_tokens`).

    The passes are planned as the sweep plans them (`_passes_of_chunk` per chunk of `cell_chunks`): each
    pass has its cells' clean rows plus ≤ ablations_per_batch ablated rows, right-padded to its longest cell
    (the padding is counted: the blocks compute it); blocks L+1..stop−1 in full, the last block's keys and
    values at every position (its queries, read at a few positions, are not counted).
    fired_per_cell: per cell, the indices (into the list of n_sources source features) of those that fire.
    """
    lengths = np.array([len(c.input_ids) for c in cells])
    total, block_tokens = 0.0, 0
    for chunk in cell_chunks(cells, cfg.cells_per_clean_pass):
        fired_CS = np.zeros((len(chunk), n_sources), dtype=bool)
        for row, c in enumerate(chunk):
            fired_CS[row, fired_per_cell[c]] = True
        chunk_lengths = lengths[chunk]
        for p in _passes_of_chunk(fired_CS, chunk_lengths, n_sources, cfg):
            T = int(chunk_lengths[p.cells_m].max())
            rows = p.cells_m.size + p.dir_I.size
            total += rows * ((n_blocks - 1) * block_flops(T, d, ffn) + T * 4.0 * d * d)
            block_tokens += rows * T * n_blocks
    return total, block_tokens


def matmul_flops_per_s(m: int, k: int, n: int, device: torch.device, bf16: bool, seconds: float = 1.0) -> float:
    """Measured FLOP/s of (m×k)·(k×n) in the sweep's precision, through the blocks' own `ctrace.linear`
    (on a CPU: oneDNN, which there outruns torch.matmul's MKL on AMD CPUs)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x_MK = torch.randn(m, k, device=device, dtype=dtype)
    w_NK = torch.randn(n, k, device=device, dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            linear(x_MK, w_NK)
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            linear(x_MK, w_NK)
            reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return 2.0 * m * k * n * reps / dt


class DelegatingBackend(Backend):
    """A back-end that forwards everything to `inner`; benchmarks override the calls they instrument."""

    def __init__(self, inner: Backend):
        self.inner = inner
        for name in (
            "name",
            "n_layers",
            "d_model",
            "pad_token_id",
            "special_token_ids",
            "pad_value",
            "device",
            "dtype",
        ):
            setattr(self, name, getattr(inner, name))

    def collate(self, cells):
        return self.inner.collate(cells)

    def embed(self, batch):
        return self.inner.embed(batch)

    def run_blocks(self, h, batch, start, stop, edits=None):
        return self.inner.run_blocks(h, batch, start, stop, edits)

    def block_at(self, h, batch, layer, rows_N, pos_N, edits=None):
        return self.inner.block_at(h, batch, layer, rows_N, pos_N, edits)


class TimedBackend(DelegatingBackend):
    """Delegates to a backend and times the downstream `run_blocks` (start > source layer) and `block_at` calls."""

    def __init__(self, inner: Backend, source_layer: int):
        super().__init__(inner)
        self.source_layer, self.block_s = source_layer, 0.0

    def block_at(self, h, batch, layer, rows_N, pos_N, edits=None):
        sync = torch.cuda.synchronize if torch.device(self.device).type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = self.inner.block_at(h, batch, layer, rows_N, pos_N, edits)
        sync()
        self.block_s += time.perf_counter() - t0
        return out

    def run_blocks(self, h, batch, start, stop, edits=None):
        if start <= self.source_layer:
            yield from self.inner.run_blocks(h, batch, start, stop, edits)
            return
        sync = torch.cuda.synchronize if torch.device(self.device).type == "cuda" else (lambda: None)
        it = self.inner.run_blocks(h, batch, start, stop, edits)
        while True:
            sync()
            t0 = time.perf_counter()
            try:
                item = next(it)
                sync()
            except StopIteration:
                self.block_s += time.perf_counter() - t0
                return
            self.block_s += time.perf_counter() - t0
            yield item


@torch.no_grad()
def plant_readers(saes: dict[int, TopKSAE], L: int, feats: list[int], targets: list[int], gain: float = 3.0) -> None:
    """In every target SAE, make feature f+1 read source feature f's decoder direction (encoder row =
    gain · W_dec[:, f]): random models and SAEs alone give no |d| ≥ 0.5 effects, hence no edges to compare."""
    for t in targets:
        for f in feats:
            saes[t].W_enc_FD[f + 1] = gain * saes[L].W_dec_DF[:, f].to(saes[t].W_enc_FD.device)


def fired_sets(backend, saes, cells, L, feats) -> list[np.ndarray]:
    """Per cell: the indices into `feats` of the source features that fire in it (for the FLOP count)."""
    sae = saes[L]
    fired = []
    with torch.no_grad():
        for cell in cells:
            batch = backend.collate([cell])
            h = backend.hidden_states(batch, [L])[L][0]
            z = sae.to(h.device).encode(h[batch.gene_BT[0]])[:, feats]
            fired.append(np.flatnonzero((z > 0).any(0).cpu().numpy()))
    return fired


# ---------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------
def compare_stats(a: SweepStats, b: SweepStats) -> dict:
    diffs = {
        name: float(np.abs(getattr(a, name).astype(np.float64) - getattr(b, name)).max(initial=0.0))
        for name in STAT_NAMES
    }
    same_edges = {}
    for mode in MODES:
        ea, eb = edge_table(a, "bench", mode), edge_table(b, "bench", mode)
        key = ["source_feature", "target_layer", "target_feature"]
        same_edges[mode] = (len(ea), ea[key].values.tolist() == eb[key].values.tolist())
    return {"max_abs_diff": diffs, "edges": same_edges}


def edge_agreement(a: SweepStats, b: SweepStats) -> dict:
    """Agreement of two sweeps (a fp32, b in half precision): edges per mode (Jaccard), d over all tests and over the
    tests with |d_a| ≥ 0.2 (Pearson r, sign agreement), max |Δd|."""
    key = ["source_feature", "target_layer", "target_feature"]
    out = {}
    for mode in MODES:
        sa = {tuple(r) for r in edge_table(a, "x", mode)[key].values.tolist()}
        sb = {tuple(r) for r in edge_table(b, "x", mode)[key].values.tolist()}
        union = sa | sb
        out[mode] = {
            "edges_fp32": len(sa),
            "edges_half": len(sb),
            "common": len(sa & sb),
            "jaccard": len(sa & sb) / len(union) if union else None,
        }
    ta, tb = edge_statistics(a, "x"), edge_statistics(b, "x")
    m = ta.merge(tb, on=key, suffixes=("_a", "_b")).dropna(subset=["cohens_d_a", "cohens_d_b"])
    strong = m[m["cohens_d_a"].abs() >= 0.2]
    out["tests"] = len(m)
    out["d_pearson"] = float(np.corrcoef(m["cohens_d_a"], m["cohens_d_b"])[0, 1]) if len(m) > 1 else None
    out["d_max_abs_diff"] = float((m["cohens_d_a"] - m["cohens_d_b"]).abs().max()) if len(m) else None
    out["strong_tests"] = len(strong)
    out["strong_d_pearson"] = (
        float(np.corrcoef(strong["cohens_d_a"], strong["cohens_d_b"])[0, 1]) if len(strong) > 1 else None
    )
    out["strong_sign_agreement"] = (
        float((np.sign(strong["cohens_d_a"]) == np.sign(strong["cohens_d_b"])).mean()) if len(strong) else None
    )
    return out


def low_precision_result(fp32: SweepStats, low: SweepStats) -> dict:
    """Speed of a lower-precision sweep and its agreement with the fp32 sweep of the same cells."""
    passes_per_s = low.forward_passes / low.wall_time_s
    return {
        "sweep_s": low.wall_time_s,
        "passes_per_s": passes_per_s,
        "speedup_vs_reference_1.46s_per_pass": passes_per_s * REFERENCE_S_PER_PASS,
        "n_equal": bool(np.array_equal(low.n_S, fp32.n_S)),
        "agreement_with_fp32": edge_agreement(fp32, low),
    }


def describe_low_precision(label: str, r: dict) -> str:
    ag = r["agreement_with_fp32"]
    edges = "; ".join(
        f"{mode} edges {ag[mode]['edges_fp32']} (fp32) vs {ag[mode]['edges_half']}, common {ag[mode]['common']}"
        for mode in MODES
    )
    return (
        f"{label}: {r['passes_per_s']:.1f} passes/s ({r['speedup_vs_reference_1.46s_per_pass']:.0f}x the reference's "
        f"1.46 s/pass); firing counts equal {r['n_equal']}; {edges}; d over {ag['tests']} tests: Pearson r "
        f"{ag['d_pearson']:.4f}, max |Δd| {ag['d_max_abs_diff']:.3f}; over {ag['strong_tests']} tests with "
        f"|d_fp32| ≥ 0.2: r {ag['strong_d_pearson']:.4f}, same sign {ag['strong_sign_agreement']:.4f}"
    )


def run_small(args) -> dict:
    import model_fixtures as fx

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        backend = make_geneformer(
            Path(tmp),
            n_layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            ffn=4 * args.hidden,
            max_pos=512,
            n_genes=args.vocab_genes,
            device=args.device,
            seed=0,
        )
    cells = fx.random_cells(backend, args.cells, args.min_len, args.max_len, seed=1)
    source_layers = (
        [args.source_layer] if args.source_layers is None else [int(x) for x in args.source_layers.split(",")]
    )
    saes = fitted_saes(
        backend,
        cells,
        list(range(min(source_layers), backend.n_layers)),
        n_features=args.sae_features,
        k=args.sae_k,
        seed=2,
    )
    feats = list(range(0, args.sae_features, max(1, args.sae_features // args.features)))[: args.features]
    cfg = SweepConfig(
        features_per_batch=args.features_per_batch or len(feats),
        ablations_per_batch=args.ablations_per_batch,
        cells_per_clean_pass=args.cells_per_clean_pass,
        seed=0,
    )
    median_T = int(np.median([len(c.input_ids) for c in cells]))
    peak = matmul_flops_per_s(
        (args.ablations_per_batch + 1) * median_T, backend.d_model, 4 * backend.d_model, device, bf16=False
    )
    per_layer, agree = [], True
    for L in source_layers:
        targets = list(range(L + 1, backend.n_layers))
        run_sweep(backend, saes, cells[:2], L, feats[:2], targets, cfg)  # warm-up
        # Each side timed --repeats times, the two interleaved (so that a slow phase of a shared machine
        # hits both), the medians kept: single runs of a few tenths of a second swing by ±30%.
        sweeps, refs = [], []
        for _ in range(args.repeats):
            sweeps.append(run_sweep(backend, saes, cells, L, feats, targets, cfg))
            refs.append(reference_sweep(backend, saes, cells, L, feats, targets))
        stats = sweeps[0]
        repeats_identical = all(
            np.array_equal(getattr(s, name), getattr(stats, name)) for s in sweeps[1:] for name in STAT_NAMES
        )
        timed = TimedBackend(backend, L)  # one more run, timing the downstream blocks (synchronised)
        timed_stats = run_sweep(timed, saes, cells, L, feats, targets, cfg)
        ref_raw, ref_info = refs[0]
        sweep_s = float(np.median([s.wall_time_s for s in sweeps]))
        ref_s = float(np.median([info["wall_time_s"] for _, info in refs]))
        ref = to_stats(ref_raw, stats, ref_s)
        cmp = compare_stats(stats, ref)
        flops, block_tokens = sweep_downstream_flops(
            cells,
            ref_info["fired_per_cell"],
            len(feats),
            targets[-1] - L,
            cfg,
            backend.d_model,
            4 * backend.d_model,
        )
        ok = all(v <= 1e-5 for v in cmp["max_abs_diff"].values()) and all(s for _, s in cmp["edges"].values())
        ok &= repeats_identical
        ok &= block_tokens == stats.downstream_block_tokens  # the FLOP count describes the passes that ran
        agree &= ok
        per_layer.append(
            {
                "source_layer": L,
                "targets": targets,
                "fired_pairs": int(stats.n_S.sum()),
                "sweep_s": sweep_s,
                "reference_s": ref_s,
                "speedup": ref_s / sweep_s,
                "sweep_s_runs": [s.wall_time_s for s in sweeps],
                "reference_s_runs": [info["wall_time_s"] for _, info in refs],
                "sweep_repeats_identical": repeats_identical,
                "reference_passes": ref_info["passes"],
                "sweep_ablated_passes": stats.forward_passes,
                "max_abs_diff": cmp["max_abs_diff"],
                "edges_corrected_reference_mode": [cmp["edges"]["corrected"][0], cmp["edges"]["reference"][0]],
                "agree": ok,
                "downstream_gflop": flops / 1e9,
                "gflops_per_s_overall": flops / sweep_s / 1e9,
                "gflops_per_s_in_blocks": flops / timed.block_s / 1e9,
                "blocks_share_of_sweep_time": timed.block_s / timed_stats.wall_time_s,
                "fraction_of_matmul_overall": flops / sweep_s / peak,
                "fraction_of_matmul_in_blocks": flops / timed.block_s / peak,
            }
        )
    sweep_s = sum(r["sweep_s"] for r in per_layer)
    ref_s = sum(r["reference_s"] for r in per_layer)
    return {
        "model": f"Geneformer-shaped {backend.n_layers}L d{backend.d_model} heads{args.heads} "
        f"ffn{4 * backend.d_model} vocab{backend.vocab_size}",
        "sae": f"F={args.sae_features} k={args.sae_k}",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cells": len(cells),
        "median_tokens": median_T,
        "source_features": len(feats),
        "features_per_batch": cfg.features_per_batch,
        "ablations_per_batch": cfg.ablations_per_batch,
        "matmul_gflops_per_s": peak / 1e9,
        "per_source_layer": per_layer,
        "sweep_s": sweep_s,
        "reference_s": ref_s,
        "speedup": ref_s / sweep_s,
        "agree": bool(agree),
    }


def log(line: str) -> None:
    """A result line on stderr at once, so that a later failure or timeout cannot swallow it."""
    print(line, file=sys.stderr, flush=True)


def run_real_size(args) -> dict:
    import model_fixtures as fx

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the reference's precision)
    t0 = time.perf_counter()
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.half)
    with tempfile.TemporaryDirectory() as tmp:
        made = make_geneformer(
            Path(tmp),
            n_layers=18,
            hidden=1152,
            heads=18,
            ffn=4608,
            max_pos=4096,
            n_genes=20271,
            device=args.device,
            seed=0,
            half=half,
        )
    backend, half_backend = made if half is not None else (made, None)
    setup_s = time.perf_counter() - t0
    cells = fx.random_cells(backend, args.cells, args.min_len, args.max_len, seed=1)
    L = args.source_layer
    targets = list(range(L + 1, backend.n_layers))
    saes = fitted_saes(backend, cells, [L, *targets], n_features=4 * 1152, k=32, seed=2)
    feats = list(range(0, 4 * 1152, (4 * 1152) // args.features))[: args.features]
    plant_readers(saes, L, feats, targets)
    fired = fired_sets(backend, saes, cells, L, feats)
    cfg = SweepConfig(
        features_per_batch=args.features_per_batch,
        ablations_per_batch=args.ablations_per_batch,
        cells_per_clean_pass=args.cells_per_clean_pass,
        seed=0,
    )
    run_sweep(backend, saes, cells[:1], L, feats[:2], targets, cfg)  # warm-up (kernels, allocator)
    timed = TimedBackend(backend, L)
    stats = run_sweep(timed, saes, cells, L, feats, targets, cfg)
    flops, _ = sweep_downstream_flops(cells, fired, len(feats), targets[-1] - L, cfg, 1152, 4608)
    median_T = int(np.median([len(c.input_ids) for c in cells]))
    peak = matmul_flops_per_s((args.ablations_per_batch + 1) * median_T, 1152, 4608, device, bf16=False)
    passes_per_s = stats.forward_passes / stats.wall_time_s
    tables = {mode: edge_table(stats, "x", mode) for mode in MODES}
    edges = {mode: len(table) for mode, table in tables.items()}
    log(
        f"real size, {device}: fp32 {stats.forward_passes} passes in {stats.wall_time_s:.1f} s = {passes_per_s:.1f} "
        f"passes/s, {passes_per_s * REFERENCE_S_PER_PASS:.0f}x the reference's 1.46 s/pass; downstream blocks at "
        f"{flops / timed.block_s / peak:.0%} of fp32 matmul FLOP/s ({peak / 1e12:.1f} TFLOP/s); edges corrected "
        f"{edges['corrected']}, reference mode {edges['reference']}"
    )
    reference = None
    if args.reference_cells:
        # The reference loop on the first cells only (its full run would take ~1.5 s per pass), and the
        # sweep on the same cells, for the statistics' agreement and a same-machine s/pass baseline.
        few = cells[: args.reference_cells]
        ref_raw, ref_info = reference_sweep(backend, saes, few, L, feats, targets)
        few_stats = run_sweep(backend, saes, few, L, feats, targets, cfg)
        ref_s_per_pass = ref_info["wall_time_s"] / ref_info["passes"]
        scale = max(float(np.abs(ref_raw["sum_SLG"]).max(initial=0.0)), 1e-30)
        reference = {
            "cells": len(few),
            "passes": ref_info["passes"],
            "wall_s": ref_info["wall_time_s"],
            "s_per_pass": ref_s_per_pass,
            "sweep_speedup_vs_this_reference": passes_per_s * ref_s_per_pass,
            "n_equal": bool(np.array_equal(few_stats.n_S, ref_raw["n_S"])),
            "max_abs_diff": {
                name: float(np.abs(getattr(few_stats, name).astype(np.float64) - ref_raw[name]).max(initial=0.0))
                for name in STAT_NAMES[1:]
            },
            "max_abs_sum": scale,
            # TopK is discontinuous: a float near-tie at the k-th code flips a code between 0 and ~the
            # k-th value, so a few entries differ by far more than rounding while the rest agree.
            "entries": int(ref_raw["sum_SLG"].size),
            "entries_sum_diff_over_1e-4": int((np.abs(few_stats.sum_SLG - ref_raw["sum_SLG"]) > 1e-4).sum()),
        }
        log(
            f"reference loop here on {len(few)} cells: {ref_s_per_pass:.3f} s/pass; sweep speedup "
            f"{reference['sweep_speedup_vs_this_reference']:.0f}x; n equal={reference['n_equal']}, max |diff| of "
            f"sums {reference['max_abs_diff']['sum_SLG']:.2e} (max |sum| {scale:.2e}); entries with |diff| > 1e-4: "
            f"{reference['entries_sum_diff_over_1e-4']} of {reference['entries']}"
        )
    result = {
        "model": "Geneformer V2-316M-shaped (random init) 18L d1152 h18 ffn4608",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "setup_s": setup_s,
        "cells": len(cells),
        "median_tokens": median_T,
        "source_layer": L,
        "source_features": len(feats),
        "features_per_batch": cfg.features_per_batch,
        "ablations_per_batch": cfg.ablations_per_batch,
        "fired_pairs": int(stats.n_S.sum()),
        "fp32": {
            "sweep_s": stats.wall_time_s,
            "passes": stats.forward_passes,
            "passes_per_s": passes_per_s,
            "speedup_vs_reference_1.46s_per_pass": passes_per_s * REFERENCE_S_PER_PASS,
            "downstream_tflop": flops / 1e12,
            "tflops_per_s_overall": flops / stats.wall_time_s / 1e12,
            "tflops_per_s_in_blocks": flops / timed.block_s / 1e12,
            "matmul_tflops_per_s": peak / 1e12,
            "fraction_of_matmul_overall": flops / stats.wall_time_s / peak,
            "fraction_of_matmul_in_blocks": flops / timed.block_s / peak,
            "edges": edges,
            "summary": summarize_edges(tables["corrected"], stats),
        },
        "reference_loop_on_first_cells": reference,
    }
    if args.bf16 and device.type != "cuda":
        result["bf16"] = "skipped: bf16 autocast is for the GPU only (on CPUs bf16 matmuls are far slower than fp32)"
    elif args.bf16:
        cfg16 = dataclasses.replace(cfg, autocast_bf16=True)
        run_sweep(backend, saes, cells[:1], L, feats[:2], targets, cfg16)
        timed16 = TimedBackend(backend, L)
        s16 = run_sweep(timed16, saes, cells, L, feats, targets, cfg16)
        peak16 = matmul_flops_per_s((args.ablations_per_batch + 1) * median_T, 1152, 4608, device, bf16=True)
        result["bf16"] = {
            **low_precision_result(stats, s16),
            "tflops_per_s_overall": flops / s16.wall_time_s / 1e12,
            "matmul_tflops_per_s": peak16 / 1e12,
            "fraction_of_matmul_overall": flops / s16.wall_time_s / peak16,
            "fraction_of_matmul_in_blocks": flops / timed16.block_s / peak16,
        }
        log(describe_low_precision("bf16 autocast", result["bf16"]))
    if half_backend is not None:
        run_sweep(half_backend, saes, cells[:1], L, feats[:2], targets, cfg)
        result[args.half] = low_precision_result(stats, run_sweep(half_backend, saes, cells, L, feats, targets, cfg))
        log(describe_low_precision(f"model weights in {args.half}", result[args.half]))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--real-size", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="with --real-size: also a bf16-autocast sweep")
    ap.add_argument(
        "--half",
        choices=["bfloat16", "float16"],
        default=None,
        help="with --real-size: also a sweep of the model loaded in this dtype (the config's model dtype)",
    )
    ap.add_argument("--cells", type=int, default=None)
    ap.add_argument("--features", type=int, default=None)
    ap.add_argument("--source-layer", type=int, default=0)
    ap.add_argument("--source-layers", default=None, help="small model: comma-separated list (e.g. 0,1,2)")
    ap.add_argument(
        "--features-per-batch",
        type=int,
        default=None,
        help="SweepConfig.features_per_batch (default: all source features in one group; --real-size: 16)",
    )
    ap.add_argument("--ablations-per-batch", type=int, default=None, help="SweepConfig.ablations_per_batch")
    ap.add_argument(
        "--cells-per-clean-pass",
        type=int,
        default=SweepConfig.cells_per_clean_pass,
        help="SweepConfig.cells_per_clean_pass",
    )
    ap.add_argument("--min-len", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--layers", type=int, default=4, help="small model: blocks")
    ap.add_argument("--hidden", type=int, default=64, help="small model: d_model")
    ap.add_argument("--heads", type=int, default=4, help="small model: heads")
    ap.add_argument(
        "--vocab-genes",
        type=int,
        default=1000,
        help="small model: genes in the vocabulary; 1000 makes the MLM head that the reference computes "
        "cost about one block, as in the real model (2·1152·20275 vs ~41 MFLOP per token)",
    )
    ap.add_argument("--sae-features", type=int, default=256)
    ap.add_argument("--sae-k", type=int, default=16)
    ap.add_argument(
        "--reference-cells",
        type=int,
        default=2,
        help="--real-size: also run the reference loop on this many cells (0: skip) for a same-machine baseline",
    )
    ap.add_argument(
        "--repeats", type=int, default=5, help="small model: time each side this many times and keep the median"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = (
        {
            "cells": 200,
            "features": 30,
            "features_per_batch": 16,
            "ablations_per_batch": 16,
            "min_len": 1900,
            "max_len": 2100,
        }
        if args.real_size
        else {"cells": 24, "features": 16, "ablations_per_batch": 64, "min_len": 40, "max_len": 120}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    result = run_real_size(args) if args.real_size else run_small(args)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.real_size:
        return 0
    for r in result["per_source_layer"]:
        print(
            f"source layer {r['source_layer']}: sweep {r['sweep_s']:.2f} s, reference {r['reference_s']:.2f} s, "
            f"speedup {r['speedup']:.1f}x, agree={r['agree']}, downstream blocks at "
            f"{r['fraction_of_matmul_in_blocks']:.0%} of matmul FLOP/s "
            f"({r['fraction_of_matmul_overall']:.0%} over the whole sweep)"
        )
    print(
        f"total: sweep {result['sweep_s']:.2f} s, reference {result['reference_s']:.2f} s, "
        f"speedup {result['speedup']:.1f}x, agree={result['agree']}"
    )
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
