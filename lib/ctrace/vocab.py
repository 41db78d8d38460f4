"""Model vocabularies in their official on-disk formats (model_formats.md §1.5, §2.3).

Geneformer: four pickled dicts in a dictionary folder (V2 names `*_gc104M.pkl`, V1 `*_gc30M.pkl`).
scGPT: `vocab.json`, gene symbol → id, specials `<pad>`, `<cls>`, `<eoc>` at the end of the id range.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrace.errors import CtraceInputError
from ctrace.io import atomic_path, load_restricted_pickle

GENEFORMER_FILES = {
    "V2": {
        "token_dict": "token_dictionary_gc104M.pkl",
        "gene_medians": "gene_median_dictionary_gc104M.pkl",
        "gene_name_id": "gene_name_id_dict_gc104M.pkl",
        "ensembl_mapping": "ensembl_mapping_dict_gc104M.pkl",
    },
    "V1": {
        "token_dict": "token_dictionary_gc30M.pkl",
        "gene_medians": "gene_median_dictionary_gc30M.pkl",
        "gene_name_id": "gene_name_id_dict_gc30M.pkl",
        "ensembl_mapping": "ensembl_mapping_dict_gc30M.pkl",
    },
}
GENEFORMER_SPECIALS = {"V2": ("<pad>", "<mask>", "<cls>", "<eos>"), "V1": ("<pad>", "<mask>")}
SCGPT_SPECIALS = ("<pad>", "<cls>", "<eoc>")


@dataclass(frozen=True)
class GeneformerDictionaries:
    """The four Geneformer dictionaries. Token ids are Python ints; medians Python floats."""

    version: str
    token_dict: dict[str, int]
    gene_medians: dict[str, float]
    gene_name_id: dict[str, str]
    ensembl_mapping: dict[str, str]

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self.token_dict[s] for s in GENEFORMER_SPECIALS[self.version])


def load_geneformer_dictionaries(directory: str | os.PathLike, version: str = "V2") -> GeneformerDictionaries:
    """Load the official dictionary folder (e.g. Geneformer's `geneformer/` package folder)."""
    if version not in GENEFORMER_FILES:
        raise CtraceInputError(f"Geneformer version must be 'V1' or 'V2', got {version!r}")
    directory = Path(directory)
    if version == "V1" and not (directory / GENEFORMER_FILES["V1"]["token_dict"]).exists():
        if (directory / "gene_dictionaries_30m").is_dir():
            directory = directory / "gene_dictionaries_30m"
    loaded = {}
    for field, name in GENEFORMER_FILES[version].items():
        path = directory / name
        if not path.is_file():
            raise CtraceInputError(
                f"{path}: missing Geneformer {version} dictionary file; the dictionary folder must hold "
                f"{', '.join(GENEFORMER_FILES[version].values())}"
            )
        obj = load_restricted_pickle(path)
        if not isinstance(obj, dict):
            raise CtraceInputError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
        loaded[field] = obj
    files = {field: directory / name for field, name in GENEFORMER_FILES[version].items()}
    token_dict = _typed(loaded["token_dict"], files["token_dict"], int, "gene id -> integer token id")
    for special in GENEFORMER_SPECIALS[version]:
        if special not in token_dict:
            raise CtraceInputError(
                f"{directory / GENEFORMER_FILES[version]['token_dict']}: special token {special!r} is missing; "
                f"is this a {version} dictionary?"
            )
    if sorted(token_dict.values()) != list(range(len(token_dict))):
        raise CtraceInputError(
            f"{files['token_dict']}: token ids are not a permutation of 0..{len(token_dict) - 1} (the rows of the "
            "model's embedding); use the dictionary the checkpoint was trained with"
        )
    gene_medians = _typed(loaded["gene_medians"], files["gene_medians"], float, "gene id -> median count")
    bad = [gene for gene, median in gene_medians.items() if not (math.isfinite(median) and median > 0)]
    if bad:
        raise CtraceInputError(
            f"{files['gene_medians']}: {len(bad)} gene median(s) are not finite positive numbers (e.g. {bad[0]}: "
            f"{gene_medians[bad[0]]!r}); cells are ranked by count / median, so every median must be > 0"
        )
    return GeneformerDictionaries(
        version=version,
        token_dict=token_dict,
        gene_medians=gene_medians,
        gene_name_id=_typed(loaded["gene_name_id"], files["gene_name_id"], str, "gene symbol -> gene id"),
        ensembl_mapping=_typed(loaded["ensembl_mapping"], files["ensembl_mapping"], str, "id or symbol -> gene id"),
    )


def _typed(obj: dict, path: Path, value_type: type, what: str) -> dict:
    """{str(key): value_type(value)}; a clear error naming the file where a value does not convert."""
    out = {}
    for key, value in obj.items():
        if value_type is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            ok = ok and (value_type is float or float(value).is_integer())
        if not ok:
            raise CtraceInputError(
                f"{path}: entry {key!r} -> {value!r} is not a Geneformer dictionary entry ({what}); "
                "use the official Geneformer dictionary files"
            )
        out[str(key)] = value_type(value)
    return out


def write_geneformer_dictionaries(directory: str | os.PathLike, dicts: GeneformerDictionaries) -> None:
    """Write the four pickles under their official names and types (medians as numpy float64)."""
    directory = Path(directory)
    objects = {
        "token_dict": dict(dicts.token_dict),
        "gene_medians": {k: np.float64(v) for k, v in dicts.gene_medians.items()},
        "gene_name_id": dict(dicts.gene_name_id),
        "ensembl_mapping": dict(dicts.ensembl_mapping),
    }
    for field, name in GENEFORMER_FILES[dicts.version].items():
        with atomic_path(directory / name) as tmp:
            with open(tmp, "wb") as handle:
                pickle.dump(objects[field], handle, protocol=4)


def load_scgpt_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Load scGPT's `vocab.json` (a file, or the checkpoint folder holding it).

    As upstream, `<pad>`, `<cls>`, `<eoc>` are appended when missing. Ids are read, never inferred
    from key order.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "vocab.json"
    if not path.is_file():
        raise CtraceInputError(f"{path}: scGPT vocab.json not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CtraceInputError(f"{path}: not valid UTF-8 JSON ({err}); expected scGPT's vocab.json") from None
    if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
        raise CtraceInputError(f"{path}: expected a JSON object of gene symbol -> integer id")
    vocab = dict(raw)
    for special in SCGPT_SPECIALS:
        if special not in vocab:
            vocab[special] = len(vocab)
    ids = sorted(vocab.values())
    if ids != list(range(len(vocab))):
        raise CtraceInputError(f"{path}: ids are not a permutation of 0..{len(vocab) - 1}")
    return vocab


def write_scgpt_vocab(path: str | os.PathLike, vocab: dict[str, int], seed: int = 0) -> None:
    """Write `vocab.json` as upstream does: 2-space indent, key order not sorted by id."""
    keys = list(vocab)
    np.random.default_rng(seed).shuffle(keys)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({k: int(vocab[k]) for k in keys}, indent=2))


def geneformer_token_symbols(dicts: GeneformerDictionaries) -> dict[int, str]:
    """Token id → gene symbol (the Ensembl id where the name dictionary has no symbol for it)."""
    symbol_of = {}
    for symbol, ensembl in sorted(dicts.gene_name_id.items()):
        symbol_of.setdefault(ensembl, symbol)
    specials = set(GENEFORMER_SPECIALS[dicts.version])
    return {tid: symbol_of.get(gid, gid) for gid, tid in dicts.token_dict.items() if gid not in specials}


def scgpt_token_symbols(vocab: dict[str, int]) -> dict[int, str]:
    """Token id → gene symbol (scGPT's vocabulary is keyed by symbols)."""
    return {tid: gene for gene, tid in vocab.items() if gene not in SCGPT_SPECIALS}
