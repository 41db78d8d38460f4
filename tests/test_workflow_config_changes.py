"""What a config change re-runs, and fast failures, checked without Slurm and without running models.

* Adding a condition that uses an existing SAE set schedules only that condition's jobs plus the
  aggregates that collect every condition: no demo model, no activation dump, no SAE fit, and no
  job that had finished re-runs for any other reason. The finished default workflow is faked with
  `snakemake --touch --forceall` on empty output files (Snakemake then also writes its metadata, so
  params/code/input-set triggers are live, as after a real run).
* `device: cuda` on a machine without a visible GPU fails within seconds with a clear message.
* The Slurm test config and the two profiles stay valid as the schema and rules evolve.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ctrace.config import validate_config
from ctrace.tokenize import TokenizedCells
from model_fixtures import write_tiny_geneformer

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
NEW = "cd8_cytotoxic"
# The YAML block docs/slurm.md shows for "adding a condition".
NEW_BLOCK = {
    "h5ad": "demo",
    "obs_filter": 'bulk_labels == "CD8+ Cytotoxic T"',
    "trace_cells": 16,
    "sae_set": "pbmc",
}
# Rules that must never run again when a condition is added to an existing SAE set.
NEVER_RERUN = {
    "demo_data",
    "demo_geneformer",
    "demo_scgpt",
    "dump_activations",
    "fit_sae",
    "annotate_features",
    "sae_quality",
    "select_source_features",
}
# Why a job that had finished may legitimately run again: one of its inputs is new or re-made
# (an aggregate over all conditions). Any other reason (params, code, mtime, missing output...) fails.
AGGREGATE_REASONS = (
    "Input files updated by another job",
    "Set of input files has changed since last execution",
)
SMK_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> str:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir)]
    proc = subprocess.run(
        cmd + list(args), capture_output=True, text=True, timeout=timeout, env=SMK_ENV, cwd=workdir
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake {' '.join(args)} failed:\n{out[-4000:]}"
    return out


def workflow_rules() -> set[str]:
    return {
        name
        for smk in (REPO / "workflow" / "rules").glob("*.smk")
        for name in re.findall(r"^rule (\w+):", smk.read_text(), re.M)
    }


def parse_jobs(log: str) -> list[dict]:
    """Job blocks of a dry-run log: rule, wildcards (dict), outputs, reason."""
    jobs, cur = [], None
    for line in log.splitlines():
        m = re.match(r"^(?:local)?rule (\S+):$", line)
        if m:
            cur = {"rule": m.group(1), "wildcards": {}, "output": [], "reason": ""}
            jobs.append(cur)
            continue
        if cur is None or not line.startswith("    "):
            cur = None
            continue
        field, _, value = line.strip().partition(": ")
        if field == "wildcards":
            cur["wildcards"] = dict(kv.split("=", 1) for kv in value.split(", "))
        elif field == "output":
            cur["output"] = value.split(", ")
        elif field == "reason":
            cur["reason"] = value
    return jobs


def rerun_violations(jobs: list[dict], new_condition: str) -> list[str]:
    """Jobs that are not the new condition's and run for a reason other than an updated input."""
    bad = []
    for job in jobs:
        condition = job["wildcards"].get("condition")
        name = f"{job['rule']}{job['wildcards'] or ''}"
        if condition == new_condition:
            continue
        if condition is not None:
            bad.append(f"{name}: a job of another condition ({job['reason']})")
        elif job["rule"] in NEVER_RERUN:
            bad.append(f"{name}: must not re-run ({job['reason']})")
        else:
            clauses = [c.split(":")[0].strip() for c in job["reason"].split("; ") if c.strip()]
            if not clauses or any(c not in AGGREGATE_REASONS for c in clauses):
                bad.append(f"{name}: finished job re-runs because: {job['reason']}")
    return bad


@pytest.fixture(scope="module")
def finished_default_workflow(tmp_path_factory) -> Path:
    """A workdir with the default config whose every output exists and is up to date (faked)."""
    workdir = tmp_path_factory.mktemp("finished")
    (workdir / "config").mkdir()
    (workdir / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    summary = snakemake(workdir, "--summary", "--cores", "1")
    outputs = [
        line.split("\t")[0]
        for line in summary.splitlines()
        if line.startswith("results/") and "\t" in line
    ]
    assert len(outputs) > 50, summary[-2000:]
    directories = {
        rel for smk in (REPO / "workflow" / "rules").glob("*.smk")
        for rel in re.findall(r'directory\("([^"]+)"\)', smk.read_text())
    }
    for rel in outputs:
        path = workdir / rel
        if rel in directories:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    # touch every job in DAG order and record its metadata, as a real run would (temp outputs
    # are removed once their consumers have "run")
    snakemake(workdir, "--touch", "--forceall", "--cores", "1", "--quiet", timeout=600)
    nothing = snakemake(workdir, "--dry-run", "--cores", "1")
    assert "Nothing to be done" in nothing, f"the faked finished workflow is not up to date:\n{nothing[-3000:]}"
    return workdir


def with_new_condition(workdir: Path) -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert NEW not in config["conditions"]
    assert NEW not in config["sae_sets"]["pbmc"]["conditions"]
    config["conditions"][NEW] = dict(NEW_BLOCK)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def test_adding_a_condition_schedules_only_its_jobs_and_aggregates(finished_default_workflow):
    workdir = finished_default_workflow
    with_new_condition(workdir)
    jobs = parse_jobs(snakemake(workdir, "--dry-run", "--cores", "1"))
    rules = {job["rule"] for job in jobs}

    assert not rules & NEVER_RERUN, f"no demo, dump, SAE fit or annotation may run: {sorted(rules & NEVER_RERUN)}"
    assert rerun_violations(jobs, NEW) == []
    # the new condition's own jobs are all there
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    n_models = len(config["models"])
    mine = [job for job in jobs if job["wildcards"].get("condition") == NEW]
    count = lambda rule: sum(job["rule"] == rule for job in mine)  # noqa: E731
    assert count("select_cells") == 1
    assert count("tokenize") == n_models
    for rule in {"ablation_sweep", "merge_sweep", "edges", "coherence", "validate_edges"} & workflow_rules():
        assert count(rule) >= n_models, f"{rule} for {NEW} not scheduled"
    # the aggregates over every condition are re-made (rerun_violations checked why)
    assert {"consensus", "report"} <= rules
    # and each of them makes something new
    for job in mine:
        assert "Missing output files" in job["reason"], job


def test_the_rerun_check_catches_a_finished_job_that_would_rerun(finished_default_workflow):
    """Negative control: a finished upstream output re-made with new content makes finished jobs of
    another condition run again, and the check above must say so."""
    workdir = finished_default_workflow
    with_new_condition(workdir)
    cells = workdir / "results" / "cells" / "b_cell.tsv"
    before, stat = cells.read_bytes(), cells.stat()
    try:
        cells.write_text("obs_name\tsplit\nother\ttrace\n")  # Snakemake compares checksums too
        later = time.time() + 5
        os.utime(cells, (later, later))
        jobs = parse_jobs(snakemake(workdir, "--dry-run", "--cores", "1"))
        violations = rerun_violations(jobs, NEW)
        assert any(v.startswith("tokenize") and "b_cell" in v for v in violations), violations
    finally:
        cells.write_bytes(before)
        os.utime(cells, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_device_and_memory_caps_re_run_nothing_but_result_settings_do(finished_default_workflow):
    """The device, the models' batch sizes and the sweep's per-pass caps change how a job runs, not what
    it computes (to float rounding): they are resources, so changing one (e.g. after an out-of-memory
    kill, or to move on to a GPU) re-runs no finished dump, SAE fit or sweep. Negative control: a
    setting that changes results (null draws) re-runs the sweeps."""
    workdir = finished_default_workflow
    path = workdir / "config" / "config.yaml"
    original = path.read_text()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())  # the finished one (no new condition)
    try:
        config["device"] = "cpu"
        for block in config["models"].values():
            block["batch_size"] = 2 * block["batch_size"]
        config["sweep"]["ablations_per_batch"] //= 2
        config["sweep"]["cells_per_clean_pass"] //= 2
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log = snakemake(workdir, "--dry-run", "--cores", "1")
        assert "Nothing to be done" in log, parse_jobs(log)[:5]
        config["sweep"]["null_draws"] += 1
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        jobs = parse_jobs(snakemake(workdir, "--dry-run", "--cores", "1"))
        sweeps = [job for job in jobs if job["rule"] == "ablation_sweep"]
        assert sweeps and all("Params have changed" in job["reason"] for job in sweeps), jobs[:3]
        assert not {job["rule"] for job in jobs} & {"dump_activations", "fit_sae"}
    finally:
        path.write_text(original)


# ---- device: cuda without a GPU --------------------------------------------------------------------
def test_device_cuda_without_gpu_fails_fast_with_a_clear_message(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    model_dir, dict_dir = write_tiny_geneformer(tmp_path, n_layers=2, hidden=16, heads=2)
    ids = np.array([2, 10, 11, 12, 3, 2, 13, 14, 3], dtype=np.int32)  # <cls> genes <eos>, twice
    tokenized = tmp_path / "cells.npz"
    TokenizedCells(ids, np.array([0, 5, 9]), None, np.array(["c0", "c1"])).save(tokenized)
    out_stem = tmp_path / "acts" / "layer0"
    cmd = [
        sys.executable, "-m", "ctrace.cli", "dump-activations",
        "--kind", "geneformer", "--checkpoint", str(model_dir), "--dictionaries", str(dict_dir),
        "--device", "cuda", "--tokenized", str(tokenized), "--layer", "0", "--out-stem", str(out_stem),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr and "device: auto" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one clear line
    assert not out_stem.parent.exists() or not any(out_stem.parent.iterdir())
    assert elapsed < 30, f"took {elapsed:.1f}s (mostly the torch import; no model was run)"


def test_config_device_cuda_reaches_the_gpu_rules(tmp_path):
    """`device: cuda` in the config is what the GPU rules pass on (so a GPU-less node fails as above)."""
    config = yaml.safe_load((REPO / "tests" / "slurm" / "config.yaml").read_text())
    config["device"] = "cuda"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    log = snakemake(tmp_path, "--configfile", str(tmp_path / "c.yaml"), "--dry-run", "--printshellcmds", "--cores", "1")
    dumps = [line for line in log.splitlines() if "ctrace " in line and " dump-activations " in line]
    assert dumps and all("--device cuda" in line for line in dumps), dumps[:2]
    sweeps = [line for line in log.splitlines() if "ctrace " in line and " sweep " in line]
    caps = f"--ablations-per-batch {config['sweep']['ablations_per_batch']} --cells-per-clean-pass"
    assert sweeps and all("--device cuda" in line and caps in line for line in sweeps), sweeps[:2]


# ---- the Slurm test config and the profiles ---------------------------------------------------------
def test_slurm_test_config_is_valid_and_small():
    config = validate_config(
        yaml.safe_load((REPO / "tests" / "slurm" / "config.yaml").read_text()),
        schema=REPO / "workflow" / "schemas" / "config.schema.yaml",
    )
    assert len(config["conditions"]) == 2
    assert config["demo"]["n_layers"] == 2


def test_profiles_parse_and_gpu_pool_is_not_global_on_slurm(tmp_path):
    """profiles/default is loaded on every run (also with --profile profiles/slurm); its gpu pool
    must be scoped "local" under Slurm, or GPU jobs would be submitted one at a time."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    code = (
        "import sys; from snakemake.cli import parse_args; "
        "_, a = parse_args(sys.argv[1:]); "
        "print(a.executor, a.resources, a.set_resource_scopes, a.rerun_incomplete, a.retries)"
    )
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, "--snakefile", str(SNAKEFILE), *extra],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=SMK_ENV,
    )
    local = run("--resources", "gpu=1")  # a one-GPU machine: GPU rules never share it
    assert local.returncode == 0, local.stderr
    assert "Resource(\"gpu\", 1)" in local.stdout and "True" in local.stdout, local.stdout
    slurm = run("--profile", str(REPO / "profiles" / "slurm"))
    assert slurm.returncode == 0, slurm.stderr
    assert slurm.stdout.startswith("slurm "), slurm.stdout
    assert "'gpu': 'local'" in slurm.stdout, slurm.stdout
