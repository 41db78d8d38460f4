"""ctrace.config: schema validation with defaults, cross-references, file checks."""

import re
from pathlib import Path

import pytest
import yaml

from ctrace.config import load_config, validate_config
from ctrace.errors import CtraceInputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw_config():
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def test_default_config_is_valid_and_defaults_are_filled(raw_config):
    config = validate_config(raw_config)
    block = config["conditions"]["b_cell"]
    assert block["counts"] == "X" and block["gene_column"] == "index" and block["sae_cells"] is None
    assert block["sae_includes_traced"] is False  # traced cells are not SAE training cells by default
    assert config["models"]["scgpt"]["max_seq_len"] == 1200
    assert config["activations"]["layers"] == "all"


def test_unknown_key_is_named_with_the_allowed_ones(raw_config):
    raw_config["conditions"]["b_cell"]["trace_celz"] = 3
    with pytest.raises(CtraceInputError, match=r"conditions\.b_cell: unknown key\(s\) \['trace_celz'\].*trace_cells"):
        validate_config(raw_config)


def test_unknown_top_level_key(raw_config):
    raw_config["sweeep"] = {}
    with pytest.raises(CtraceInputError, match=r"\(top level\): unknown key\(s\) \['sweeep'\]"):
        validate_config(raw_config)


def test_wrong_type_and_enum(raw_config):
    raw_config["conditions"]["nk_cell"]["trace_cells"] = "many"
    raw_config["models"]["scgpt"]["kind"] = "bert"
    with pytest.raises(CtraceInputError) as err:
        validate_config(raw_config)
    assert "conditions.nk_cell.trace_cells: 'many' is not of type 'integer'" in str(err.value)
    assert "models.scgpt.kind: 'bert' is not one of" in str(err.value)


def test_missing_required_and_dangling_reference(raw_config):
    del raw_config["conditions"]["t_reg"]["h5ad"]
    with pytest.raises(CtraceInputError, match=r"conditions\.t_reg: 'h5ad' is a required property"):
        validate_config(raw_config)
    raw_config["conditions"]["t_reg"]["h5ad"] = "demo"
    raw_config["conditions"]["t_reg"]["sae_set"] = "blood"
    with pytest.raises(CtraceInputError, match=r"conditions\.t_reg\.sae_set: 'blood' is not defined"):
        validate_config(raw_config)


def test_missing_files_are_reported(raw_config, tmp_path):
    raw_config["conditions"]["t_reg"]["h5ad"] = str(tmp_path / "nope.h5ad")
    raw_config["models"]["geneformer"]["checkpoint"] = str(tmp_path / "gf")
    raw_config["models"]["geneformer"]["dictionaries"] = str(tmp_path / "dicts")
    with pytest.raises(CtraceInputError) as err:
        validate_config(raw_config)
    text = str(err.value)
    assert "conditions.t_reg.h5ad: file" in text and "nope.h5ad" in text
    assert "models.geneformer.checkpoint: folder" in text


def test_gene_set_libraries_of_one_name_are_an_error(raw_config, tmp_path):
    from ctrace.genesets import load_libraries

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "hallmark.gmt").write_text(f"SET_{folder}\tna\tGENE1\tGENE2\n")
    a, b = str(tmp_path / "a" / "hallmark.gmt"), str(tmp_path / "b" / "hallmark.gmt")
    for entries in (["hallmark", a], [a, b]):
        raw_config["annotation"]["gene_sets"] = entries
        message = f"annotation.gene_sets: {entries[0]!r} and {entries[1]!r} are both library 'hallmark'"
        with pytest.raises(CtraceInputError, match=re.escape(message)):
            validate_config(raw_config)
        with pytest.raises(CtraceInputError, match=re.escape(message)):
            load_libraries(entries)
    assert set(load_libraries([a, "reactome"])) == {"hallmark", "reactome"}


def test_shards_must_hold_whole_batch_groups(raw_config):
    raw_config["sweep"] = {**raw_config["sweep"], "features_per_shard": 12, "features_per_batch": 8}
    with pytest.raises(CtraceInputError, match=r"sweep.features_per_shard \(12\) must be a multiple of "
                       r"sweep.features_per_batch \(8\)"):
        validate_config(raw_config)


def test_missing_biology_inputs_are_reported(raw_config, tmp_path):
    raw_config["biology"] = {"tf_targets": str(tmp_path / "trrust.tsv"), "perturbation": [str(tmp_path / "k.h5ad")]}
    with pytest.raises(CtraceInputError) as err:
        validate_config(raw_config)
    text = str(err.value)
    assert "biology.tf_targets: file" in text and "biology.perturbation[0]: file" in text
    assert "remove the entry to skip this test" in text


def test_load_config_reports_bad_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: [unclosed\n")
    with pytest.raises(CtraceInputError, match="not valid YAML"):
        load_config(path)


def test_real_checkpoints_of_both_kinds_validate_and_are_read(raw_config, tmp_path):
    import model_fixtures as fx

    gf_dir, dict_dir = fx.write_tiny_geneformer(tmp_path, fx.write_synthetic_geneformer_dictionaries(tmp_path / "d"))
    raw_config["models"]["geneformer"].update(checkpoint=str(gf_dir), dictionaries=str(dict_dir))
    raw_config["models"]["scgpt"]["checkpoint"] = str(fx.write_tiny_scgpt(tmp_path, gene_vocab={"A": 0, "B": 1}))
    config = validate_config(raw_config)
    assert config["models"]["scgpt"]["max_seq_len"] == 1200 and "dictionaries" not in config["models"]["scgpt"]
    assert config["models"]["geneformer"]["version"] == "V2" and "max_seq_len" not in config["models"]["geneformer"]
    raw_config["activations"] = {"layers": [0, 3]}  # the tiny checkpoints have 3 blocks
    raw_config["sae"] = {"expansion": 1, "k": 33}  # wider than expansion × d_model 32
    with pytest.raises(CtraceInputError) as err:
        validate_config(raw_config)
    text = str(err.value)
    assert "activations.layers: [3] out of range for geneformer (3 layers)" in text
    assert "activations.layers: [3] out of range for scgpt (3 layers)" in text
    assert "sae.k: 33 exceeds geneformer's SAE width" in text


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "config.json: not found"),
        ("{not json", "config.json: not valid JSON"),
        ('{"architectures": ["BertForMaskedLM"], "model_type": "bert"}', "'vocab_size' is missing"),
    ],
)
def test_a_checkpoint_folder_without_a_readable_config_is_named(raw_config, tmp_path, content, message):
    (tmp_path / "gf").mkdir()
    (tmp_path / "dicts").mkdir()
    if content is not None:
        (tmp_path / "gf" / "config.json").write_text(content)
    raw_config["models"]["geneformer"].update(checkpoint=str(tmp_path / "gf"), dictionaries=str(tmp_path / "dicts"))
    with pytest.raises(CtraceInputError, match=rf"models\.geneformer\.checkpoint: .*{message}"):
        validate_config(raw_config)


@pytest.mark.parametrize(
    "model, key, value",
    [("scgpt", "dictionaries", "demo"), ("scgpt", "version", "V1"), ("geneformer", "max_seq_len", 2048)],
)
def test_a_key_the_other_model_kind_reads_is_an_error_not_ignored(raw_config, model, key, value):
    raw_config["models"][model][key] = value
    with pytest.raises(CtraceInputError, match=rf"models\.{model}\.{key}: only .* models read it.*remove the key"):
        validate_config(raw_config)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("sae_sets", "pbmc", {"conditions": ["b_cell", "nk_cell", "b_cell"]}, r"sae_sets\.pbmc\.conditions: .*non-unique"),
        ("activations", "layers", [1, 1, 2], r"activations\.layers: .*non-unique"),
        ("sweep", "source_layers", [0, 0], r"sweep\.source_layers: .*non-unique"),
        ("sweep", "selection", "explicit", r"sweep\.features: selection 'explicit' needs at least one feature id"),
        ("sweep", "features", [1, 2], r"sweep\.features: only read with selection 'explicit'"),
        ("demo", "n_heads", 3, r"demo\.n_heads: 3 does not divide demo\.d_model 64"),
        ("sae", "k", 10_000, r"sae\.k: 10000 exceeds the demo SAEs' width \(sae\.expansion × demo\.d_model = 256\)"),
        ("annotation", "gene_sets", ["hallmrk"], r"annotation\.gene_sets: 'hallmrk' is neither a bundled library"),
    ],
)
def test_values_that_would_fail_late_or_be_ignored_are_config_errors(raw_config, section, key, value, message):
    raw_config[section] = {**raw_config.get(section, {}), key: value}
    if section == "sae":
        raw_config["sae"]["expansion"] = 4
    with pytest.raises(CtraceInputError, match=message):
        validate_config(raw_config)


@pytest.mark.parametrize("seed", [-1, 2**31])
def test_seed_out_of_range(raw_config, seed):
    raw_config["seed"] = seed
    with pytest.raises(CtraceInputError, match=r"seed: "):
        validate_config(raw_config)
