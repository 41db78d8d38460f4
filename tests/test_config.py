"""ctrace.config: schema validation with defaults, cross-references, file checks."""

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
