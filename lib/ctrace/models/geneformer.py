"""Geneformer (HF `BertForMaskedLM`, model_formats.md §1) as a block-by-block `Backend`.

The model folder holds `config.json` + `model.safetensors`; the gene dictionaries live in a separate
folder (`GeneformerDictionaries`). `transformers` is imported lazily: it costs seconds, and code that
only needs `ctrace.models` for types or scGPT should not pay for it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ctrace.errors import CtraceInputError
from ctrace.models.base import Batch, PostLNBackend, PostLNBlock
from ctrace.vocab import GeneformerDictionaries

if TYPE_CHECKING:
    from transformers import BertForMaskedLM

# The MLM decoder is tied to the word embeddings (and its bias to `cls.predictions.bias`), so the
# official file legitimately omits it (§1.3). Nothing else may be missing.
_TIED_KEYS = frozenset({"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"})
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def read_geneformer_config(model_dir: str | os.PathLike) -> dict:
    """Read and check `config.json`: must describe a BERT masked-LM (Geneformer's architecture)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CtraceInputError(f"{path}: not found; a Geneformer model folder holds config.json and model.safetensors")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CtraceInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CtraceInputError(f"{path}: expected a JSON object")
    archs = config.get("architectures")
    model_type = config.get("model_type")
    if model_type != "bert" or archs != ["BertForMaskedLM"]:
        raise CtraceInputError(
            f"{path}: 'architectures' = {archs!r}, 'model_type' = {model_type!r}; a Geneformer checkpoint is "
            "['BertForMaskedLM'] / 'bert'. Point the model folder at a Geneformer model (e.g. Geneformer-V2-316M/)."
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        if not isinstance(config.get(key), int):
            raise CtraceInputError(f"{path}: integer field {key!r} is missing or not an integer")
    return config


class GeneformerBackend(PostLNBackend):
    """A Geneformer checkpoint run block by block.

    The blocks run as `PostLNBlock`s on the HF layers' own parameters (scaled_dot_product_attention,
    unmasked when there is no padding); `module` is the HF model itself (eager attention), for its heads
    and as the reference the block-by-block runs are tested against.
    """

    name = "geneformer"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        dictionaries: GeneformerDictionaries,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import BertForMaskedLM

        model_dir = Path(model_dir)
        config = read_geneformer_config(model_dir)
        config_path = model_dir / "config.json"
        token_dict = dictionaries.token_dict
        if config["vocab_size"] != len(token_dict):
            raise CtraceInputError(
                f"{config_path}: vocab_size {config['vocab_size']} != {len(token_dict)} entries in the "
                f"{dictionaries.version} token dictionary; model and dictionary folder do not belong together "
                "(V2 models need the gc104M dictionaries, V1 the gc30M ones; pass the matching version)."
            )
        pad_id = token_dict["<pad>"]
        if config.get("pad_token_id", pad_id) != pad_id:
            raise CtraceInputError(
                f"{config_path}: pad_token_id {config['pad_token_id']} != <pad> id {pad_id} of the token dictionary"
            )
        if not any((model_dir / name).is_file() for name in _WEIGHT_FILES):
            raise CtraceInputError(f"{model_dir}: no weights file; expected one of {', '.join(_WEIGHT_FILES)}")

        # ignore_mismatched_sizes=True makes transformers *report* shape mismatches in the loading
        # info instead of raising its own error; we then refuse any mismatch below.
        model, info = BertForMaskedLM.from_pretrained(
            model_dir,
            attn_implementation="eager",  # the HF forward is the reference (§3.1); run_blocks is our own
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            local_files_only=True,
        )
        missing = sorted(set(info.get("missing_keys", ())) - _TIED_KEYS)
        unexpected = sorted(info.get("unexpected_keys", ()))
        mismatched = sorted(
            f"{key} (file {tuple(shape_file)}, model {tuple(shape_model)})"
            for key, shape_file, shape_model in info.get("mismatched_keys", ())
        )
        errors = list(info.get("error_msgs", ()))
        if missing or unexpected or mismatched or errors:
            raise CtraceInputError(
                f"{model_dir}: checkpoint does not match config.json ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(mismatched)} wrong-shape keys)"
                + _listing("missing", missing)
                + _listing("unexpected", unexpected)
                + _listing("wrong shape", mismatched)
                + _listing("load errors", errors)
                + "\nUse an unmodified Geneformer model folder (config.json + model.safetensors from the same release)."
            )

        self.device = torch.device(device)
        self.dtype = dtype
        self.module: BertForMaskedLM = model.to(device=self.device, dtype=dtype).eval()
        self.config = config
        self.dictionaries = dictionaries
        self.version = dictionaries.version
        self.n_layers = int(config["num_hidden_layers"])
        self.d_model = int(config["hidden_size"])
        self.vocab_size = int(config["vocab_size"])
        self.max_positions = int(config["max_position_embeddings"])
        self.pad_token_id = pad_id
        self.special_token_ids = dictionaries.special_token_ids
        self.pad_value = None
        self.cls_token_id: int | None = token_dict.get("<cls>")
        self.eos_token_id: int | None = token_dict.get("<eos>")
        self.mask_token_id: int = token_dict["<mask>"]
        self._blocks: dict[int, tuple[tuple, PostLNBlock]] = {}  # layer → (q/k/v signature, block); `_block`

    # ---- Backend primitives -------------------------------------------------------------------
    def embed(self, batch: Batch) -> torch.Tensor:
        """hidden[0] = word + absolute position (0..T-1) + token-type-0 embeddings, then LayerNorm."""
        n_tokens = batch.input_ids_BT.shape[1]
        if n_tokens > self.max_positions:
            raise CtraceInputError(
                f"batch of {n_tokens} tokens exceeds max_position_embeddings {self.max_positions} of "
                "config.json; truncate cells to the model input size when tokenizing"
            )
        return self.module.bert.embeddings(input_ids=batch.input_ids_BT)

    def _block(self, index: int) -> PostLNBlock:
        """BertLayer `index` as a `PostLNBlock` on the HF layer's own parameters (dropout is off in eval).

        Built once per layer and cached; the fused q/k/v in-projection is a copy, rebuilt whenever one of
        the six q/k/v tensors has been replaced or modified in place since (their version counters).
        """
        layer = self.module.bert.encoder.layer[index]
        attn = layer.attention.self
        qkv = (attn.query.weight, attn.key.weight, attn.value.weight, attn.query.bias, attn.key.bias, attn.value.bias)
        signature = tuple((t.data_ptr(), t._version) for t in qkv)
        cached = self._blocks.get(index)
        if cached is not None and cached[0] == signature:
            return cached[1]
        ln1, ln2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
        act = layer.intermediate.intermediate_act_fn
        block = PostLNBlock(
            n_heads=attn.num_attention_heads,
            qkv=(torch.cat(qkv[:3]).detach(), torch.cat(qkv[3:]).detach()),
            o=(layer.attention.output.dense.weight, layer.attention.output.dense.bias),
            ff1=(layer.intermediate.dense.weight, layer.intermediate.dense.bias),
            ff2=(layer.output.dense.weight, layer.output.dense.bias),
            ln1=(ln1.weight, ln1.bias, ln1.eps),
            ln2=(ln2.weight, ln2.bias, ln2.eps),
            # ReLU in place on the fresh W₁·h + b₁ (the activation's input is used nowhere else)
            act=torch.relu_ if isinstance(act, torch.nn.ReLU) else act,
        )
        self._blocks[index] = (signature, block)
        return block

    # ---- heads --------------------------------------------------------------------------------
    def mlm_logits(self, h_last_BTD: torch.Tensor) -> torch.Tensor:
        """MLM logits_BTV: transform (dense, act, LayerNorm), then the tied word-embedding decoder + bias.

        Written out explicitly (not `cls.predictions.decoder`) so it is correct even if a loader
        variant failed to re-tie the decoder weight to the embeddings.
        """
        head = self.module.cls.predictions
        t_BTD = head.transform(h_last_BTD)
        word_VD = self.module.bert.embeddings.word_embeddings.weight
        return t_BTD @ word_VD.T + head.bias


def build_geneformer(
    vocab_size: int,
    hidden_size: int,
    n_layers: int,
    n_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int,
) -> BertForMaskedLM:
    """A freshly initialised Geneformer-shaped `BertForMaskedLM` (eval mode; call .train() to train).

    Config values not read from arguments follow the Geneformer configs (relu, eps 1e-12, pad 0).
    The global torch RNG is left untouched: init runs under a forked, seeded RNG.
    """
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        hidden_act="relu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        initializer_range=0.02,
        type_vocab_size=2,
        pad_token_id=0,
        architectures=["BertForMaskedLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(config)
    model.config.architectures = ["BertForMaskedLM"]
    return model.eval()


def save_geneformer(model: BertForMaskedLM, directory: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` in the official layout (5 + 16·L + 5 tensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["BertForMaskedLM"]
    # Save into a scratch sibling and move the files in, so an interrupted save never leaves a
    # config.json next to a half-written weights file. save_pretrained (safetensors by default)
    # drops the tied decoder weight itself, reproducing the official key set.
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.", dir=directory.parent) as scratch:
        model.save_pretrained(scratch)
        names = sorted(os.listdir(scratch))
        if "model.safetensors" not in names:
            raise RuntimeError(f"save_pretrained wrote {names}, expected a single model.safetensors")
        for name in names:
            os.replace(Path(scratch) / name, directory / name)
    return directory


def _listing(label: str, items: list[str], limit: int = 20) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {label}: {shown}{more}"
