"""ctrace.io: checked readers of the tables and JSON files steps hand on."""

import json

import pandas as pd
import pytest

from ctrace.errors import CtraceInputError
from ctrace.io import read_json, read_table, write_json, write_parquet, write_tsv


def test_read_table_reads_tsv_and_parquet(tmp_path):
    frame = pd.DataFrame({"feature": [3, 1], "score": [0.5, 2.0]})
    write_tsv(tmp_path / "t.tsv", frame)
    write_parquet(tmp_path / "t.parquet", frame)
    for name in ("t.tsv", "t.parquet"):
        pd.testing.assert_frame_equal(read_table(tmp_path / name, "a table", ["feature"]), frame)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.tsv", None, "missing.tsv: not found; expected a source table"),
        ("empty.tsv", "", "empty.tsv: cannot be read as a tab-separated table .*expected a source table"),
        ("csv.parquet", "feature,score\n1,2\n", "csv.parquet: cannot be read as Parquet"),
        ("commas.tsv", "feature,score\n1,2\n", r"commas.tsv: no column\(s\) \['feature'\]"),
    ],
)
def test_read_table_errors_name_the_file_and_what_it_should_be(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(CtraceInputError, match=message):
        read_table(tmp_path / name, "a source table", ["feature"])


def test_read_json_checks_object_and_keys(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"layer": 1, "firing_frequency": [0.1]}))
    assert read_json(path, "metrics", ["layer"])["layer"] == 1
    with pytest.raises(CtraceInputError, match=r"m.json: no key\(s\) \['heldout_fvu'\].*expected metrics"):
        read_json(path, "metrics", ["heldout_fvu"])
    path.write_text("[1, 2]")
    with pytest.raises(CtraceInputError, match="a JSON list, not an object"):
        read_json(path, "metrics")
    path.write_text("{")
    with pytest.raises(CtraceInputError, match="m.json: not valid JSON"):
        read_json(path, "metrics")


def test_unwritable_output_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(CtraceInputError, match="a_file/out.json: cannot write here"):
        write_json(tmp_path / "a_file" / "out.json", {})
