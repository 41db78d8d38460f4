"""Geneformer (HF `BertForMaskedLM`, model_formats.md §1) as a block-by-block `Backend`.

The model folder holds `config.json` + `model.safetensors`; the gene dictionaries live in a separate
folder (`GeneformerDictionaries`). The backend reads the weights file itself (safetensors) and checks
every key and shape against what config.json implies: it runs its own embedding and `PostLNBlock`s, so
importing `transformers` (~5 s per job, in every dump and sweep job of a workflow) would only buy the
loader. `transformers` is imported lazily, for `reference_model()` (the HF forward the backend is tested
and benchmarked against) and for building/saving checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ctrace.errors import CtraceInputError
from ctrace.models.base import Batch, PostLNBackend, PostLNBlock, key_listing, load_plain_state_dict
from ctrace.vocab import GeneformerDictionaries

if TYPE_CHECKING:
    from transformers import BertForMaskedLM

# The MLM decoder is tied to the word embeddings (and its bias to `cls.predictions.bias`), so the
# official file legitimately omits it (§1.3); if present it is ignored, as the tie overrides it.
_TIED_KEYS = frozenset({"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"})
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# config.json's hidden_act → the function (HF ACT2FN names); Geneformer uses relu.
_ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}
# BertConfig's defaults for the optional fields that shape the weights or the forward.
_CONFIG_DEFAULTS = {
    "intermediate_size": 3072,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
}


def read_geneformer_config(model_dir: str | os.PathLike) -> dict:
    """Read and check `config.json` (a BERT masked-LM: Geneformer's architecture); BertConfig's defaults
    are filled in for the optional fields that matter here."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CtraceInputError(f"{path}: not found; a Geneformer model folder holds config.json and model.safetensors")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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
    config = {**_CONFIG_DEFAULTS, **config}
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "intermediate_size",
        "type_vocab_size",
    ):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), int) or config[key] < 1:
            raise CtraceInputError(f"{path}: integer field {key!r} is missing or not a positive integer")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise CtraceInputError(
            f"{path}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
            f"{config['num_attention_heads']}"
        )
    eps = config["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CtraceInputError(f"{path}: 'layer_norm_eps' must be a small positive number (BERT: 1e-12), found {eps!r}")
    if not isinstance(config["hidden_act"], str) or config["hidden_act"] not in _ACTIVATIONS:
        raise CtraceInputError(
            f"{path}: hidden_act {config['hidden_act']!r} is not supported; use one of {', '.join(_ACTIVATIONS)} "
            "(Geneformer models use 'relu')"
        )
    if config["position_embedding_type"] != "absolute":
        raise CtraceInputError(
            f"{path}: position_embedding_type {config['position_embedding_type']!r} is not supported; "
            "Geneformer models use 'absolute'"
        )
    return config


def geneformer_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a `BertForMaskedLM` with this config stores (5 + 16·L + 5, tied decoder omitted) → shape."""
    V, D, ffn = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    shapes = {
        "bert.embeddings.word_embeddings.weight": (V, D),
        "bert.embeddings.position_embeddings.weight": (config["max_position_embeddings"], D),
        "bert.embeddings.token_type_embeddings.weight": (config["type_vocab_size"], D),
        "bert.embeddings.LayerNorm.weight": (D,),
        "bert.embeddings.LayerNorm.bias": (D,),
    }
    per_block = {
        "attention.self.query": (D, D),
        "attention.self.key": (D, D),
        "attention.self.value": (D, D),
        "attention.output.dense": (D, D),
        "attention.output.LayerNorm": (D,),
        "intermediate.dense": (ffn, D),
        "output.dense": (D, ffn),
        "output.LayerNorm": (D,),
    }
    for i in range(config["num_hidden_layers"]):
        for name, shape in per_block.items():
            shapes[f"bert.encoder.layer.{i}.{name}.weight"] = shape
            shapes[f"bert.encoder.layer.{i}.{name}.bias"] = shape[:1]
    shapes["cls.predictions.bias"] = (V,)
    shapes["cls.predictions.transform.dense.weight"] = (D, D)
    shapes["cls.predictions.transform.dense.bias"] = (D,)
    shapes["cls.predictions.transform.LayerNorm.weight"] = (D,)
    shapes["cls.predictions.transform.LayerNorm.bias"] = (D,)
    return shapes


def read_geneformer_weights(model_dir: str | os.PathLike, config: dict) -> dict[str, torch.Tensor]:
    """The folder's tensors (CPU, as stored), refused unless they are exactly `geneformer_weight_shapes`.

    Reads `model.safetensors`, else the shards of `model.safetensors.index.json`, else `pytorch_model.bin`
    (weights only), in the order `from_pretrained` prefers them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    single, index, pickled = (model_dir / name for name in _WEIGHT_FILES)
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({model_dir / str(name) for name in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CtraceInputError(f"{index}: not a safetensors index with a 'weight_map' ({err!r})") from None
    elif pickled.is_file():
        return _checked(load_plain_state_dict(pickled, "a Geneformer pytorch_model.bin"), config, model_dir)
    else:
        raise CtraceInputError(f"{model_dir}: no weights file; expected one of {', '.join(_WEIGHT_FILES)}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise CtraceInputError(f"{path}: weights shard listed in {index.name} not found")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise CtraceInputError(f"{path}: cannot be read as safetensors ({err}); re-download the file") from None
    return _checked(tensors, config, model_dir)


def _checked(tensors: dict[str, torch.Tensor], config: dict, model_dir: Path) -> dict[str, torch.Tensor]:
    expected = geneformer_weight_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - _TIED_KEYS)
    mismatched = sorted(
        f"{key} (file {tuple(t.shape)}, model {expected[key]})"
        for key, t in tensors.items()
        if key in expected and tuple(t.shape) != expected[key]
    )
    if missing or unexpected or mismatched:
        raise CtraceInputError(
            f"{model_dir}: checkpoint does not match config.json ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} wrong-shape keys)"
            + key_listing("missing", missing)
            + key_listing("unexpected", unexpected)
            + key_listing("wrong shape", mismatched)
            + "\nUse an unmodified Geneformer model folder (config.json + model.safetensors from the same release)."
        )
    return {key: tensors[key] for key in expected}


class GeneformerBackend(PostLNBackend):
    """A Geneformer checkpoint run block by block.

    Embedding: word + token-type-0 + absolute position embeddings, then LayerNorm (as BertEmbeddings);
    the blocks are `PostLNBlock`s (scaled_dot_product_attention, unmasked when there is no padding) on
    the checkpoint's tensors, with q/k/v fused into one in-projection.
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
        self.device = torch.device(device)
        self.dtype = dtype
        weights = {
            key: t.to(device=self.device, dtype=dtype) for key, t in read_geneformer_weights(model_dir, config).items()
        }
        self.model_dir = model_dir
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
        self._eps = float(config["layer_norm_eps"])
        self._act = _ACTIVATIONS[config["hidden_act"]]
        self._blocks = [self._make_block(weights, i) for i in range(self.n_layers)]
        # what embed and mlm_logits read (the block tensors now live in self._blocks)
        self._weights = {k: v for k, v in weights.items() if not k.startswith("bert.encoder.")}
        self._reference: BertForMaskedLM | None = None

    def _make_block(self, weights: dict[str, torch.Tensor], index: int) -> PostLNBlock:
        """BertLayer `index` as a `PostLNBlock`: post-LN, dropout off; q/k/v concatenated into one in-projection."""

        def linear(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            return weights[f"{prefix}{name}.weight"], weights[f"{prefix}{name}.bias"]

        def norm(name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
            return (*linear(name), self._eps)

        prefix = f"bert.encoder.layer.{index}."
        q, k, v = (linear(f"attention.self.{name}") for name in ("query", "key", "value"))
        act = self._act
        return PostLNBlock(
            n_heads=int(self.config["num_attention_heads"]),
            qkv=(torch.cat([q[0], k[0], v[0]]), torch.cat([q[1], k[1], v[1]])),
            o=linear("attention.output.dense"),
            ff1=linear("intermediate.dense"),
            ff2=linear("output.dense"),
            ln1=norm("attention.output.LayerNorm"),
            ln2=norm("output.LayerNorm"),
            # ReLU in place on the fresh W₁·h + b₁ (the activation's input is used nowhere else)
            act=torch.relu_ if act is torch.relu else act,
        )

    # ---- Backend primitives -------------------------------------------------------------------
    def embed(self, batch: Batch) -> torch.Tensor:
        """hidden[0] = LayerNorm(word + token-type-0 + absolute position (0..T-1) embeddings)."""
        n_tokens = batch.input_ids_BT.shape[1]
        if n_tokens > self.max_positions:
            raise CtraceInputError(
                f"batch of {n_tokens} tokens exceeds max_position_embeddings {self.max_positions} of "
                "config.json; truncate cells to the model input size when tokenizing"
            )
        w = self._weights
        # summed in BertEmbeddings' order (word + token type, then + position): the same float results
        h = F.embedding(batch.input_ids_BT, w["bert.embeddings.word_embeddings.weight"])
        h = h + w["bert.embeddings.token_type_embeddings.weight"][0]
        h = h + w["bert.embeddings.position_embeddings.weight"][:n_tokens]
        ln = (w["bert.embeddings.LayerNorm.weight"], w["bert.embeddings.LayerNorm.bias"], self._eps)
        return F.layer_norm(h, (self.d_model,), *ln)

    def _block(self, index: int) -> PostLNBlock:
        return self._blocks[index]

    # ---- heads --------------------------------------------------------------------------------
    def mlm_logits(self, h_last_BTD: torch.Tensor) -> torch.Tensor:
        """MLM logits_BTV = LayerNorm(act(W·h + b)) @ word_embeddingsᵀ + bias (the head's decoder is tied)."""
        w, p = self._weights, "cls.predictions."
        t_BTD = self._act(F.linear(h_last_BTD, w[p + "transform.dense.weight"], w[p + "transform.dense.bias"]))
        ln = (w[p + "transform.LayerNorm.weight"], w[p + "transform.LayerNorm.bias"], self._eps)
        t_BTD = F.layer_norm(t_BTD, (self.d_model,), *ln)
        return t_BTD @ w["bert.embeddings.word_embeddings.weight"].T + w[p + "bias"]

    def reference_model(self) -> BertForMaskedLM:
        """The same folder loaded independently by `transformers` (`BertForMaskedLM.from_pretrained`, eager
        attention, eval mode) on this backend's device and dtype: the HF forward this backend is tested and
        benchmarked against. Loaded on the first call, then cached; changing its weights does not change
        this backend."""
        if self._reference is None:
            from transformers import BertForMaskedLM

            if not (self.model_dir / "config.json").is_file():
                raise CtraceInputError(f"{self.model_dir}: model folder no longer there; reference_model() reads it again")

            model = BertForMaskedLM.from_pretrained(
                self.model_dir, attn_implementation="eager", dtype=self.dtype, local_files_only=True
            )
            self._reference = model.to(device=self.device, dtype=self.dtype).eval()
        return self._reference


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
