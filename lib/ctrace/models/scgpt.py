"""scGPT whole-human (model_formats.md §2) re-implemented on plain torch, as a block-by-block `Backend`.

The module tree and parameter names are those of upstream `scgpt.model.TransformerModel` on its torch
path (§2.5), so the official `best_model.pt` loads after the flash-attn → `nn.MultiheadAttention`
rename (§2.6). Re-implementing the small forward avoids importing `scgpt` (which drags in torchtext).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctrace.errors import CtraceInputError
from ctrace.io import atomic_path, write_json
from ctrace.models.base import Batch, PostLNBackend, PostLNBlock, key_listing, load_plain_state_dict
from ctrace.vocab import SCGPT_SPECIALS, load_scgpt_vocab, write_scgpt_vocab

VALUE_CLAMP = 512.0  # ContinuousValueEncoder clamps values above this (upstream max_value)

# Keys every usable checkpoint must provide (the hidden states depend on all of them).
_REQUIRED_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")
# Output heads: loaded when present (all-or-nothing per head), not needed for hidden states.
_OPTIONAL_PREFIXES = ("decoder.", "mvc_decoder.")
# Accepted and ignored: `flag_encoder` only marks generated tokens in upstream's generative
# pretraining (`transformer_generate`), never in `_encode`; `cls_decoder` is a classification head
# that is random unless fine-tuned (whole-human has none). Neither touches the hidden states.
_IGNORED_PREFIXES = ("flag_encoder.", "cls_decoder.")


# ---- args.json ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScGPTArgs:
    """The args.json fields the model needs (§2.2); everything else in the file is training metadata."""

    embsize: int
    nheads: int
    nlayers: int
    d_hid: int
    dropout: float
    pad_token: str
    pad_value: float
    n_bins: int | None = None
    max_seq_len: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "args.json") -> ScGPTArgs:
        if not isinstance(raw, Mapping):
            raise CtraceInputError(f"{source}: expected a JSON object")
        needed = ("embsize", "nheads", "nlayers", "d_hid", "dropout", "pad_token", "pad_value")
        absent = [key for key in needed if key not in raw]
        if absent:
            raise CtraceInputError(
                f"{source}: missing key(s) {', '.join(absent)}; use the args.json shipped with the checkpoint"
            )
        ints = {}
        for key in ("embsize", "nheads", "nlayers", "d_hid"):
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CtraceInputError(f"{source}: key {key!r} must be a positive integer, found {value!r}")
            ints[key] = value
        if ints["embsize"] % ints["nheads"] != 0:
            raise CtraceInputError(f"{source}: embsize {ints['embsize']} is not divisible by nheads {ints['nheads']}")
        for key in ("dropout", "pad_value"):
            if isinstance(raw.get(key), bool) or not isinstance(raw.get(key), (int, float)):
                raise CtraceInputError(f"{source}: key {key!r} must be a number, found {raw.get(key)!r}")
        if not 0 <= raw["dropout"] < 1:
            raise CtraceInputError(f"{source}: key 'dropout' must be in [0, 1), found {raw['dropout']!r}")
        if not isinstance(raw.get("pad_token"), str):
            raise CtraceInputError(f"{source}: key 'pad_token' must be a string such as \"<pad>\"")
        style = raw.get("input_emb_style", "continuous")
        if style != "continuous":
            raise CtraceInputError(
                f"{source}: input_emb_style {style!r} is not supported; only 'continuous' (whole-human) is"
            )
        if raw.get("pre_norm"):
            raise CtraceInputError(f"{source}: pre_norm=true is not supported; whole-human is post-LN (no pre_norm key)")
        optional = {}
        for key in ("n_bins", "max_seq_len"):
            value = raw.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise CtraceInputError(f"{source}: key {key!r} must be an integer, found {value!r}")
            optional[key] = value
        return cls(
            dropout=float(raw["dropout"]),
            pad_token=raw["pad_token"],
            pad_value=float(raw["pad_value"]),
            **ints,
            **optional,
        )


def read_scgpt_args(model_dir: str | os.PathLike) -> tuple[dict, ScGPTArgs]:
    """args.json of an scGPT model folder (which must also hold best_model.pt and vocab.json): the file's
    object and its checked model fields."""
    model_dir = Path(model_dir)
    for path in (model_dir / "args.json", model_dir / "best_model.pt", model_dir / "vocab.json"):
        if not path.is_file():
            raise CtraceInputError(
                f"{path}: not found; an scGPT model folder holds args.json, best_model.pt and vocab.json"
            )
    args_path = model_dir / "args.json"
    try:
        raw_args = json.loads(args_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CtraceInputError(f"{args_path}: not valid JSON ({err})") from None
    return raw_args, ScGPTArgs.from_dict(raw_args, source=str(args_path))


def whole_human_args(*, embsize: int, nheads: int, nlayers: int, d_hid: int, **overrides: Any) -> dict:
    """The 47 keys of the whole-human `args.json` in file order (§2.2), with the given model shape.

    Run-specific paths of the original training run are replaced by neutral placeholders.
    """
    args = {
        "data_source": "cellxgene/scb_strict/human",
        "save_dir": "save/cellxgene_census_human",
        "load_model": None,
        "n_hvg": None,
        "valid_size_or_ratio": 0.003,
        "dist_backend": "nccl",
        "grad_accu_steps": 1,
        "pad_token": "<pad>",
        "input_style": "binned",
        "input_emb_style": "continuous",
        "n_bins": 51,
        "max_seq_len": 1200,
        "training_tasks": "both",
        "dist_url": "tcp://localhost:10001",
        "mask_ratio": [0.25, 0.5, 0.75],
        "trunc_by_sample": True,
        "vocab_path": "scformer/tokenizer/default_census_vocab.json",
        "rank": 0,
        "batch_size": 32,
        "eval_batch_size": 64,
        "epochs": 6,
        "lr": 0.0001,
        "scheduler_interval": 100,
        "scheduler_factor": 0.99,
        "warmup_ratio_or_step": 10000.0,
        "no_cls": True,
        "no_cce": True,
        "fp16": True,
        "fast_transformer": True,
        "nlayers": nlayers,
        "nheads": nheads,
        "embsize": embsize,
        "d_hid": d_hid,
        "dropout": 0.2,
        "n_layers_cls": 3,
        "log_interval": 9000,
        "save_interval": 27000,
        "mask_value": -1,
        "pad_value": -2,
        "USE_CLS": False,
        "USE_CCE": False,
        "MVC": True,
        "USE_GENERATIVE_TRAINING": True,
        "world_size": 16,
        "distributed": True,
        "local_rank": 0,
        "gpu": 0,
    }
    unknown = set(overrides) - set(args)
    if unknown:
        raise ValueError(f"not whole-human args.json keys: {sorted(unknown)}")
    args.update(overrides)
    return args


# ---- module tree (names = upstream TransformerModel) ----------------------------------------------
class GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids_BT))


class ContinuousValueEncoder(nn.Module):
    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values_BT: torch.Tensor) -> torch.Tensor:
        x_BT1 = torch.clamp(values_BT.unsqueeze(-1), max=VALUE_CLAMP)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x_BT1)))))


class ExprDecoder(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.fc(h_BTD).squeeze(-1)


class MVCDecoder(nn.Module):
    """Upstream's "inner product" MVC head: value_BT = <W(sigmoid(gene2query(gene_emb))), cell_emb>."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, cell_emb_BD: torch.Tensor, gene_embs_BTD: torch.Tensor) -> torch.Tensor:
        query_BTD = self.query_activation(self.gene2query(gene_embs_BTD))
        return torch.bmm(self.W(query_BTD), cell_emb_BD.unsqueeze(2)).squeeze(2)


class ScGPTModel(nn.Module):
    """scGPT `TransformerModel` (continuous values, post-LN torch encoder, no cls/dab/batch heads)."""

    def __init__(self, args: ScGPTArgs, vocab_size: int, pad_id: int, do_mvc: bool = True) -> None:
        super().__init__()
        self.args = args
        self.pad_id = pad_id
        d = args.embsize
        self.encoder = GeneEncoder(vocab_size, d, pad_id)
        self.value_encoder = ContinuousValueEncoder(d, args.dropout)
        layer = nn.TransformerEncoderLayer(d, args.nheads, args.d_hid, args.dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, args.nlayers)
        self.decoder = ExprDecoder(d)
        if do_mvc:
            self.mvc_decoder = MVCDecoder(d)
        # upstream init_weights: only the gene embedding gets a custom init
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    @property
    def d_model(self) -> int:
        return self.args.embsize

    def embed(self, ids_BT: torch.Tensor, values_BT: torch.Tensor) -> torch.Tensor:
        """hidden[0]_BTD = gene encoder + value encoder (no positional encoding)."""
        return self.encoder(ids_BT) + self.value_encoder(values_BT)

    def forward(self, ids_BT: torch.Tensor, values_BT: torch.Tensor, pad_BT: torch.Tensor) -> torch.Tensor:
        """Upstream `_encode`: last block output_BTD; `pad_BT` True at padding."""
        return self.transformer_encoder(self.embed(ids_BT, values_BT), src_key_padding_mask=pad_BT)


def build_scgpt(args: Mapping[str, Any], vocab_size: int, pad_id: int, seed: int) -> ScGPTModel:
    """A freshly initialised `ScGPTModel` from an args.json dict (eval mode; call .train() to train).

    The MVC head is built when args["MVC"] is true (as whole-human). The global torch RNG is left
    untouched: init runs under a forked, seeded RNG.
    """
    parsed = ScGPTArgs.from_dict(args, source="args")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ScGPTModel(parsed, vocab_size, pad_id, do_mvc=bool(args.get("MVC", False)))
    return model.eval()


# ---- checkpoint naming -------------------------------------------------------------------------------
def _torch_name(file_key: str) -> str:
    """flash-attn checkpoint name → nn.MultiheadAttention name (a pure rename, §2.6)."""
    key = file_key.replace(".self_attn._impl.", ".self_attn.")
    key = key.replace(".self_attn.Wqkv.weight", ".self_attn.in_proj_weight")
    return key.replace(".self_attn.Wqkv.bias", ".self_attn.in_proj_bias")


def _flash_name(torch_key: str, with_impl: bool = False) -> str:
    key = torch_key.replace(".self_attn.in_proj_weight", ".self_attn.Wqkv.weight")
    key = key.replace(".self_attn.in_proj_bias", ".self_attn.Wqkv.bias")
    if with_impl:
        key = key.replace(".self_attn.", ".self_attn._impl.")
    return key


def save_scgpt(model: ScGPTModel, args: Mapping[str, Any], vocab: Mapping[str, int], directory: str | os.PathLike) -> Path:
    """Write `args.json`, `best_model.pt` and `vocab.json` in the whole-human layout (§2.2-2.4).

    best_model.pt is a plain fp32 state dict with flash-attn names (`self_attn.Wqkv.*`), plus a
    `flag_encoder.weight` (2, d) as the generative pretraining leaves one, and no `cls_decoder.*`.
    """
    directory = Path(directory)
    parsed = ScGPTArgs.from_dict(args, source="args")
    shape = (parsed.embsize, parsed.nlayers, parsed.nheads, parsed.d_hid)
    first = model.transformer_encoder.layers[0]
    model_shape = (model.d_model, len(model.transformer_encoder.layers), first.self_attn.num_heads,
                   first.linear1.out_features)
    if shape != model_shape:
        raise ValueError(f"args (embsize, nlayers, nheads, d_hid) = {shape} but the model has {model_shape}")
    n_rows = model.encoder.embedding.num_embeddings
    if len(vocab) != n_rows or vocab.get(parsed.pad_token) != model.pad_id:
        raise ValueError(
            f"vocab has {len(vocab)} entries (pad {vocab.get(parsed.pad_token)}) but the model embeds "
            f"{n_rows} tokens (pad {model.pad_id})"
        )
    flag_2D = torch.randn(2, model.d_model, generator=torch.Generator().manual_seed(0))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("value_encoder.") and "flag_encoder.weight" not in state:
            state["flag_encoder.weight"] = flag_2D  # upstream module order: encoder, flag_encoder, ...
        state[_flash_name(key)] = tensor.detach().to("cpu", torch.float32).clone()
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "args.json", dict(args))
    with atomic_path(directory / "best_model.pt") as tmp:
        torch.save(state, tmp)
    write_scgpt_vocab(directory / "vocab.json", dict(vocab))
    return directory


# ---- backend ---------------------------------------------------------------------------------------
class ScGPTBackend(PostLNBackend):
    """An scGPT checkpoint folder (`args.json`, `best_model.pt`, `vocab.json`) run block by block.

    The blocks run as `PostLNBlock`s on the torch encoder layers' own parameters; `module` itself (the
    torch layers' forward) is the reference they are tested against."""

    name = "scgpt"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        model_dir = Path(model_dir)
        args_path = model_dir / "args.json"
        weights_path = model_dir / "best_model.pt"
        raw_args, args = read_scgpt_args(model_dir)
        vocab = load_scgpt_vocab(model_dir / "vocab.json")
        if args.pad_token not in vocab:
            raise CtraceInputError(f"{args_path}: pad_token {args.pad_token!r} is not in vocab.json")

        file_state = load_plain_state_dict(weights_path, "scGPT's best_model.pt")
        state = _rename_checkpoint(file_state, weights_path)
        do_mvc = any(k.startswith("mvc_decoder.") for k in state)
        with torch.random.fork_rng(devices=[]):
            # Heads absent from the file keep this fixed init; the global RNG is not disturbed.
            torch.manual_seed(0)
            module = ScGPTModel(args, len(vocab), vocab[args.pad_token], do_mvc=do_mvc)
        loaded_heads = _check_and_load(module, state, weights_path, len(vocab))

        self.device = torch.device(device)
        self.dtype = dtype
        self.module = module.to(device=self.device, dtype=dtype).eval()
        self.args = raw_args
        self.config = args
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.n_layers = args.nlayers
        self.d_model = args.embsize
        self.pad_token_id = vocab[args.pad_token]
        self.special_token_ids = frozenset(vocab[s] for s in SCGPT_SPECIALS if s in vocab)
        self.pad_value = args.pad_value
        self.cls_token_id: int = vocab["<cls>"]
        self.n_bins = args.n_bins
        self.max_seq_len = args.max_seq_len
        self.has_expr_decoder = "decoder." in loaded_heads
        self.has_mvc_decoder = "mvc_decoder." in loaded_heads

    def embed(self, batch: Batch) -> torch.Tensor:
        if batch.values_BT is None:
            raise ValueError("scGPT needs per-token values (batch.values_BT is None)")
        return self.module.embed(batch.input_ids_BT, batch.values_BT.to(self.dtype))

    def _block(self, index: int) -> PostLNBlock:
        """Encoder layer `index` (torch TransformerEncoderLayer: post-LN, ReLU, dropout off in eval) as a
        `PostLNBlock` on the layer's own parameters; its in-projection is already fused, so nothing is copied."""
        layer = self.module.transformer_encoder.layers[index]
        attn = layer.self_attn
        return PostLNBlock(
            n_heads=attn.num_heads,
            qkv=(attn.in_proj_weight, attn.in_proj_bias),
            o=(attn.out_proj.weight, attn.out_proj.bias),
            ff1=(layer.linear1.weight, layer.linear1.bias),
            ff2=(layer.linear2.weight, layer.linear2.bias),
            ln1=(layer.norm1.weight, layer.norm1.bias, layer.norm1.eps),
            ln2=(layer.norm2.weight, layer.norm2.bias, layer.norm2.eps),
            act=torch.relu_,  # in place on the fresh W₁·h + b₁ (ScGPTModel builds ReLU layers)
        )

    def expr_prediction(self, h_last_BTD: torch.Tensor) -> torch.Tensor:
        """Expression decoder output pred_BT (upstream ExprDecoder "pred") on the last hidden state."""
        if not self.has_expr_decoder:
            raise CtraceInputError("this scGPT checkpoint has no decoder.fc.* weights; expression prediction is unavailable")
        return self.module.decoder(h_last_BTD)


def _rename_checkpoint(file_state: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """torch name -> (name in the file, tensor)."""
    state: dict[str, tuple[str, torch.Tensor]] = {}
    for file_key, tensor in file_state.items():
        key = _torch_name(file_key)
        if key in state:
            raise CtraceInputError(
                f"{path}: keys {state[key][0]!r} and {file_key!r} both provide {key!r}; keep one naming convention"
            )
        state[key] = (file_key, tensor)
    return state


def _check_and_load(
    module: ScGPTModel, state: dict[str, tuple[str, torch.Tensor]], path: Path, vocab_size: int
) -> set[str]:
    """Refuse any missing/unexpected/wrong-shape key, then load. Returns the optional heads loaded."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    flash = any("Wqkv" in file_key for file_key, _ in state.values())
    impl = any("._impl." in file_key for file_key, _ in state.values())

    def shown(key: str) -> str:  # name a missing key the way this file would spell it
        return _flash_name(key, with_impl=impl) if flash else key

    unexpected = sorted(
        file_key for key, (file_key, _) in state.items()
        if key not in expected and not key.startswith(_IGNORED_PREFIXES)
    )
    wrong_shape = sorted(
        f"{file_key} (file {tuple(t.shape)}, expected {expected[key]})"
        for key, (file_key, t) in state.items()
        if key in expected and tuple(t.shape) != expected[key]
    )
    missing = [shown(k) for k in expected if k.startswith(_REQUIRED_PREFIXES) and k not in state]
    loaded_heads, absent = set(), []
    for prefix in _OPTIONAL_PREFIXES:
        group = [k for k in expected if k.startswith(prefix)]
        present = [k for k in group if k in state]
        if present and len(present) < len(group):
            missing += [shown(k) for k in group if k not in state]
        elif present:
            loaded_heads.add(prefix)
        else:
            absent += group
    if missing or unexpected or wrong_shape:
        hint = ""
        if any(s.startswith("encoder.embedding.weight") for s in wrong_shape):
            hint = f"\n  (encoder.embedding.weight needs one row per vocab.json entry: {vocab_size})"
        raise CtraceInputError(
            f"{path}: checkpoint does not match args.json / vocab.json ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys)"
            + key_listing("missing", sorted(missing))
            + key_listing("unexpected", unexpected)
            + key_listing("wrong shape", wrong_shape)
            + hint
            + "\nUse the unmodified whole-human folder (args.json, best_model.pt, vocab.json from one release)."
        )
    tensors = {key: t for key, (_, t) in state.items() if key in expected}
    # strict=False only because absent output heads are allowed; every other key was checked above,
    # and the result is verified to be exactly those heads.
    result = module.load_state_dict(tensors, strict=False)
    if sorted(result.missing_keys) != sorted(absent) or result.unexpected_keys:
        raise RuntimeError(f"internal: load_state_dict reported {result}")
    return loaded_heads
