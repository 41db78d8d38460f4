"""The `ctrace` command: help lists every step; input errors are one clear line, exit status 2."""

import subprocess
import sys

import yaml
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ctrace.cli", *args], capture_output=True, text=True, **kwargs)


def test_help_lists_the_workflow_steps():
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo-data", "demo-model", "select-cells", "tokenize", "dump-activations", "check-config"):
        assert command in out.stdout


def test_input_error_is_reported_without_traceback(tmp_path):
    config = yaml.safe_load(open(ROOT / "config/config.yaml"))
    config["conditions"]["b_cell"]["colour"] = "blue"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = run("check-config", str(path))
    assert out.returncode == 2
    assert "conditions.b_cell: unknown key(s) ['colour']" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    tokenized = tmp_path / "cells.npz"
    out = run(
        "dump-activations", "--kind", "scgpt", "--checkpoint", str(tmp_path / "nope"), "--device", "cpu",
        "--tokenized", str(tokenized), "--layer", "0", "--out-stem", str(tmp_path / "x"),
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nope" in out.stderr and "args.json" in out.stderr
