"""Device and dtype selection: CUDA when visible (honouring CUDA_VISIBLE_DEVICES), else CPU."""

from __future__ import annotations

import os

import torch

from ctrace.errors import CtraceInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str) -> torch.device:
    """'auto' → cuda:0 if a GPU is visible else cpu; 'cuda' without a visible GPU fails at once."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise CtraceInputError(
                f"device: {requested!r} was requested but no CUDA GPU is visible "
                f"(CUDA_VISIBLE_DEVICES={visible!r}, torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda is not None}). Run on a GPU node (the rule requests gpu=1), "
                "install a CUDA build of torch, or set `device: auto` / `device: cpu` in the config."
            )
        return torch.device(requested if ":" in requested else "cuda:0")
    if requested == "cpu":
        return torch.device("cpu")
    raise CtraceInputError(f"device: {requested!r} is not one of auto, cpu, cuda")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Half precision only on the GPU: on CPUs bf16/fp16 matmuls are far slower than fp32."""
    if name not in DTYPES:
        raise CtraceInputError(f"dtype: {name!r} is not one of {sorted(DTYPES)}")
    if device.type == "cpu" and name != "float32":
        return torch.float32
    return DTYPES[name]
