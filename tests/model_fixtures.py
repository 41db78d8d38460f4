"""Tiny checkpoints in the official on-disk formats, for tests (model_formats.md §1.11, §2.8).

With the workplace's shared data present (`SHARED_DATA`: $CTRACE_SHARED_DATA, else `../shared/data` next
to the checkout) the fixtures use the REAL vocabularies (Geneformer V2 gc104M dictionaries; scGPT census
vocab + 3 specials = 60,697 tokens); without it, small synthetic ones in the same formats. Other test
modules import these names: keep them and their signatures stable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ctrace.models import Backend, Cell, build_geneformer, build_scgpt, save_geneformer, save_scgpt, whole_human_args
from ctrace.vocab import GeneformerDictionaries, load_geneformer_dictionaries, write_geneformer_dictionaries

SHARED_DATA = Path(os.environ.get("CTRACE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL_GENEFORMER_DICTS = SHARED_DATA / "geneformer"
REAL_SCGPT_CENSUS_VOCAB = SHARED_DATA / "scgpt" / "default_census_vocab.json"


def have_real_geneformer_dicts() -> bool:
    return (REAL_GENEFORMER_DICTS / "token_dictionary_gc104M.pkl").is_file()


def have_real_scgpt_vocab() -> bool:
    return REAL_SCGPT_CENSUS_VOCAB.is_file()


# ---- Geneformer ------------------------------------------------------------------------------------
def write_synthetic_geneformer_dictionaries(directory: str | os.PathLike, n_genes: int = 300) -> Path:
    """The four V2-named pickles with official types: 4 specials at 0..3, then ENSG-like genes."""
    directory = Path(directory)
    genes = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    token_dict = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    token_dict.update({g: 4 + i for i, g in enumerate(genes)})
    rng = np.random.default_rng(0)
    symbols = [f"Gene{i}" for i in range(1, n_genes + 1)]
    mapping = {g.upper(): g for g in genes}
    mapping.update({s.upper(): g for s, g in zip(symbols, genes)})
    write_geneformer_dictionaries(
        directory,
        GeneformerDictionaries(
            version="V2",
            token_dict=token_dict,
            gene_medians={g: float(m) for g, m in zip(genes, rng.lognormal(0.3, 1.0, n_genes))},
            gene_name_id=dict(zip(symbols, genes)),
            ensembl_mapping=mapping,
        ),
    )
    return directory


def write_tiny_geneformer(
    dir: str | os.PathLike,
    dictionary_dir: str | os.PathLike | None = None,
    n_layers: int = 3,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
    max_position_embeddings: int = 256,
) -> tuple[Path, Path]:
    """Write `<dir>/geneformer_model` (config.json + model.safetensors) -> (model_dir, dict_dir).

    dictionary_dir None: the real V2 dictionaries when available, else synthetic ones written to
    `<dir>/geneformer_dicts`. vocab_size always equals the token dictionary's size.
    """
    dir = Path(dir)
    if dictionary_dir is None:
        if have_real_geneformer_dicts():
            dictionary_dir = REAL_GENEFORMER_DICTS
        else:
            dictionary_dir = write_synthetic_geneformer_dictionaries(dir / "geneformer_dicts")
    dictionary_dir = Path(dictionary_dir)
    token_dict = load_geneformer_dictionaries(dictionary_dir, "V2").token_dict
    model = build_geneformer(
        vocab_size=len(token_dict),
        hidden_size=hidden,
        n_layers=n_layers,
        n_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
    )
    model_dir = save_geneformer(model, dir / "geneformer_model")
    return model_dir, dictionary_dir


# ---- scGPT -----------------------------------------------------------------------------------------
def synthetic_scgpt_gene_vocab(n_genes: int = 400) -> dict[str, int]:
    return {f"GENE{i}": i for i in range(n_genes)}


def write_tiny_scgpt(
    dir: str | os.PathLike,
    n_layers: int = 3,
    embsize: int = 32,
    nheads: int = 4,
    seed: int = 0,
    gene_vocab: dict[str, int] | None = None,
) -> Path:
    """Write `<dir>/scgpt_model` (args.json, best_model.pt, vocab.json) -> model_dir.

    gene_vocab None: the real census vocabulary when available, else a synthetic one; `<pad>`,
    `<cls>`, `<eoc>` are appended as the last three ids (as upstream). d_hid = 2·embsize, so a mix-up
    of the two would show (whole-human happens to have d_hid == embsize).
    """
    if gene_vocab is None:
        if have_real_scgpt_vocab():
            gene_vocab = json.loads(REAL_SCGPT_CENSUS_VOCAB.read_text())
        else:
            gene_vocab = synthetic_scgpt_gene_vocab()
    vocab = dict(gene_vocab)
    for special in ("<pad>", "<cls>", "<eoc>"):
        vocab[special] = len(vocab)
    args = whole_human_args(embsize=embsize, nheads=nheads, nlayers=n_layers, d_hid=2 * embsize)
    model = build_scgpt(args, vocab_size=len(vocab), pad_id=vocab["<pad>"], seed=seed)
    return save_scgpt(model, args, vocab, Path(dir) / "scgpt_model")


# ---- inputs ----------------------------------------------------------------------------------------
def random_cells(backend: Backend, n: int, min_len: int, max_len: int, seed: int) -> list[Cell]:
    """`n` tokenized cells of random total length in [min_len, max_len], laid out as the official
    tokenizers do: Geneformer V2 `<cls>` genes `<eos>`; scGPT `<cls>` (value pad_value) + genes with
    binned values 1..50."""
    rng = np.random.default_rng(seed)
    specials = np.fromiter(backend.special_token_ids, dtype=np.int64)
    gene_ids = np.setdiff1d(np.arange(backend.vocab_size, dtype=np.int64), specials)
    cells = []
    for _ in range(n):
        total = int(rng.integers(min_len, max_len + 1))
        if backend.name == "geneformer":
            prefix = [backend.cls_token_id] if backend.cls_token_id is not None else []
            suffix = [backend.eos_token_id] if backend.eos_token_id is not None else []
        else:
            prefix, suffix = [backend.cls_token_id], []
        n_genes = total - len(prefix) - len(suffix)
        if n_genes < 1:
            raise ValueError(f"min_len {min_len} leaves no room for genes")
        genes = rng.choice(gene_ids, size=n_genes, replace=False)
        ids = np.concatenate([prefix, genes, suffix]).astype(np.int64)
        values = None
        if backend.pad_value is not None:
            values = rng.integers(1, 51, size=total).astype(np.float32)
            values[0] = backend.pad_value  # <cls> carries pad_value, as in scGPT pretraining
        cells.append(Cell(input_ids=ids, values=values))
    return cells
