"""Tiny demo models built from the demo cells the way the originals were built, saved in the official formats.

Geneformer: gene medians and token dictionary from the corpus (non-zero median of count/n_counts·1e4),
rank-value tokens, masked-token pre-training (15% of gene positions; 80/10/10 mask/random/keep).
scGPT: vocabulary from the corpus genes (+ `<pad>`, `<cls>`, `<eoc>`), binned values, masked-value
pre-training (40% of gene values replaced by mask_value −1, MSE of the expression decoder).
Both report held-out metrics of the trained model next to the same model untrained, so a user can see
that the demo models learned something.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ctrace.data import demo_gene_ids, load_condition
from ctrace.models.base import Backend, Cell
from ctrace.tokenize import TokenizedCells, tokenize_geneformer, tokenize_scgpt
from ctrace.vocab import GeneformerDictionaries, write_geneformer_dictionaries

MASK_VALUE = -1.0  # scGPT's mask_value in whole-human args.json


@dataclass(frozen=True)
class DemoModelConfig:
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    pretrain_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    heldout_fraction: float = 0.1
    train_max_tokens: int = 128  # pre-training crops cells: attention cost grows with length²
    seed: int = 0


def build_demo_model(kind: str, h5ad: str | Path, out_dir: Path, cfg: DemoModelConfig) -> dict:
    """Build, pre-train and save a demo model under `out_dir` (checkpoint/ and, for Geneformer,
    dictionaries/); return the pre-training report."""
    torch.manual_seed(cfg.seed)
    data = load_condition(h5ad, where="demo")
    if kind == "geneformer":
        return _build_geneformer(data, out_dir, cfg)
    if kind == "scgpt":
        return _build_scgpt(data, out_dir, cfg)
    raise ValueError(f"unknown model kind {kind!r}")


# ---- Geneformer -------------------------------------------------------------------------------
def corpus_geneformer_dictionaries(counts_CG, symbols, n_counts_C) -> GeneformerDictionaries:
    """V2-format dictionaries of the corpus genes with an Ensembl id (median over non-zero cells)."""
    ids = demo_gene_ids()
    normalised = counts_CG.multiply(1e4 / n_counts_C[:, None]).tocsc()
    medians = {}
    for g, symbol in enumerate(symbols):
        column = normalised.getcol(g).data
        if symbol in ids and column.size:
            medians[ids[symbol]] = float(np.median(column))
    genes = sorted(medians)
    token_dict = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    token_dict.update({gene: 4 + i for i, gene in enumerate(genes)})
    name_id = {s: ids[s] for s in symbols if s in ids and ids[s] in medians}
    mapping = {s.upper(): e for s, e in name_id.items()} | {e: e for e in genes}
    return GeneformerDictionaries("V2", token_dict, medians, name_id, mapping)


def _build_geneformer(data, out_dir: Path, cfg: DemoModelConfig) -> dict:
    from ctrace.models.geneformer import GeneformerBackend, build_geneformer, save_geneformer

    dicts = corpus_geneformer_dictionaries(data.counts_CG, list(data.gene_ids), data.n_counts_C)
    cells, token_report = tokenize_geneformer(data.counts_CG, data.gene_ids, data.n_counts_C, dicts, data.obs_names)
    train, heldout = _split(len(cells), cfg)
    model = build_geneformer(
        vocab_size=len(dicts.token_dict), hidden_size=cfg.d_model, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, intermediate_size=4 * cfg.d_model, max_position_embeddings=4096, seed=cfg.seed,
    )
    write_geneformer_dictionaries(out_dir / "dictionaries", dicts)
    untrained_dir = out_dir / ".untrained"
    save_geneformer(model, untrained_dir)
    backend_untrained = GeneformerBackend(untrained_dir, dicts)
    n_vocab = len(dicts.token_dict)
    rng = np.random.default_rng(cfg.seed)
    # Dropout stays off (eval mode) while training: it costs more CPU time than it helps a demo model.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.pretrain_steps):
        picked = rng.choice(train, cfg.batch_size)
        batch = backend_untrained.collate([_crop_ranked(cells.cell(int(i)), cfg.train_max_tokens) for i in picked])
        ids, labels = _mlm_mask(batch.input_ids_BT, batch.gene_BT, rng, mask_id=1, n_vocab=n_vocab, first_gene=4)
        _set_lr(optimizer, cfg, step)
        out = model(input_ids=ids, attention_mask=batch.keep_BT.long(), labels=labels)
        losses.append(_optimizer_step(model, optimizer, out.loss))
    save_geneformer(model, out_dir / "checkpoint")
    trained = GeneformerBackend(out_dir / "checkpoint", dicts)
    metrics = {
        name: _mlm_eval(backend, cells, heldout, cfg.seed, n_vocab)
        for name, backend in (("trained", trained), ("untrained", backend_untrained))
    }
    shutil.rmtree(untrained_dir, ignore_errors=True)
    return _report("geneformer", cfg, token_report, train, heldout, losses, metrics,
                   task="masked gene prediction (15% of gene positions)")


def _mlm_mask(ids_BT, gene_BT, rng, mask_id: int, n_vocab: int, first_gene: int):
    """BERT masking of gene positions: labels at 15%, inputs 80% <mask>, 10% random gene, 10% kept."""
    draw = torch.from_numpy(rng.random(ids_BT.shape))
    chosen = gene_BT & (draw < 0.15)
    labels = torch.where(chosen, ids_BT, torch.full_like(ids_BT, -100))
    kind = torch.from_numpy(rng.random(ids_BT.shape))
    random_ids = torch.from_numpy(rng.integers(first_gene, n_vocab, ids_BT.shape))
    masked = ids_BT.clone()
    masked[chosen & (kind < 0.8)] = mask_id
    swap = chosen & (kind >= 0.8) & (kind < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


@torch.no_grad()
def _mlm_eval(backend: Backend, cells: TokenizedCells, heldout: np.ndarray, seed: int, n_vocab: int) -> dict:
    rng = np.random.default_rng([seed, 1])
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(heldout), 16):
        batch = backend.collate([cells.cell(int(i)) for i in heldout[start : start + 16]])
        ids, labels = _mlm_mask(batch.input_ids_BT, batch.gene_BT, rng, mask_id=1, n_vocab=n_vocab, first_gene=4)
        h_last = backend.hidden_states(replace(batch, input_ids_BT=ids), [backend.n_layers - 1])[backend.n_layers - 1]
        logits = backend.mlm_logits(h_last)
        at = labels != -100
        total_loss += float(torch.nn.functional.cross_entropy(logits[at], labels[at], reduction="sum"))
        correct += int((logits[at].argmax(-1) == labels[at]).sum())
        count += int(at.sum())
    return {"masked_tokens": count, "loss": total_loss / count, "accuracy": correct / count}


# ---- scGPT ------------------------------------------------------------------------------------
def _build_scgpt(data, out_dir: Path, cfg: DemoModelConfig) -> dict:
    from ctrace.models.scgpt import ScGPTBackend, build_scgpt, save_scgpt, whole_human_args

    symbols = list(dict.fromkeys(str(s) for s in data.gene_ids))
    order = np.random.default_rng(cfg.seed).permutation(len(symbols))  # corpus order, not sorted
    vocab = {symbols[i]: rank for rank, i in enumerate(order)}
    for special in ("<pad>", "<cls>", "<eoc>"):
        vocab[special] = len(vocab)
    args = whole_human_args(embsize=cfg.d_model, nheads=cfg.n_heads, nlayers=cfg.n_layers, d_hid=cfg.d_model)
    cells, token_report = tokenize_scgpt(
        data.counts_CG, data.gene_ids, vocab, data.obs_names, max_seq_len=args["max_seq_len"],
        n_bins=args["n_bins"], pad_value=args["pad_value"], seed=cfg.seed,
    )
    train, heldout = _split(len(cells), cfg)
    model = build_scgpt(args, vocab_size=len(vocab), pad_id=vocab["<pad>"], seed=cfg.seed)
    untrained_dir = out_dir / ".untrained"
    save_scgpt(model, args, vocab, untrained_dir)
    backend_untrained = ScGPTBackend(untrained_dir)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # eval mode: no dropout, as above
    losses = []
    for step in range(cfg.pretrain_steps):
        picked = rng.choice(train, cfg.batch_size)
        batch = backend_untrained.collate(
            [_crop_random(cells.cell(int(i)), cfg.train_max_tokens, rng) for i in picked]
        )
        values, target = _value_mask(batch.values_BT, batch.gene_BT, rng)
        _set_lr(optimizer, cfg, step)
        h = model(batch.input_ids_BT, values, ~batch.keep_BT)
        prediction = model.decoder(h)
        at = ~torch.isnan(target)
        loss = torch.nn.functional.mse_loss(prediction[at], target[at])
        losses.append(_optimizer_step(model, optimizer, loss))
    save_scgpt(model, args, vocab, out_dir / "checkpoint")
    trained = ScGPTBackend(out_dir / "checkpoint")
    train_mean = float(np.mean(np.concatenate([cells.cell(int(i)).values[1:] for i in train])))
    metrics = {
        name: _value_eval(backend, cells, heldout, cfg.seed, train_mean)
        for name, backend in (("trained", trained), ("untrained", backend_untrained))
    }
    shutil.rmtree(untrained_dir, ignore_errors=True)
    return _report("scgpt", cfg, token_report, train, heldout, losses, metrics,
                   task="masked value prediction (40% of gene values, MSE in bins)")


def _value_mask(values_BT, gene_BT, rng):
    """Replace 40% of gene values by mask_value; target = true value there, NaN elsewhere."""
    chosen = gene_BT & torch.from_numpy(rng.random(values_BT.shape) < 0.4)
    target = torch.where(chosen, values_BT, torch.full_like(values_BT, float("nan")))
    return torch.where(chosen, torch.full_like(values_BT, MASK_VALUE), values_BT), target


@torch.no_grad()
def _value_eval(backend, cells: TokenizedCells, heldout: np.ndarray, seed: int, train_mean: float) -> dict:
    rng = np.random.default_rng([seed, 1])
    squared, baseline, count = 0.0, 0.0, 0
    for start in range(0, len(heldout), 16):
        batch = backend.collate([cells.cell(int(i)) for i in heldout[start : start + 16]])
        values, target = _value_mask(batch.values_BT, batch.gene_BT, rng)
        masked = replace(batch, values_BT=values)
        h_last = backend.hidden_states(masked, [backend.n_layers - 1])[backend.n_layers - 1]
        prediction = backend.expr_prediction(h_last)
        at = ~torch.isnan(target)
        squared += float(((prediction[at] - target[at]) ** 2).sum())
        baseline += float(((train_mean - target[at]) ** 2).sum())
        count += int(at.sum())
    return {"masked_values": count, "mse": squared / count, "mse_predict_train_mean": baseline / count}


# ---- shared -----------------------------------------------------------------------------------
def _split(n: int, cfg: DemoModelConfig) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([cfg.seed, 2]).permutation(n)
    n_heldout = max(1, int(round(n * cfg.heldout_fraction)))
    return np.sort(order[n_heldout:]), np.sort(order[:n_heldout])


def _crop_ranked(cell: Cell, max_tokens: int) -> Cell:
    """Geneformer: keep <cls>, the top-ranked genes and <eos> (the rank order is the input)."""
    ids = cell.input_ids
    if len(ids) <= max_tokens:
        return cell
    return Cell(np.concatenate([ids[: max_tokens - 1], ids[-1:]]))


def _crop_random(cell: Cell, max_tokens: int, rng: np.random.Generator) -> Cell:
    """scGPT: keep <cls> and a random subset of genes, as upstream's length sampling does."""
    if len(cell.input_ids) <= max_tokens:
        return cell
    keep = np.concatenate([[0], 1 + rng.permutation(len(cell.input_ids) - 1)[: max_tokens - 1]])
    return Cell(cell.input_ids[keep], cell.values[keep])


def _optimizer_step(model, optimizer, loss) -> float:
    """One Adam step with gradient-norm clipping at 1; returns the loss value."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def _set_lr(optimizer, cfg: DemoModelConfig, step: int) -> None:
    """Linear warm-up over 10% of the steps, then cosine decay to 10%."""
    warm = max(1, cfg.pretrain_steps // 10)
    if step < warm:
        factor = (step + 1) / warm
    else:
        progress = (step - warm) / max(1, cfg.pretrain_steps - warm)
        factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * factor


def _report(kind, cfg, token_report, train, heldout, losses, metrics, task) -> dict:
    tail = losses[-20:] if losses else []
    return {
        "model_kind": kind,
        "task": task,
        "config": asdict(cfg),
        "tokenization": token_report.to_dict(),
        "cells": {"train": int(len(train)), "heldout": int(len(heldout))},
        "train_loss": {"first": losses[0] if losses else None, "last20_mean": float(np.mean(tail)) if tail else None},
        "heldout": metrics,
    }
