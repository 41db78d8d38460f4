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
from ctrace.genesets import BUNDLED_GMT_FILES, library_names

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
    _check_model_keys(config)
    _check_references(config)
    if check_files:
        _check_files(config)
    return config


# Keys that only one model kind reads (default filled in for that kind; None = no default): given for the
# other kind they would be silently ignored, so they are an error there. The schema gives them no default,
# so a key present before `_check_model_keys` is one the user wrote.
KIND_KEYS = {
    "geneformer": {"dictionaries": None, "version": "V2"},
    "scgpt": {"max_seq_len": 1200},
}
_WRONG_KIND_HINTS = {
    "dictionaries": "scGPT reads vocab.json from its checkpoint folder",
    "version": "scGPT has one vocabulary, vocab.json in its checkpoint folder",
    "max_seq_len": "Geneformer's length is its checkpoint's max_position_embeddings",
}


def _check_model_keys(config: dict) -> None:
    """Kind-specific keys: an error where the other kind's key is given, else its default filled in."""
    problems = []
    for name, block in config["models"].items():
        for kind, keys in KIND_KEYS.items():
            for key, default in keys.items():
                if kind == block["kind"] and default is not None:
                    block.setdefault(key, default)
                elif kind != block["kind"] and key in block:
                    problems.append(
                        f"  models.{name}.{key}: only {kind} models read it ({_WRONG_KIND_HINTS[key]}); remove the key"
                    )
    if problems:
        raise CtraceInputError("invalid config:\n" + "\n".join(problems))


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
    if error.validator in ("oneOf", "anyOf") and error.context:
        # e.g. layers: all | [indices]: say what is wrong within the alternative the value's type picks
        specific = [
            e
            for e in error.context
            if e.validator not in ("const", "type", "enum") or list(e.absolute_path) != list(error.absolute_path)
        ]
        if specific:
            return "\n".join(dict.fromkeys(_describe(e) for e in specific))
        kinds = {"array": "a list", "string": "a string", "integer": "an integer", "object": "a mapping"}
        options = [repr(o["const"]) if "const" in o else kinds.get(o.get("type"), "?") for o in error.validator_value]
        return f"  {where}: {error.instance!r} is not one of: {', '.join(options)}"
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
        if block["kind"] != "geneformer":
            continue
        if "dictionaries" not in block:
            problems.append(
                f"  models.{name}.dictionaries: required for Geneformer (the folder with the "
                "*_gc104M.pkl files, or 'demo')"
            )
        elif (block["checkpoint"] == DEMO) != (block["dictionaries"] == DEMO):
            problems.append(f"  models.{name}: checkpoint and dictionaries must both be 'demo' or both paths")
    demo = config["demo"]
    if demo["d_model"] % demo["n_heads"]:
        problems.append(f"  demo.n_heads: {demo['n_heads']} does not divide demo.d_model {demo['d_model']}")
    if any(block["checkpoint"] == DEMO for block in config["models"].values()):
        problems += _shape_problems(config, demo["n_layers"], demo["d_model"])
    sweep = config["sweep"]
    if sweep["selection"] == "explicit" and not sweep["features"]:
        problems.append("  sweep.features: selection 'explicit' needs at least one feature id")
    if sweep["selection"] != "explicit" and sweep["features"]:
        problems.append(
            f"  sweep.features: only read with selection 'explicit' (selection is {sweep['selection']!r}); "
            "remove the list or set sweep.selection: explicit"
        )
    if sweep["features_per_shard"] % sweep["features_per_batch"]:
        problems.append(
            f"  sweep.features_per_shard ({sweep['features_per_shard']}) must be a multiple of "
            f"sweep.features_per_batch ({sweep['features_per_batch']}), so that every shard holds whole batch "
            "groups and the shards merge bit-identically to one run; change either value"
        )
    if problems:
        raise CtraceInputError("invalid config:\n" + "\n".join(problems))


def _shape_problems(config: dict, n_layers: int, d_model: int, model: str | None = None) -> list[str]:
    """The layer, SAE-width and feature-id settings against one model's shape (`model` None: the demo models)."""
    sae, layers = config["sae"], config["activations"]["layers"]
    width = sae["expansion"] * d_model
    owner, d_name = ("the demo models", "demo.d_model") if model is None else (model, str(d_model))
    problems = []
    bad = [] if layers == "all" else [layer for layer in layers if layer >= n_layers]
    if bad:
        problems.append(f"  activations.layers: {bad} out of range for {owner} ({n_layers} layers)")
    if sae["k"] > width:
        sae_owner = "the demo SAEs'" if model is None else f"{model}'s SAE"
        problems.append(f"  sae.k: {sae['k']} exceeds {sae_owner} width (sae.expansion × {d_name} = {width})")
    too_big = [f for f in config["sweep"]["features"] if f >= width]
    if too_big:
        problems.append(f"  sweep.features: {too_big} out of range for {owner}'s SAEs ({width} features)")
    return problems


def _check_files(config: dict) -> None:
    problems = []
    for name, block in config["models"].items():
        for key in ("checkpoint", "dictionaries"):
            value = block.get(key)
            if value is not None and value != DEMO and not Path(value).is_dir():
                problems.append(f"  models.{name}.{key}: folder {value!r} not found")
        if block["checkpoint"] != DEMO and Path(block["checkpoint"]).is_dir():
            from ctrace.models import checkpoint_shape  # torch: imported only for real checkpoints

            try:
                shape = checkpoint_shape(block["kind"], block["checkpoint"])
            except CtraceInputError as err:
                problems.append(f"  models.{name}.checkpoint: {err}")
                continue
            problems += _shape_problems(config, shape.n_layers, shape.d_model, name)
    try:
        library_names(config["annotation"]["gene_sets"])
    except CtraceInputError as err:
        problems.append(f"  {err}")
    for entry in config["annotation"]["gene_sets"]:
        if entry not in BUNDLED_GMT_FILES and not Path(entry).is_file():
            problems.append(
                f"  annotation.gene_sets: {entry!r} is neither a bundled library ({', '.join(BUNDLED_GMT_FILES)}) "
                "nor an existing GMT file"
            )
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
