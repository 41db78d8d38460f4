"""Model back-ends: Geneformer (HF BERT) and scGPT whole-human, behind one `Backend` interface."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ctrace.errors import CtraceInputError
from ctrace.models.base import Backend, Batch, Cell
from ctrace.models.geneformer import GeneformerBackend, build_geneformer, read_geneformer_config, save_geneformer
from ctrace.models.scgpt import (
    ScGPTArgs,
    ScGPTBackend,
    ScGPTModel,
    build_scgpt,
    read_scgpt_args,
    save_scgpt,
    whole_human_args,
)

BACKEND_KINDS = ("geneformer", "scgpt")

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "Batch",
    "Cell",
    "GeneformerBackend",
    "ScGPTArgs",
    "ScGPTBackend",
    "ScGPTModel",
    "build_geneformer",
    "build_scgpt",
    "checkpoint_shape",
    "load_backend",
    "save_geneformer",
    "save_scgpt",
    "whole_human_args",
]


@dataclass(frozen=True)
class CheckpointShape:
    n_layers: int
    d_model: int


def checkpoint_shape(kind: str, model_dir: str | os.PathLike) -> CheckpointShape:
    """Blocks and width of a model folder, from its checked config.json (Geneformer) or args.json (scGPT),
    without loading the weights."""
    if kind == "geneformer":
        config = read_geneformer_config(model_dir)
        return CheckpointShape(config["num_hidden_layers"], config["hidden_size"])
    if kind == "scgpt":
        _, args = read_scgpt_args(model_dir)
        return CheckpointShape(args.nlayers, args.embsize)
    raise CtraceInputError(f"model kind {kind!r} is not one of {BACKEND_KINDS}")


def load_backend(
    kind: str,
    model_dir: str | os.PathLike,
    dictionary_dir: str | os.PathLike | None = None,
    *,
    version: str = "V2",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Backend:
    """Load a model folder as a `Backend`.

    Geneformer needs `dictionary_dir` (the gene dictionaries are not in the model folder) and the
    dictionary `version` ("V2" gc104M, "V1" gc30M). scGPT reads `vocab.json` from `model_dir`.
    """
    if kind == "geneformer":
        if dictionary_dir is None:
            raise CtraceInputError(
                f"{model_dir}: Geneformer needs a dictionary folder (token_dictionary_gc104M.pkl etc., "
                "Geneformer's geneformer/ package folder); set dictionary_dir"
            )
        from ctrace.vocab import load_geneformer_dictionaries

        dictionaries = load_geneformer_dictionaries(dictionary_dir, version=version)
        return GeneformerBackend(model_dir, dictionaries, device=device, dtype=dtype)
    if kind == "scgpt":
        if dictionary_dir is not None:
            raise CtraceInputError(
                f"{dictionary_dir}: scGPT takes no dictionary folder; its vocab.json is read from the model "
                f"folder {model_dir}. Leave dictionary_dir unset."
            )
        return ScGPTBackend(model_dir, device=device, dtype=dtype)
    raise CtraceInputError(f"model kind {kind!r} is not supported; use one of {', '.join(BACKEND_KINDS)}")
