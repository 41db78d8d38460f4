"""ctrace.vocab: the Geneformer dictionary folder and scGPT vocab.json, read back and refused clearly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from ctrace.errors import CtraceInputError
from ctrace.vocab import GENEFORMER_FILES, GeneformerDictionaries, load_geneformer_dictionaries, write_geneformer_dictionaries


def _write(tmp_path):
    dicts = GeneformerDictionaries(
        "V2",
        {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "ENSG01": 4},
        {"ENSG01": 1.5},
        {"GENEA": "ENSG01"},
        {"GENEA": "ENSG01", "ENSG01": "ENSG01"},
    )
    write_geneformer_dictionaries(tmp_path, dicts)
    return dicts


def test_written_dictionaries_read_back_with_numpy_scalars(tmp_path):
    dicts = _write(tmp_path)
    path = tmp_path / GENEFORMER_FILES["V2"]["gene_medians"]
    path.write_bytes(pickle.dumps({"ENSG01": np.float32(1.5)}))  # the official files hold numpy scalars
    loaded = load_geneformer_dictionaries(tmp_path, "V2")
    assert loaded.token_dict == dicts.token_dict and loaded.gene_medians == {"ENSG01": 1.5}


@pytest.mark.parametrize(
    "field, content, message",
    [
        ("token_dict", b"garbage\n", r"not a readable pickle"),
        ("token_dict", b"", r"not a readable pickle \(EOFError"),
        ("token_dict", pickle.dumps({"<pad>": 0, "ENSG01": "x"}), r"entry 'ENSG01' -> 'x' .*gene id -> integer token id"),
        ("token_dict", pickle.dumps({"<pad>": 0, "ENSG01": 4.5}), r"entry 'ENSG01' -> 4.5"),
        ("gene_medians", pickle.dumps({"ENSG01": "high"}), r"gene_median_dictionary_gc104M.pkl: entry 'ENSG01'"),
        ("gene_name_id", pickle.dumps({"GENEA": 7}), r"gene_name_id_dict_gc104M.pkl: entry 'GENEA' -> 7"),
        ("token_dict", pickle.dumps({"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "ENSG01": -4}),
         r"token_dictionary_gc104M.pkl: token ids are not a permutation of 0..4"),
        ("token_dict", pickle.dumps({"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "ENSG01": 3}),
         r"token ids are not a permutation of 0..4"),
        ("gene_medians", pickle.dumps({"ENSG01": 0.0}),
         r"gene_median_dictionary_gc104M.pkl: 1 gene median\(s\) are not finite positive numbers \(e.g. ENSG01: 0.0\)"),
        ("gene_medians", pickle.dumps({"ENSG01": float("nan")}), r"not finite positive numbers \(e.g. ENSG01: nan\)"),
    ],
)
def test_a_dictionary_file_that_is_not_one_is_named(tmp_path, field, content, message):
    _write(tmp_path)
    (tmp_path / GENEFORMER_FILES["V2"][field]).write_bytes(content)
    with pytest.raises(CtraceInputError, match=message):
        load_geneformer_dictionaries(tmp_path, "V2")


def test_a_vocab_json_that_is_not_utf8_is_named(tmp_path):
    from ctrace.vocab import load_scgpt_vocab

    (tmp_path / "vocab.json").write_bytes(b'{"GENE\xff": 0}')
    with pytest.raises(CtraceInputError, match="vocab.json: not valid UTF-8 JSON .*expected scGPT's vocab.json"):
        load_scgpt_vocab(tmp_path)
