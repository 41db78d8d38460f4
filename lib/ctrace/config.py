"""Workflow configuration: JSON-schema validation with defaults, cross-references and file checks.

Errors name the config key path (e.g. `conditions.b_cell.trace_cells`) and say how to fix it.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ctrace.errors import CtraceInputError

DEMO = "demo"


def schema_path() -> Path:
    """The schema shipped with the workflow (also used by `snakemake --lint`-style validation)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "workflow" / "schemas" / "config.schema.yaml"
        if candidate.is_file():
            return candidate
    packaged = resources.files("ctrace") / "data" / "config.schema.yaml"
    return Path(str(packaged))


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def validate_config(config: dict[str, Any], schema: Path | None = None, check_files: bool = True) -> dict:
    """Return a validated copy of `config` with defaults filled in; raise CtraceInputError otherwise."""
    schema_file = schema or schema_path()
    schema_doc = yaml.safe_load(Path(schema_file).read_text())
    config = copy.deepcopy(config)
    errors = sorted(_Validator(schema_doc).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise CtraceInputError("invalid config:\n" + "\n".join(_describe(e) for e in errors))
    # defaults of nested objects created by a default ({}) are filled on a second pass
    _Validator(schema_doc).validate(config)
    _check_references(config)
    if check_files:
        _check_files(config)
    return config


def load_config(path: str | Path, check_files: bool = True) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CtraceInputError(f"{path}: config file not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CtraceInputError(f"{path}: not valid YAML ({err})") from None
    return validate_config(config, check_files=check_files)


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        return f"  {where}: unknown key(s) {extra}; allowed keys: {allowed}"
    if error.validator == "required":
        return f"  {where}: {error.message}"
    if error.validator == "enum":
        return f"  {where}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "propertyNames":
        return f"  {where}: name {error.instance!r} may only contain letters, digits and '_'"
    return f"  {where}: {error.message}"


def _check_references(config: dict) -> None:
    problems = []
    conditions, sae_sets = config["conditions"], config["sae_sets"]
    for name, block in conditions.items():
        if block["sae_set"] not in sae_sets:
            problems.append(
                f"  conditions.{name}.sae_set: {block['sae_set']!r} is not defined under sae_sets "
                f"(defined: {sorted(sae_sets)})"
            )
    for name, block in sae_sets.items():
        for condition in block["conditions"]:
            if condition not in conditions:
                problems.append(f"  sae_sets.{name}.conditions: {condition!r} is not a condition")
    for name, block in config["models"].items():
        if block["kind"] == "geneformer" and "dictionaries" not in block:
            problems.append(
                f"  models.{name}.dictionaries: required for Geneformer (the folder with the "
                "*_gc104M.pkl files, or 'demo')"
            )
        if block["kind"] == "scgpt" and "dictionaries" in block:
            problems.append(f"  models.{name}.dictionaries: scGPT reads vocab.json from its checkpoint folder")
        if (block["checkpoint"] == DEMO) != (block.get("dictionaries", DEMO) == DEMO):
            problems.append(f"  models.{name}: checkpoint and dictionaries must both be 'demo' or both paths")
    sweep = config["sweep"]
    if sweep["features_per_shard"] % sweep["features_per_batch"]:
        problems.append(
            f"  sweep.features_per_shard ({sweep['features_per_shard']}) must be a multiple of "
            f"sweep.features_per_batch ({sweep['features_per_batch']}), so that every shard holds whole batch "
            "groups and the shards merge bit-identically to one run; change either value"
        )
    if problems:
        raise CtraceInputError("invalid config:\n" + "\n".join(problems))


def _check_files(config: dict) -> None:
    problems = []
    for name, block in config["models"].items():
        for key in ("checkpoint", "dictionaries"):
            value = block.get(key)
            if value is not None and value != DEMO and not Path(value).is_dir():
                problems.append(f"  models.{name}.{key}: folder {value!r} not found")
    for name, block in config["conditions"].items():
        if block["h5ad"] != DEMO and not Path(block["h5ad"]).is_file():
            problems.append(f"  conditions.{name}.h5ad: file {block['h5ad']!r} not found")
    biology = config["biology"]
    optional_files = [("disease_gene_sets", biology["disease_gene_sets"]), ("tf_targets", biology["tf_targets"])]
    optional_files += [(f"perturbation[{i}]", path) for i, path in enumerate(biology["perturbation"])]
    for key, value in optional_files:
        if value is not None and not Path(value).is_file():
            problems.append(f"  biology.{key}: file {value!r} not found (remove the entry to skip this test)")
    if problems:
        raise CtraceInputError("invalid config:\n" + "\n".join(problems))
